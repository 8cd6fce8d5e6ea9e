"""DeepLab models, images/s: deeplab_fast's model (``deeplab_fast.optimize``), the same architecture in plain torch
(the model as built, ``optimize`` off), torchvision's model where it has one, and the v2 network + dense CRF.

Every model of ``deeplab_fast.models.MODELS`` at 513x513, in one process on the same input. The headline run
times one model (``deeplab_v3_resnet50``, batch 1, against torchvision's); ``--full`` every model. Batches: 1 on
the CPU (batch 16 takes about 10 minutes per model on 2 cores: ``DEEPLAB_FAST_BENCH_BATCHES=1,16`` adds it), 1 and
16 on the GPU (``DEEPLAB_FAST_BENCH_BATCHES`` sets both, comma-separated).
- CPU: float32, NCHW; timed by pytest-benchmark (wall clock, 3 calls after a warm-up).
- GPU (``-k "cuda or gpu"``; skip without CUDA): bfloat16, channels_last; timed with CUDA events after warm-up
  (``conftest.cuda_timed``). Target (the issue, DeepLabV3-ResNet101 at 513x513, batch 16, bf16): >= 1.3x
  torchvision eager and >= 1.1x torchvision under ``torch.compile(mode="max-autotune")`` (a GPU-only row;
  ``DEEPLAB_FAST_BENCH_NO_COMPILE=1`` skips it).
- torchvision rows: DeepLabV3 ResNet-50/101 only (torchvision's other DeepLab models do not exist), with the same
  weights as ours (loaded from ours), so the outputs are compared too.
- The v2 + CRF row: ``deeplab_v2_resnet101`` then ``DenseCRF.from_preset("deeplab_v2_voc")`` on random RGB.
Correctness first: each row's output is compared with the plain-torch model's (float32: 1e-4 relative; bf16:
2e-2). With ``--benchmark-disable`` (CI's smoke run) the cases shrink to 65x65 at batch 1 (batch 16 rows skip),
so the whole file stays quick; the full sizes need a timed run.
"""
import os
import statistics

import pytest
import torch

import deeplab_fast
from deeplab_fast import models
from deeplab_fast.benchmark import torchvision_model
from deeplab_fast.nn import DenseCRF

from conftest import FULL, cuda_timed, gpu_description, needs_cuda, no_compile, randomise_bn_, record

SIZE, SMOKE_SIZE = 513, 65
# DEEPLAB_FAST_BENCH_BATCHES (comma-separated) sets the batch sizes; default 1 on the CPU, 1 and 16 on the GPU.
_BATCHES = os.environ.get("DEEPLAB_FAST_BENCH_BATCHES")
CPU_BATCHES = tuple(int(b) for b in (_BATCHES or "1").split(","))
GPU_BATCHES = tuple(int(b) for b in (_BATCHES or "1,16").split(","))
HEADLINE = ("deeplab_v3_resnet50", 1)  # the headline run's model and batch on the CPU
GPU_HEADLINE = "deeplab_v3_resnet101"  # and on the GPU (both batches: the target is at batch 16)
NUM_CLASSES = 21
OURS, PLAIN, TORCHVISION, CRF = "deeplab_fast (optimize)", "plain torch", "torchvision", "deeplab_fast + dense CRF"
TV_COMPILED = "torchvision (max-autotune)"
TV_NAMES = {"deeplab_v3_resnet50": "deeplabv3_resnet50", "deeplab_v3_resnet101": "deeplabv3_resnet101"}


_cache: dict = {}


def build(name: str, impl: str, device, dtype):
    """(callable, plain reference module) for one row; the plain model is built once per model name."""
    key = (name, str(device), dtype)
    if key not in _cache:
        _cache.clear()
        torch.manual_seed(0)
        plain = randomise_bn_(models.get_model(name, num_classes=NUM_CLASSES), torch.Generator().manual_seed(0)).eval()
        fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        _cache[key] = {"plain": plain.to(device=device, dtype=dtype, memory_format=fmt), "fmt": fmt}
    entry = _cache[key]
    plain = entry["plain"]
    if impl == PLAIN:
        return plain, plain
    if impl in (OURS, CRF):
        if "ours" not in entry:
            entry["ours"] = deeplab_fast.optimize(plain)
        return entry["ours"], plain
    try:
        tv = torchvision_model(name, NUM_CLASSES, python_only=True)
    except RuntimeError as e:  # torchvision missing: the row says so
        pytest.skip(str(e))
    if tv is None:
        pytest.skip(f"torchvision has no {name}")
    tv.load_state_dict(plain.state_dict(), strict=True)  # the same weights: key-compatible by design
    tv = tv.eval().to(device=device, dtype=dtype, memory_format=entry["fmt"])
    if impl == TV_COMPILED:
        return torch.compile(tv, mode="max-autotune"), plain
    return tv, plain


