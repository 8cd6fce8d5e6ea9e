"""deeplab_fast.optimize: rewrites models into the fused layers with the same outputs, on the CPU.

Every optimized model is compared with the model it came from (the reference: plain torch / torchvision
layers) on fresh random inputs, with every conv weight, conv bias, BN affine parameter and BN running
statistic randomised (``randomize_``) so that BN folding matters. Besides the outputs, the tests check which
modules were replaced, and that nothing else was: the rewrite rules are in deeplab_fast/optimize.py.

Tolerances, per element ``|out - ref| <= tol * (max|ref| + |ref|)``: float32 1e-5 for a few layers, 1e-4
through a ResNet-50 (folded BN rounds differently, and 50 layers compound it); float64 1e-10.
tests/conftest.py sets DEEPLAB_FAST_POISON=1, so the finiteness checks catch op outputs no kernel wrote.
"""
from __future__ import annotations


import pytest
import torch
from torch import nn
from torchvision.models import resnet18, vgg16
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import Bottleneck
from torchvision.models.segmentation import deeplabv3_resnet50
from torchvision.models.segmentation.deeplabv3 import ASPP as TorchvisionASPP

import deeplab_fast
from deeplab_fast import optimize
from deeplab_fast.nn import ASPP, AtrousConv2dReLU
from deeplab_fast.optimize import FusedResNetBlock
from helpers import F64, assert_matches, randomize_, seeded  # noqa: E402



# ----------------------------------------------------------------------------------------------------------
# Helpers










def random_input(N, C, H, W, seed, dtype=torch.float32):
    g = seeded(seed)
    return (torch.randn(N, C, H, W, generator=g, dtype=F64) + 0.2).to(dtype)


def run(model, x):
    with torch.no_grad():
        return model(x)


def count(model, cls) -> int:
    return sum(type(m) is cls for m in model.modules())


