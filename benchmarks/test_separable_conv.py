"""The fused depthwise-separable atrous conv (DeepLab v3+) against the unfused torch layers, side by side.

Layers (batch 1, float32, the v3+ shapes at a 513x513 input, output stride 16): the ASPP's separable branches,
2048 -> 256 at rates 6 and 18 at 33x33 (ResNet) and 320 -> 256 at rate 6 (MobileNetV2); the decoder's two
separable convs, 304 -> 256 and 256 -> 256 at 129x129. Each is an ``AtrousSeparableConv2d`` (depthwise atrous
conv + BN + ReLU, pointwise 1x1 + BN + ReLU) in eval mode with random BN statistics, in both input layouts
(contiguous NCHW, as the models run on the CPU by default, and channels_last).

Peer: the unfused layers as torch runs them (``module.reference_forward``: ``F.conv2d(groups=C)``, BN, ReLU,
``F.conv2d`` 1x1, BN, ReLU; oneDNN / MKL). Ours: ``FusedSeparableConv2d.from_module(module)`` (BNs folded once,
one ``deeplab_fast.ops.separable_conv2d`` call). Both on the same input in the same process, both checked against
the float64 modules first (max |y - ref| / max |ref| <= 1e-4); pytest-benchmark's wall clock, 7 calls after 2
warm-ups, at the process's torch thread count (the table names it). The table's "x median" column is the peer's
median over ours; the target (>= 1x the peer) is printed as met or missed, never asserted.

GPU rows (``-k cuda``; skipped without CUDA, owed to a GPU run): the same layers in bfloat16, channels_last,
ours against the unfused layers on cuDNN (``torch.backends.cudnn.benchmark = True``), CUDA-event timing
(conftest's ``time_gpu_row``).
"""
import pytest
import torch

from deeplab_fast.nn import AtrousSeparableConv2d, FusedSeparableConv2d
from deeplab_fast.ops import separable_conv2d_plan

from conftest import record, time_gpu_row

LAYERS = {  # name: (C, K, size, rate)
    "aspp_r6_resnet": (2048, 256, 33, 6),
    "aspp_r18_resnet": (2048, 256, 33, 18),
    "aspp_r6_mobilenet_v2": (320, 256, 33, 6),
    "decoder_304": (304, 256, 129, 1),
    "decoder_256": (256, 256, 129, 1),
}
CPU_ROUNDS, CPU_WARMUP_ROUNDS = 7, 2
TOL = 1e-4
PEER, OURS = "torch unfused", "deeplab_fast separable_conv2d"


def _layer(name):
    C, K, size, rate = LAYERS[name]
    torch.manual_seed(sum(map(ord, name)))
    m = AtrousSeparableConv2d(C, K, 3, dilation=rate)
    with torch.no_grad():
        for bn in (m.depthwise_bn, m.pointwise_bn):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    x = torch.randn(1, C, size, size, generator=torch.Generator().manual_seed(size))
    return m.eval(), x


def _rel_err(y, ref):
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("impl", [PEER, OURS])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_cpu_separable_conv(benchmark, name, layout, impl):
    module, x = _layer(name)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    fn = module.reference_forward if impl == PEER else FusedSeparableConv2d.from_module(module)
    threads = torch.get_num_threads()
    with torch.no_grad():
        ref = module.double().reference_forward(x.double())
        module.float()
        err = _rel_err(fn(x), ref)
        assert err <= TOL, f"{name} {layout} {impl}: max |y - ref| / max |ref| = {err:.3g}"
        benchmark.pedantic(fn, args=(x,), rounds=CPU_ROUNDS, warmup_rounds=CPU_WARMUP_ROUNDS)
    C, K, size, rate = LAYERS[name]
    info = dict(rel_err=err, checked_against="float64 modules, same input", C=C, K=K, H=size, W=size, rate=rate,
                layout=layout, dtype="float32")
    if impl == OURS:
        info["plan"] = separable_conv2d_plan(x, module.depthwise.weight, None, None, module.pointwise.weight,
                                             padding=rate, dilation=rate)
    record(benchmark, f"cpu separable {name} {C}->{K} r{rate} {size}x{size} {layout}", f"{impl} ({threads} thr)",
           threads=threads, target_speedup=1.0 if impl == OURS else None, **info)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available (owed to a GPU run)")
@pytest.mark.parametrize("impl", [PEER, OURS])
@pytest.mark.parametrize("name", list(LAYERS))
def test_cuda_separable_conv(benchmark, name, impl):
    torch.backends.cudnn.benchmark = True
    module, x = _layer(name)
    with torch.no_grad():
        ref = module.double().reference_forward(x.double()).cuda()
    module = module.to("cuda", torch.bfloat16).to(memory_format=torch.channels_last)
    x = x.to("cuda", torch.bfloat16).contiguous(memory_format=torch.channels_last)
    fn = module.reference_forward if impl == PEER else FusedSeparableConv2d.from_module(module)
    with torch.no_grad():
        err = _rel_err(fn(x), ref)
        assert err <= 3e-2, f"{name} {impl}: max |y - ref| / max |ref| = {err:.3g}"
        times, info = time_gpu_row(benchmark, lambda: fn(x), warmup_rounds=3)
    C, K, size, rate = LAYERS[name]
    record(benchmark, f"gpu separable {name} {C}->{K} r{rate} {size}x{size} bf16", impl, backend="cuda",
           times_s=times, device=torch.cuda.get_device_name(), rel_err=err, **info,
           target_speedup=1.0 if impl == OURS else None)