def _out(y):
    return y["out"] if isinstance(y, dict) else y


def _case_ids(gpu: bool):
    for name in sorted(models.MODELS):
        for batch in GPU_BATCHES if gpu else CPU_BATCHES:
            impls = [OURS, PLAIN] + ([TORCHVISION] if name in TV_NAMES else []) + (
                [TV_COMPILED] if gpu and name in TV_NAMES else []) + ([CRF] if name.startswith("deeplab_v2") else [])
            for impl in impls:
                tag = {OURS: "ours", PLAIN: "plain", TORCHVISION: "torchvision", TV_COMPILED: "torchvision-compiled",
                       CRF: "ours+crf"}[impl]
                headline = name == GPU_HEADLINE if gpu else (name, batch) == HEADLINE
                marks = () if headline else FULL
                yield pytest.param(name, batch, impl, id=f"{name}-b{batch}-{tag}", marks=marks)


def _run(benchmark, name, batch, impl, device, dtype, tol):
    smoke = benchmark.disabled
    if smoke and batch > 1:
        pytest.skip("smoke run (--benchmark-disable): batch 1 only")
    size = SMOKE_SIZE if smoke else SIZE
    fn_model, plain = build(name, impl, device, dtype)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    x = x.to(device=device, dtype=dtype).contiguous(memory_format=_cache[(name, str(device), dtype)]["fmt"])
    with torch.no_grad():
        ref = _out(plain(x)).float()
        y = _out(fn_model(x)).float()
    assert y.shape == (batch, NUM_CLASSES, size, size)
    err = ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
    assert err <= tol, f"{name} {impl}: relative error {err:.2e} vs the plain-torch model"
    if impl == CRF:
        layer = DenseCRF.from_preset("deeplab_v2_voc")
        image = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8,
                              generator=torch.Generator().manual_seed(2)).to(device)

        def call():
            with torch.no_grad():
                return layer(_out(fn_model(x)).float(), image)
    else:
        def call():
            with torch.no_grad():
                return fn_model(x)
    return call, size, err


@pytest.mark.parametrize("name,batch,impl", list(_case_ids(gpu=False)))
def test_cpu_model_fps(benchmark, name, batch, impl):
    call, size, err = _run(benchmark, name, batch, impl, torch.device("cpu"), torch.float32, 1e-4)
    benchmark.pedantic(call, rounds=3, warmup_rounds=1)
    record(benchmark, f"cpu {name} {size}x{size} batch {batch}", impl, threads=torch.get_num_threads(),
           batch=batch, rel_err_vs_plain=err)


@needs_cuda
@pytest.mark.parametrize("name,batch,impl", list(_case_ids(gpu=True)))
def test_cuda_model_fps(benchmark, name, batch, impl):
    device = torch.device("cuda")
    if impl == TV_COMPILED and no_compile():
        pytest.skip("DEEPLAB_FAST_BENCH_NO_COMPILE is set")
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        call, size, err = _run(benchmark, name, batch, impl, device, torch.bfloat16, 2e-2)
        rounds = 10 if batch == 1 else 5
        _, times = cuda_timed(benchmark, call, rounds=rounds, warmup_rounds=3)
    finally:
        torch.backends.cudnn.benchmark = old
    target = ("DeepLabV3-R101 b16: ours >= 1.3x torchvision eager, >= 1.1x max-autotune"
              if (name, batch) == ("deeplab_v3_resnet101", 16) else None)
    record(benchmark, f"gpu {name} {size}x{size} batch {batch} bf16", impl, backend="cuda",
           device=gpu_description(), times_s=times or None, batch=batch, rel_err_vs_plain=err,
           target=target, median_ms=1e3 * statistics.median(times) if times else None)