def snapshot(model):
    """(module paths and types, training flags, state dict copies): to show a model was left untouched."""
    return ([(n, type(m)) for n, m in model.named_modules()], [m.training for m in model.modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


def assert_same_snapshot(a, b):
    assert a[0] == b[0], "module tree changed"
    assert a[1] == b[1], "training flags changed"
    assert a[2].keys() == b[2].keys()
    for k in a[2]:
        assert torch.equal(a[2][k], b[2][k]), f"{k} changed"


def replacement_lines(out: str):
    return [line for line in out.splitlines() if " -> " in line]


# ----------------------------------------------------------------------------------------------------------
# A small custom model: exactly the eligible chains get fused


class ConvBNReLUBlock(nn.Module):
    """conv -> bn -> relu in a forward optimize cannot see: must not be fused by attribute names."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class SkipSequential(nn.Sequential):
    """A Sequential subclass with its own forward (conv output reused): its children are not a chain."""

    def forward(self, x):
        y = self[0](x)
        return self[2](self[1](y)) + y


def custom_model(seed=0) -> nn.Sequential:
    C = 8
    layers = [
        nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C), nn.ReLU(inplace=True),   # 0-2: fused
        nn.Conv2d(C, C, 3, padding=2, dilation=2), nn.ReLU(),                                   # 3-4: fused
        nn.Conv2d(C, C, 1), nn.BatchNorm2d(C),                                                  # 5-6: fused, no ReLU
        nn.Conv2d(C, C, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(C), nn.ReLU(),      # 7-9: grouped:
                                                                                                 # BN folded
        nn.Conv2d(C, C, 3, padding=1), nn.LeakyReLU(0.1),                                       # 10-11: not ReLU
        ConvBNReLUBlock(C),                                                                     # 12: opaque
        nn.Conv2d(C, C, 3, padding="same", dilation=3, stride=1), nn.BatchNorm2d(C), nn.ReLU(),  # 13-15: fused
        nn.Conv2d(C, C, 3, padding=1, padding_mode="reflect"), nn.ReLU(),                       # 16-17: reflect
        SkipSequential(nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU()),             # 18: own forward
        nn.Conv2d(C, C, 2, padding="valid", stride=(1, 2)), nn.ReLU(),                          # 19-20: fused
        nn.Conv2d(C, 5, 1),                                                                     # 21: lone conv
    ]
    return randomize_(nn.Sequential(*layers), seed).eval()


FUSED_IN_CUSTOM = {0: (1, 2), 3: (4,), 5: (6,), 13: (14, 15), 19: (20,)}
GROUPED_IN_CUSTOM = {7: 8}  # grouped conv -> nn.Conv2d with the BN folded; the BN -> Identity; the ReLU kept


def test_custom_model_fuses_exactly_the_eligible_chains(capsys):
    model = custom_model()
    x = random_input(2, 3, 19, 23, seed=1)
    ref = run(model, x)
    before = snapshot(model)
    opt = optimize(model, verbose=True)
    assert_same_snapshot(before, snapshot(model))  # inplace=False: the original is untouched
    assert type(opt) is nn.Sequential and opt is not model
    assert_matches(run(opt, x), ref, 1e-5, "custom model")

    fused_members = {i for members in FUSED_IN_CUSTOM.values() for i in members}
    for i, (orig, new) in enumerate(zip(model, opt)):
        if i in FUSED_IN_CUSTOM:
            assert type(new) is AtrousConv2dReLU, f"[{i}] {type(orig).__name__} not fused"
            assert new.relu == any(type(model[j]) is nn.ReLU for j in FUSED_IN_CUSTOM[i])
            assert new.bn is None, f"[{i}]: the eval BN was not folded"
            assert (new.stride, new.padding, new.dilation) == (
                orig.stride, {13: (3, 3), 19: (0, 0)}.get(i, orig.padding), orig.dilation)
        elif i in GROUPED_IN_CUSTOM:
            assert type(new) is nn.Conv2d and new.groups == orig.groups and new.bias is not None, f"[{i}]"
        elif i in fused_members or i in GROUPED_IN_CUSTOM.values():
            assert type(new) is nn.Identity, f"[{i}] {type(orig).__name__} should be an Identity placeholder"
        else:
            assert new is not orig and type(new) is type(orig), f"[{i}] {type(orig).__name__} was replaced"
    # the opaque custom module and the Sequential with its own forward kept their children
    assert [type(m) for m in opt[12].children()] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert [type(m) for m in opt[18].children()] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    # untouched children keep their state-dict keys and values
    new_sd, old_sd = opt.state_dict(), model.state_dict()
    for key in ("10.bias", "12.conv.weight", "12.bn.running_mean", "16.weight", "18.1.weight", "21.bias"):
        assert torch.equal(new_sd[key], old_sd[key]), key
    assert not any(k.startswith(("1.", "6.", "8.", "14.")) for k in new_sd), "folded BN left state behind"

    lines = replacement_lines(capsys.readouterr().out)
    assert len(lines) == len(FUSED_IN_CUSTOM) + len(GROUPED_IN_CUSTOM), lines
    assert any("7: grouped Conv2d+BatchNorm2d -> Conv2d (BN folded); 8 -> Identity" in line for line in lines)
    assert "0: Conv2d+BatchNorm2d+ReLU -> AtrousConv2dReLU (BN folded); 1, 2 -> Identity" in lines[0]
    assert "3: Conv2d+ReLU -> AtrousConv2dReLU; 4 -> Identity" in lines[1]
    assert "5: Conv2d+BatchNorm2d -> AtrousConv2dReLU (BN folded); 6 -> Identity" in lines[2]


def test_inplace_returns_the_same_object_and_is_idempotent(capsys):
    model = custom_model()
    x = random_input(1, 3, 16, 16, seed=2)
    ref = run(model, x)
    conv0 = model[0]
    out = optimize(model, inplace=True)
    assert out is model
    assert type(model[0]) is AtrousConv2dReLU and model[0] is not conv0
    assert_matches(run(model, x), ref, 1e-5, "inplace")
    capsys.readouterr()
    again = optimize(model, inplace=True, verbose=True)
    assert again is model
    assert replacement_lines(capsys.readouterr().out) == [], "a second optimize() changed something"
    assert_matches(run(model, x), ref, 1e-5, "optimized twice")


def test_hooked_modules_are_left_alone():
    model = custom_model()
    calls = []
    model[1].register_forward_hook(lambda m, i, o: calls.append("bn"))   # chain 0-2: not fused
    model[4].register_forward_pre_hook(lambda m, i: calls.append("relu"))  # chain 3-4: not fused
    x = random_input(1, 3, 12, 12, seed=3)
    ref = run(model, x)
    opt = optimize(model)
    assert [type(m) for m in list(opt)[:5]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.ReLU]
    assert type(opt[5]) is AtrousConv2dReLU
    calls.clear()
    assert_matches(run(opt, x), ref, 1e-5, "hooked")
    assert calls == ["bn", "relu"], "the hooks no longer run"


def test_dtype_float64_kept():
    model = custom_model().double()
    x = random_input(2, 3, 15, 17, seed=4, dtype=F64)
    opt = optimize(model)
    assert all(p.dtype == F64 and p.device.type == "cpu" for p in opt.parameters())
    assert_matches(run(opt, x), run(model, x), 1e-10, "float64")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_not_a_module_raises():
    for bad in (None, 3, torch.zeros(1), [nn.ReLU()], lambda x: x):
        with pytest.raises(ValueError, match="nn.Module"):
            optimize(bad)
    with pytest.raises(ValueError, match="inplace"):
        optimize(nn.ReLU(), inplace=1)
    with pytest.raises(ValueError, match="verbose"):
        optimize(nn.ReLU(), verbose="yes")
    with pytest.raises(ValueError, match="TorchScript"):
        optimize(torch.jit.script(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())))


def test_exported():
    assert deeplab_fast.optimize is optimize and "optimize" in deeplab_fast.__all__


# ----------------------------------------------------------------------------------------------------------
# Training mode: BN is kept inside the fused layer, so training and eval both behave as before


def test_training_mode_keeps_batchnorm():
    model = custom_model().train()
    model[8].eval()  # a frozen BN in a training model (not in a fusable chain: the grouped conv)
    model[6].eval()  # a frozen BN in a fusable chain: kept as a module too (the chain trains)
    opt = optimize(model)
    assert opt.training
    assert opt[0].training and opt[0].bn is not None and opt[0].bn.training
    assert opt[5].training and opt[5].bn is not None and not opt[5].bn.training
    assert not opt[8].training
    # flags of every module that is still there
    for (name, m) in model.named_modules():
        if name and int(name.split(".")[0]) not in {1, 2, 4, 6, 14, 15, 20} | set(FUSED_IN_CUSTOM):
            assert opt.get_submodule(name).training == m.training, name
    # parameters and BN modules are those of the original (in the copy), not folded ones
    assert set(n for n, _ in opt.named_parameters()) >= {"0.weight", "0.bn.weight", "0.bn.bias", "5.bn.weight"}

    x = random_input(4, 3, 13, 11, seed=5).requires_grad_()
    ref = model(x)
    out = opt(x)
    assert_matches(out, ref, 1e-5, "training mode (batch statistics)")
    for i, j in ((1, 0), (14, 13)):  # running statistics updated alike
        assert_matches(opt[j].bn.running_mean, model[i].running_mean, 1e-5, f"running_mean [{i}]")
        assert_matches(opt[j].bn.running_var, model[i].running_var, 1e-5, f"running_var [{i}]")
    g = random_input(*ref.shape, seed=6)
    (ref * g).sum().backward()
    (out * g).sum().backward()
    assert_matches(opt[0].weight.grad, model[0].weight.grad, 1e-4, "conv weight grad")
    assert_matches(opt[0].bn.weight.grad, model[1].weight.grad, 1e-4, "bn weight grad")
    assert_matches(opt[5].bn.weight.grad, model[6].weight.grad, 1e-4, "frozen bn weight grad")

    model.eval()
    opt.eval()
    x = random_input(2, 3, 13, 11, seed=7)
    assert_matches(run(opt, x), run(model, x), 1e-5, "eval after optimizing in training mode")


# ----------------------------------------------------------------------------------------------------------
# torchvision models


@pytest.fixture(scope="module")
def tv_deeplab():
    torch.manual_seed(0)
    model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=5, aux_loss=True)
    return randomize_(model, 11).eval()


def test_torchvision_deeplabv3(tv_deeplab, capsys):
    x = random_input(1, 3, 65, 65, seed=12)
    ref = run(tv_deeplab, x)
    before = snapshot(tv_deeplab)
    opt = optimize(tv_deeplab, verbose=True)
    assert_same_snapshot(before, snapshot(tv_deeplab))
    assert type(opt) is type(tv_deeplab) and not opt.training
    out = run(opt, x)
    assert out.keys() == ref.keys() == {"out", "aux"}
    for k in ("out", "aux"):
        assert_matches(out[k], ref[k], 1e-4, k)
    assert_same_snapshot(before, snapshot(tv_deeplab))
    for k, v in run(tv_deeplab, x).items():  # the original still gives its outputs
        assert torch.equal(v, ref[k]), k

    # the ASPP head was swapped, its weights carried over
    assert type(opt.classifier[0]) is ASPP and count(opt, TorchvisionASPP) == 0
    tv_aspp_sd = tv_deeplab.classifier[0].state_dict()
    for k, v in opt.classifier[0].state_dict().items():
        assert torch.equal(v, tv_aspp_sd[k]), k
    # 16 Bottlenecks x 3 chains + 4 downsamples + the stem + DeepLabHead's and FCNHead's conv+BN+ReLU
    assert count(opt, FusedResNetBlock) == 16
    assert count(opt, AtrousConv2dReLU) == 16 * 3 + 4 + 1 + 1 + 1 == 55
    # every BN but the ASPP's (the fused ASPP folds its own) was folded away
    outside_aspp = [n for n, m in opt.named_modules()
                    if isinstance(m, nn.BatchNorm2d) and not n.startswith("classifier.0.")]
    assert outside_aspp == []
    assert all(not m.training for m in opt.modules())

    lines = replacement_lines(capsys.readouterr().out)
    assert len(lines) == 55 + 16 + 1
    assert "classifier.0: torchvision ASPP -> deeplab_fast.nn.ASPP" in "\n".join(lines)
    assert any("backbone.conv1: Conv2d+BatchNorm2d+ReLU -> AtrousConv2dReLU (BN folded)" in s for s in lines)
    assert any("backbone.layer4.2: Bottleneck -> FusedResNetBlock" in s for s in lines)
    assert any("backbone.layer3.0.conv3: Conv2d+BatchNorm2d -> AtrousConv2dReLU" in s for s in lines)
    assert any("classifier.1: Conv2d+BatchNorm2d+ReLU -> AtrousConv2dReLU" in s for s in lines)
    assert any("aux_classifier.0: Conv2d+BatchNorm2d+ReLU -> AtrousConv2dReLU" in s for s in lines)


def test_torchvision_vgg16_features():
    torch.manual_seed(1)
    features = randomize_(vgg16(weights=None).features, 13).eval()
    x = random_input(1, 3, 40, 40, seed=14)
    ref = run(features, x)
    opt = optimize(features)
    assert count(opt, AtrousConv2dReLU) == 13 and count(opt, nn.Conv2d) == 0 and count(opt, nn.ReLU) == 0
    assert count(opt, nn.MaxPool2d) == 5
    assert_matches(run(opt, x), ref, 1e-5, "vgg16 features")


def test_intermediate_layer_getter_and_basic_blocks():
    """IntermediateLayerGetter returns bn1's output: the stem chain may end at bn1 but not pass it."""
    torch.manual_seed(2)
    body = IntermediateLayerGetter(resnet18(weights=None), {"bn1": "stem", "layer2": "feat"})
    body = randomize_(body, 15).eval()
    x = random_input(2, 3, 40, 36, seed=16)
    ref = run(body, x)
    opt = optimize(body)
    assert type(opt.conv1) is AtrousConv2dReLU and not opt.conv1.relu
    assert type(opt.bn1) is nn.Identity and type(opt.relu) is nn.ReLU
    assert count(opt, FusedResNetBlock) == 4  # layer1, layer2: 2 BasicBlocks each
    assert count(opt, AtrousConv2dReLU) == 1 + 4 * 2 + 1  # stem, 2 chains per block, layer2's downsample
    out = run(opt, x)
    for k in ("stem", "feat"):
        assert_matches(out[k], ref[k], 1e-5, k)


def test_bottleneck_with_grouped_conv_and_hooks():
    """ResNeXt-style Bottleneck: conv1 and conv3 chains fused, bn2 folded into the grouped conv2, relu kept."""
    torch.manual_seed(3)
    blocks = nn.Sequential(Bottleneck(64, 16, groups=4), Bottleneck(64, 16))
    blocks = randomize_(blocks, 17).eval()
    blocks[1].register_forward_hook(lambda m, i, o: None)  # a hooked block is not replaced
    x = random_input(1, 64, 9, 10, seed=18)
    ref = run(blocks, x)
    opt = optimize(blocks)
    assert type(opt[0]) is FusedResNetBlock and type(opt[1]) is Bottleneck
    assert [type(m) for m in opt[0].body] == [AtrousConv2dReLU, nn.Conv2d, nn.ReLU, AtrousConv2dReLU]
    assert opt[0].body[1].groups == 4 and opt[0].body[1].bias is not None
    assert opt[0].body[0].relu and not opt[0].body[3].relu
    assert_matches(run(opt, x), ref, 1e-5, "bottlenecks")


# ----------------------------------------------------------------------------------------------------------
# The ASPP swap


def test_aspp_swap_matches_torchvision():
    torch.manual_seed(4)
    tv = randomize_(TorchvisionASPP(24, [2, 3, 5], 16), 19).eval()
    model = nn.Sequential(tv, nn.Conv2d(16, 3, 1)).eval()
    x = random_input(2, 24, 11, 13, seed=20)
    ref = run(model, x)
    opt = optimize(model)
    assert type(opt[0]) is ASPP and opt[0].atrous_rates == (2, 3, 5)
    assert not any(m.training for m in opt.modules())
    assert_matches(run(opt, x), ref, 1e-5, "ASPP swap")
    assert_matches(run(opt[0], x), run(tv, x), 1e-5, "ASPP alone")


def test_aspp_swap_keeps_training_flags_and_requires_grad():
    tv = randomize_(TorchvisionASPP(8, [1, 2, 3], 8), 21).train()
    tv.convs[1][1].eval()  # a frozen BN
    tv.project[0].weight.requires_grad_(False)
    opt = optimize(nn.Sequential(tv))
    new = opt[0]
    assert type(new) is ASPP
    old_flags = {n: m.training for n, m in tv.named_modules()}
    assert {n: m.training for n, m in new.named_modules()} == old_flags
    assert {n: p.requires_grad for n, p in new.named_parameters()} == {
        n: p.requires_grad for n, p in tv.named_parameters()}


def test_aspp_not_swappable_gets_its_chains_fused():
    """torchvision's ASPP takes any number of rates, ours 3: with 2 it stays, its Sequentials are fused."""
    torch.manual_seed(5)
    tv = randomize_(TorchvisionASPP(12, [2, 4], 8), 22).eval()
    x = random_input(1, 12, 10, 9, seed=23)
    ref = run(tv, x)
    opt = optimize(nn.Sequential(tv))[0]
    assert type(opt) is TorchvisionASPP
    assert count(opt, AtrousConv2dReLU) == 5  # 1x1, 2 atrous, pooling, projection
    assert count(opt, nn.BatchNorm2d) == 0
    assert_matches(run(opt, x), ref, 1e-5, "ASPP with 2 rates")


# ---- deeplab_fast's own models -------------------------------------------------------------------------


@pytest.mark.parametrize("name,kwargs", [
    ("deeplab_v1_largefov", {}),
    ("deeplab_v1_msc_largefov", {}),
    ("deeplab_v2_resnet101", {"msc": True}),
    ("deeplab_v3_resnet50", {"aux_loss": True}),
    ("deeplab_v3_resnet50", {"head": "paper", "output_stride": 16}),
])
def test_optimize_deeplab_fast_models(name, kwargs):
    """optimize() on this library's models: the same eval outputs, with their conv chains and ResNet blocks
    fused (BN statistics randomised so that folding matters)."""
    from deeplab_fast import models
    from deeplab_fast.models.backbones import Bottleneck

    torch.manual_seed(0)
    model = models.get_model(name, num_classes=5, **kwargs)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    model.eval()
    fast = optimize(model)
    x = torch.randn(1, 3, 49, 57, generator=g)
    with torch.no_grad():
        ref, out = model(x), fast(x)
    refs = ref if isinstance(ref, dict) else {"out": ref}
    outs = out if isinstance(out, dict) else {"out": out}
    assert refs.keys() == outs.keys()
    for k in refs:
        scale = refs[k].abs().max().item()
        assert scale > 0
        assert (outs[k] - refs[k]).abs().max().item() <= 1e-4 * scale, k
    fused = sum(isinstance(m, AtrousConv2dReLU) for m in fast.modules())
    assert fused > 0
    if "resnet" in name:
        assert not any(isinstance(m, Bottleneck) for m in fast.modules()), "ResNet blocks left unfused"
