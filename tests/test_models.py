"""deeplab_fast.models: the DeepLab v1/v2/v3 models, their backbones and weight loading, on the CPU.

References, all independent of the code under test, on fresh seeded random weights and inputs (never zeros):
- torchvision (``deeplabv3_resnet50/101``, ``resnet50/101``, ``vgg16``): its state dicts load with strict=True and
  its outputs (``out`` and ``aux``) agree in float32. Every conv weight, BN affine parameter and BN running
  statistic is randomised (``randomize_``), so eval-mode BN is non-trivial.
- DeepLab v1: a float64 re-statement of the Caffe DeepLab-LargeFOV / MSc-LargeFOV definitions written here with
  ``F.conv2d`` / ``F.max_pool2d`` / ``F.avg_pool2d`` (``largefov_reference``).
- DeepLab v2: a re-statement of kazuto1011/deeplab-pytorch's module tree (``_KDeepLabV2``, ``_KMSC``, written
  here from that repository's structure: stride in ``reduce``, dilation on every block, ceil-mode stem pool,
  ``MSC`` as ``base``), so its state dict has kazuto1011's key names; MSC against the single-scale network run
  by hand at each scale.
- Shapes at the odd sizes 321x321, 375x500 and 513x513 for every model and output stride on the ``meta`` device
  (shape functions only, no arithmetic), plus a few real runs at those sizes.

Tolerance: per element ``|out - ref| <= tol * (max|ref| + |ref|)``; 1e-5 in float32, 1e-9 in float64.
"""
from __future__ import annotations

import copy
import math
import re
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from deeplab_fast.models import (LRASPP, MODELS, VGG16_CONV_INDICES, DeepLabV1, DeepLabV2, DeepLabV3,
                                 DeepLabV3MobileNetV3, DeepLabV3Plus,
                                 convert_kazuto_deeplabv2, deeplab_v1_largefov, deeplab_v1_msc_largefov,
                                 deeplab_v2_resnet101, deeplab_v3_resnet50, deeplab_v3_resnet101,
                                 from_torchvision, get_model, load_checkpoint, load_torchvision_deeplabv3,
                                 load_vgg16_features, load_weights, resnet50, resnet101, to_kazuto_deeplabv2,
                                 vgg16_features)
from helpers import F64, assert_matches, seeded  # noqa: E402
from helpers import randomize_ as _randomize_  # noqa: E402

TOL32 = 1e-5  # DEVELOPERS.md: float32 well under 1e-4 relative
TOL64 = 1e-9
SIZES = [(321, 321), (375, 500), (513, 513)]  # H x W; 375 x 500 is a PASCAL VOC image


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# ----------------------------------------------------------------------------------------------------------
# Helpers




def random_input(N, H, W, seed, C=3, dtype=torch.float32):
    return torch.randn(N, C, H, W, generator=seeded(seed), dtype=F64).to(dtype)







def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """He-scaled weights (O(1) activations through deep nets) and randomised BN statistics (tests/helpers.py)."""
    return _randomize_(module, seed, gain=2.0, spread=0.2, var_low=0.5)


def block_dilations(layer: nn.Sequential):
    return tuple(int(b.conv2.dilation[0]) for b in layer)


# ----------------------------------------------------------------------------------------------------------
# Fixtures: torchvision models with random weights (module scope: built once)


@pytest.fixture(scope="module")
def tv_deeplab50():
    m = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, aux_loss=True)
    return randomize_(m, 1).eval()


@pytest.fixture(scope="module")
def tv_deeplab101():
    m = torchvision.models.segmentation.deeplabv3_resnet101(weights=None, weights_backbone=None, aux_loss=True)
    return randomize_(m, 2).eval()


@pytest.fixture(scope="module")
def tv_vgg16():
    return randomize_(torchvision.models.vgg16(), 3).eval()


# ----------------------------------------------------------------------------------------------------------
# Registry and bad input


def test_registry():
    classes = {"deeplab_v1_largefov": DeepLabV1, "deeplab_v1_msc_largefov": DeepLabV1,
               "deeplab_v2_resnet101": DeepLabV2, "deeplab_v3_resnet50": DeepLabV3, "deeplab_v3_resnet101": DeepLabV3,
               "deeplab_v3_mobilenet_v3_large": DeepLabV3MobileNetV3, "lraspp_mobilenet_v3_large": LRASPP,
               "deeplab_v3plus_resnet50": DeepLabV3Plus, "deeplab_v3plus_resnet101": DeepLabV3Plus,
               "deeplab_v3plus_mobilenet_v2": DeepLabV3Plus}
    assert set(MODELS) == set(classes)
    with torch.device("meta"):
        for name, cls in classes.items():
            m = get_model(name, num_classes=7)
            assert type(m) is cls and m.arch == name and m.num_classes == 7
            assert isinstance(m.output_stride, int)
    with pytest.raises(ValueError, match="unknown model 'deeplab_v4'.*deeplab_v1_largefov.*deeplab_v3_resnet101"):
        get_model("deeplab_v4")


@pytest.fixture(scope="module")
def meta_models():
    with torch.device("meta"):
        return {name: get_model(name, num_classes=5).eval() for name in MODELS}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bad_input(meta_models, name):
    m = meta_models[name]
    for C in (1, 4):
        with pytest.raises(ValueError, match=f"non-RGB input: expected 3 channels.*got {C} channels"):
            m(torch.empty(1, C, 33, 33, device="meta"))
    with pytest.raises(ValueError, match="4-D image batch.*3-D"):
        m(torch.empty(3, 33, 33, device="meta"))
    with pytest.raises(ValueError, match="floating point"):
        m(torch.zeros(1, 3, 33, 33, dtype=torch.uint8))
    with pytest.raises(ValueError, match="empty input"):
        m(torch.empty(0, 3, 33, 33, device="meta"))
    with pytest.raises(ValueError, match="torch.Tensor"):
        m([[1.0]])


def test_bad_arguments():
    with torch.device("meta"):
        for os_ in (4, 32, 0, True, "16"):
            with pytest.raises(ValueError, match="output_stride must be 8 or 16"):
                deeplab_v3_resnet50(output_stride=os_)
            with pytest.raises(ValueError, match="output_stride must be 8 or 16"):
                deeplab_v3_resnet101(output_stride=os_, head="paper")
        with pytest.raises(ValueError, match="head must be"):
            deeplab_v3_resnet50(head="v3+")
        with pytest.raises(ValueError, match="multi_grid needs one rate per layer4 block"):
            deeplab_v3_resnet50(multi_grid=(1, 2))
        with pytest.raises(ValueError, match="aspp must be 'L'"):
            deeplab_v2_resnet101(aspp="M")
        with pytest.raises(ValueError, match="msc_scales"):
            deeplab_v2_resnet101(msc=True, msc_scales=(0.5, 1.5))
        with pytest.raises(ValueError, match="num_classes must be a positive int"):
            deeplab_v1_largefov(num_classes=0)
        with pytest.raises(ValueError, match="replace_stride_with_dilation"):
            resnet50(replace_stride_with_dilation=(True, True))
        with pytest.raises(ValueError, match="style"):
            resnet101(style="mxnet")


# ----------------------------------------------------------------------------------------------------------
# Shapes


def caffe_resnet_os8_size(n):
    """Caffe ResNet at output stride 8: conv1 7x7/2 pad 3, max-pool 3/2 pad 1 in ceil mode (a window may not start
    in the padding), the 1x1/2 of layer2."""
    n = (n + 2 * 3 - 7) // 2 + 1
    p = -(-(n + 2 - 3) // 2) + 1
    if (p - 1) * 2 >= n + 1:
        p -= 1
    return (p - 1) // 2 + 1


def _out(y):
    return y["out"] if isinstance(y, dict) else y


V3_CONFIGS = [dict(), dict(output_stride=16), dict(head="paper"), dict(head="paper", output_stride=8, aux_loss=True)]


@pytest.mark.parametrize("name,kwargs", [("deeplab_v1_largefov", {}), ("deeplab_v1_msc_largefov", {}),
                                         ("deeplab_v2_resnet101", {}), ("deeplab_v2_resnet101", {"msc": True}),
                                         ("deeplab_v2_resnet101", {"backbone_style": "torchvision"})]
                         + [(n, kw) for n in ("deeplab_v3_resnet50", "deeplab_v3_resnet101") for kw in V3_CONFIGS])
def test_shapes_meta(name, kwargs):
    """Every model, output stride and odd size on the meta device (shape functions only)."""
    with torch.device("meta"):
        m = get_model(name, num_classes=5, **kwargs).eval()
    for H, W in SIZES:
        x = torch.empty(2, 3, H, W, device="meta")
        y = m(x)
        assert tuple(_out(y).shape) == (2, 5, H, W), f"{name} {kwargs} at {H}x{W}"
        if name.startswith("deeplab_v3"):  # torchvision's return: an OrderedDict, "aux" with aux_loss only
            assert isinstance(y, OrderedDict) and set(y) == ({"out", "aux"} if kwargs.get("aux_loss") else {"out"})
        for k in set(y) - {"out"} if isinstance(y, dict) else ():
            assert tuple(y[k].shape) == (2, 5, H, W)
        lo = m.forward_logits(x)
        if isinstance(m, DeepLabV2) and m.backbone_style == "caffe":  # ceil-mode stem pool: Caffe's sizes
            assert tuple(lo.shape[-2:]) == (caffe_resnet_os8_size(H), caffe_resnet_os8_size(W))
        else:
            assert tuple(lo.shape[-2:]) == (math.ceil(H / m.output_stride), math.ceil(W / m.output_stride))
    if isinstance(m, DeepLabV2) and m.msc:
        outs = m.train()(torch.empty(1, 3, 321, 321, device="meta"))
        assert [tuple(o.shape[-2:]) for o in outs] == [(41, 41), (21, 21), (31, 31), (41, 41)]


def test_v1_feature_map_65_at_513():
    """Real run: LargeFOV scores at 1/8 are 65x65 for a 513x513 input; the logits are at 513x513."""
    m = deeplab_v1_largefov(num_classes=5).eval()
    seen = {}
    m.fc8.register_forward_hook(lambda mod, inp, out: seen.update(fc8=out.shape))  # returns None: output kept
    y = m(random_input(1, 513, 513, 10))
    assert seen["fc8"] == (1, 5, 65, 65)
    assert y.shape == (1, 5, 513, 513) and torch.isfinite(y).all()
    assert m.output_stride == 8


def test_real_shapes_odd_sizes():
    """Real runs at the odd sizes (one per model family; the meta test covers the full matrix)."""
    m = deeplab_v1_msc_largefov(num_classes=5).eval()
    assert m(random_input(1, 375, 500, 11)).shape == (1, 5, 375, 500)
    m = deeplab_v2_resnet101(num_classes=5, msc=True).eval()
    assert m(random_input(1, 321, 321, 12)).shape == (1, 5, 321, 321)
    m = deeplab_v3_resnet50(num_classes=5, head="paper").eval()
    y = m(random_input(1, 375, 500, 13))["out"]
    assert y.shape == (1, 5, 375, 500) and torch.isfinite(y).all()


# ----------------------------------------------------------------------------------------------------------
# Structure: dilations, rates, receptive fields


def test_v1_structure():
    with torch.device("meta"):
        m = deeplab_v1_msc_largefov(num_classes=5)
    assert m.fc6.dilation == (12, 12) and m.fc6.padding == (12, 12) and m.fc6.out_channels == 1024
    assert m.fc7.kernel_size == (1, 1) and m.fc7.out_channels == 1024 and m.fc8.out_channels == 5
    convs = [i for i, l in enumerate(m.features) if isinstance(l, nn.Conv2d)]
    assert tuple(convs) == VGG16_CONV_INDICES
    for i in (24, 26, 28):
        assert m.features[i].dilation == (2, 2) and m.features[i].padding == (2, 2)
    pools = {i: (l.kernel_size, l.stride, l.padding) for i, l in enumerate(m.features)
             if isinstance(l, nn.MaxPool2d)}
    assert pools == {4: (3, 2, 1), 9: (3, 2, 1), 16: (3, 2, 1), 23: (3, 1, 1), 30: (3, 1, 1)}
    pool5a = m.head.pool5a
    assert isinstance(pool5a, nn.AvgPool2d) and pool5a.kernel_size == 3 and pool5a.stride == 1 and pool5a.padding == 1
    assert [n for n, _ in m.head.named_children()] == ["pool5a", "fc6", "relu6", "drop6", "fc7", "relu7", "drop7"]
    strides = {k: b[0].stride[0] for k, b in m.msc.items()}
    assert strides == {"data": 8, "pool1": 4, "pool2": 2, "pool3": 1, "pool4": 1}


def test_v3_rates_and_multigrid():
    with torch.device("meta"):
        tv_default = deeplab_v3_resnet101()
        p16 = deeplab_v3_resnet101(head="paper")
        p8 = deeplab_v3_resnet101(head="paper", output_stride=8)
        tv16 = deeplab_v3_resnet50(output_stride=16)
        tv_mg = deeplab_v3_resnet50(output_stride=16, multi_grid=(1, 2, 4))
    # torchvision's head and dilations: OS 8, no multi-grid, first block of a dilated stage at the old dilation
    assert tv_default.output_stride == 8 and tv_default.atrous_rates == (12, 24, 36)
    assert [len(getattr(tv_default.backbone, f"layer{i}")) for i in range(1, 5)] == [3, 4, 23, 3]
    assert [len(getattr(tv16.backbone, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert block_dilations(tv_default.backbone.layer3) == (1,) + (2,) * 22
    assert block_dilations(tv_default.backbone.layer4) == (2, 4, 4)
    assert tv_default.backbone.layer3[0].conv2.stride == (1, 1)
    assert tv16.output_stride == 16 and block_dilations(tv16.backbone.layer4) == (1, 2, 2)
    assert tv16.backbone.layer3[0].conv2.stride == (2, 2) and tv16.atrous_rates == (12, 24, 36)
    # the paper's head: rates 6/12/18 at OS 16, doubled at OS 8; multi-grid (1, 2, 4) on layer4
    assert p16.output_stride == 16 and p16.atrous_rates == (6, 12, 18)
    assert p8.output_stride == 8 and p8.atrous_rates == (12, 24, 36)
    assert block_dilations(p16.backbone.layer4) == (2, 4, 8)
    assert block_dilations(p8.backbone.layer4) == (4, 8, 16)
    assert block_dilations(tv_mg.backbone.layer4) == (2, 4, 8)
    for m in (p16, p8):
        assert len(m.classifier) == 2 and m.classifier[1].out_channels == 21
        for conv, r in zip(list(m.classifier[0].convs)[1:4], m.atrous_rates):
            assert conv[0].dilation == (r, r) and conv[0].padding == (r, r)


def test_v2_structure():
    with torch.device("meta"):
        caffe = deeplab_v2_resnet101(num_classes=5)
        small = deeplab_v2_resnet101(num_classes=5, aspp="S")
        tvs = deeplab_v2_resnet101(num_classes=5, backbone_style="torchvision")
    assert caffe.output_stride == 8 and caffe.aspp.atrous_rates == (6, 12, 18, 24)
    assert small.aspp.atrous_rates == (2, 4, 8, 12)
    b = caffe.backbone
    assert b.maxpool.ceil_mode and b.layer2[0].conv1.stride == (2, 2) and b.layer2[0].conv2.stride == (1, 1)
    assert block_dilations(b.layer3) == (2,) * 23 and block_dilations(b.layer4) == (4,) * 3
    t = tvs.backbone
    assert not t.maxpool.ceil_mode and t.layer2[0].conv1.stride == (1, 1) and t.layer2[0].conv2.stride == (2, 2)
    assert block_dilations(t.layer3) == (1,) + (2,) * 22 and block_dilations(t.layer4) == (2, 4, 4)
    assert not hasattr(b, "fc") and not any(k.startswith(("fc.", "avgpool")) for k in b.state_dict())


# ----------------------------------------------------------------------------------------------------------
# torchvision equivalence


def test_resnet_backbones_match_torchvision():
    for ours_fn, tv_fn, rswd, seed in [(resnet101, torchvision.models.resnet101, [False, False, False], 20),
                                       (resnet50, torchvision.models.resnet50, [False, True, True], 21)]:
        tv = randomize_(tv_fn(replace_stride_with_dilation=rswd), seed).eval()
        ours = ours_fn(replace_stride_with_dilation=rswd).eval()
        assert list(ours.state_dict()) == list(tv.state_dict())
        ours.load_state_dict(tv.state_dict(), strict=True)
        x = random_input(1, 65, 65, seed)
        assert_matches(ours(x), tv(x), TOL32, f"{ours_fn.__name__} {rswd}")
        for name in ("layer1", "layer2", "layer3", "layer4"):
            assert block_dilations(getattr(ours, name)) == block_dilations(getattr(tv, name))


def _check_deeplab_equal(ours, tv, x, what):
    y, ref = ours(x), tv(x)
    assert set(y) == {"out", "aux"}
    assert_matches(y["out"], ref["out"], TOL32, f"{what} out")
    assert_matches(y["aux"], ref["aux"], TOL32, f"{what} aux")


@pytest.mark.parametrize("depth", [50, 101])
def test_deeplabv3_matches_torchvision(depth, tv_deeplab50, tv_deeplab101):
    tv = tv_deeplab50 if depth == 50 else tv_deeplab101
    builder = deeplab_v3_resnet50 if depth == 50 else deeplab_v3_resnet101
    ours = builder(num_classes=21, aux_loss=True).eval()
    assert list(ours.state_dict()) == list(tv.state_dict())
    ours.load_state_dict(tv.state_dict(), strict=True)  # plain torch, strict
    x = random_input(1, 65, 65, 30 + depth)
    _check_deeplab_equal(ours, tv, x, f"resnet{depth} load_state_dict")
    ours2 = load_torchvision_deeplabv3(builder(num_classes=21, aux_loss=True).eval(), tv.state_dict())
    _check_deeplab_equal(ours2, tv, x, f"resnet{depth} load_torchvision_deeplabv3")
    conv = from_torchvision(tv)
    assert isinstance(conv, DeepLabV3) and conv.depth == depth and conv.aux_loss and not conv.training
    assert conv.num_classes == 21 and conv.output_stride == 8
    _check_deeplab_equal(conv, tv, x, f"resnet{depth} from_torchvision")
    # without the aux head: torchvision's aux weights are dropped, "out" unchanged
    no_aux = load_torchvision_deeplabv3(builder(num_classes=21).eval(), tv.state_dict())
    assert_matches(no_aux(x)["out"], tv(x)["out"], TOL32, f"resnet{depth} without aux")


def test_deeplabv3_train_mode_matches_torchvision(tv_deeplab50):
    """Training mode: batch-statistics BN and the same dropout masks (same RNG order) give the same outputs."""
    tv = copy.deepcopy(tv_deeplab50).train()  # training updates BN statistics: leave the fixture alone
    ours = from_torchvision(tv)
    assert ours.training
    x = random_input(2, 49, 57, 40)
    torch.manual_seed(0)
    y = ours(x)
    torch.manual_seed(0)
    ref = tv(x)
    assert_matches(y["out"], ref["out"], TOL32, "train out")
    assert_matches(y["aux"], ref["aux"], TOL32, "train aux")


def test_from_torchvision_other_num_classes_and_os16():
    tv = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=4,
                                                            aux_loss=False)
    tv.backbone.layer3[0].conv2.stride = (2, 2)  # undo layer3's dilation: output stride 16
    tv.backbone.layer3[0].downsample[0].stride = (2, 2)
    for b in list(tv.backbone.layer3)[1:]:
        b.conv2.dilation = b.conv2.padding = (1, 1)
    layer4 = list(tv.backbone.layer4)
    layer4[0].conv2.dilation = layer4[0].conv2.padding = (1, 1)
    for b in layer4[1:]:
        b.conv2.dilation = b.conv2.padding = (2, 2)
    randomize_(tv, 41).eval()
    ours = from_torchvision(tv)
    assert ours.num_classes == 4 and not ours.aux_loss and ours.output_stride == 16
    x = random_input(1, 65, 65, 42)
    assert_matches(ours(x)["out"], tv(x)["out"], TOL32, "OS 16, 4 classes")
    with pytest.raises(ValueError, match="not a torchvision DeepLabV3"):
        from_torchvision(nn.Conv2d(3, 3, 1))


def test_vgg16_features_match_torchvision(tv_vgg16):
    plain = vgg16_features().eval()
    plain.load_state_dict(tv_vgg16.features.state_dict(), strict=True)
    x = random_input(1, 64, 64, 50)
    assert_matches(plain(x), tv_vgg16.features(x), TOL32, "vgg16_features")
    m = deeplab_v1_largefov(num_classes=5)
    m.features.load_state_dict(tv_vgg16.features.state_dict(), strict=True)  # the same keys, strict
    m2 = load_vgg16_features(deeplab_v1_msc_largefov(num_classes=5), tv_vgg16.state_dict())
    for i in VGG16_CONV_INDICES:
        for mm in (m, m2):
            assert torch.equal(mm.features[i].weight, tv_vgg16.features[i].weight)
            assert torch.equal(mm.features[i].bias, tv_vgg16.features[i].bias)


# ----------------------------------------------------------------------------------------------------------
# DeepLab v1 against a float64 re-statement of the Caffe definition


def largefov_reference(sd, x, msc):
    """DeepLab-(MSc-)LargeFOV from its Caffe definition; sd: our state dict (float64)."""
    def conv(h, name, stride=1, pad=1, dil=1):
        return F.conv2d(h, sd[name + ".weight"], sd[name + ".bias"], stride, pad, dil)

    def branch(h, name, stride):  # 3x3/stride 128, ReLU, 1x1 128, ReLU, 1x1 classes (dropout: identity in eval)
        h = F.relu(conv(h, f"msc.{name}.0", stride, 1))
        h = F.relu(conv(h, f"msc.{name}.3", 1, 0))
        return conv(h, f"msc.{name}.6", 1, 0)

    scores = [branch(x, "data", 8)] if msc else []
    h = x
    blocks = [((0, 2), 2, "pool1", 4), ((5, 7), 2, "pool2", 2), ((10, 12, 14), 2, "pool3", 1),
              ((17, 19, 21), 1, "pool4", 1)]
    for convs, pool_stride, name, bstride in blocks:
        for i in convs:
            h = F.relu(conv(h, f"features.{i}"))
        h = F.max_pool2d(h, 3, pool_stride, 1)
        if msc:
            scores.append(branch(h, name, bstride))
    for i in (24, 26, 28):
        h = F.relu(conv(h, f"features.{i}", 1, 2, 2))
    h = F.avg_pool2d(F.max_pool2d(h, 3, 1, 1), 3, 1, 1, count_include_pad=True)
    h = F.relu(conv(h, "head.fc6", 1, 12, 12))
    h = F.relu(conv(h, "head.fc7", 1, 0))
    out = conv(h, "fc8", 1, 0)
    for s in scores:
        out = out + s
    return out


@pytest.mark.parametrize("msc", [False, True])
def test_v1_matches_caffe_reference(msc):
    m = randomize_(DeepLabV1(num_classes=5, msc=msc), 60 + msc).double().eval()
    sd = m.state_dict()
    for H, W in [(65, 65), (47, 70)]:  # 8k + 1, and sizes where Caffe's ceil-mode pools would disagree
        x = random_input(1, H, W, 61, dtype=F64)
        ref = largefov_reference(sd, x, msc)
        assert ref.shape[-2:] == (math.ceil(H / 8), math.ceil(W / 8))
        assert_matches(m.forward_logits(x), ref, TOL64, f"v1 msc={msc} {H}x{W} logits")
        up = F.interpolate(ref, size=(H, W), mode="bilinear", align_corners=False)
        assert_matches(m(x), up, TOL64, f"v1 msc={msc} {H}x{W}")


# ----------------------------------------------------------------------------------------------------------
# DeepLab v2: kazuto1011/deeplab-pytorch's module tree, re-stated


class _KConvBn(nn.Sequential):  # kazuto1011's _ConvBnReLU: .conv (no bias), .bn, optional .relu
    def __init__(self, cin, cout, k, stride, pad, dil, relu=True):
        super().__init__()
        self.add_module("conv", nn.Conv2d(cin, cout, k, stride, pad, dil, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))
        if relu:
            self.add_module("relu", nn.ReLU())


class _KBottleneck(nn.Module):  # MSRA bottleneck: the stride is in the 1x1 "reduce"
    def __init__(self, cin, cout, stride, dilation, downsample):
        super().__init__()
        mid = cout // 4
        self.reduce = _KConvBn(cin, mid, 1, stride, 0, 1)
        self.conv3x3 = _KConvBn(mid, mid, 3, 1, dilation, dilation)
        self.increase = _KConvBn(mid, cout, 1, 1, 0, 1, relu=False)
        self.shortcut = _KConvBn(cin, cout, 1, stride, 0, 1, relu=False) if downsample else nn.Identity()

    def forward(self, x):
        return F.relu(self.increase(self.conv3x3(self.reduce(x))) + self.shortcut(x))


def _k_res_layer(n, cin, cout, stride, dilation):  # every block at the same dilation
    layer = nn.Sequential()
    for i in range(n):
        layer.add_module(f"block{i + 1}", _KBottleneck(cin if i == 0 else cout, cout, stride if i == 0 else 1,
                                                       dilation, i == 0))
    return layer


class _KASPP(nn.Module):
    def __init__(self, cin, cout, rates):
        super().__init__()
        for i, r in enumerate(rates):
            self.add_module(f"c{i}", nn.Conv2d(cin, cout, 3, 1, r, r, bias=True))

    def forward(self, x):
        return sum(c(x) for c in self.children())


class _KDeepLabV2(nn.Sequential):
    def __init__(self, n_classes, rates=(6, 12, 18, 24)):
        super().__init__()
        self.add_module("layer1", nn.Sequential(OrderedDict(
            [("conv1", _KConvBn(3, 64, 7, 2, 3, 1)), ("pool", nn.MaxPool2d(3, 2, 1, ceil_mode=True))])))
        self.add_module("layer2", _k_res_layer(3, 64, 256, 1, 1))
        self.add_module("layer3", _k_res_layer(4, 256, 512, 2, 1))
        self.add_module("layer4", _k_res_layer(23, 512, 1024, 1, 2))
        self.add_module("layer5", _k_res_layer(3, 1024, 2048, 1, 4))
        self.add_module("aspp", _KASPP(2048, n_classes, rates))


class _KMSC(nn.Module):
    def __init__(self, base, scales=(0.5, 0.75)):
        super().__init__()
        self.base = base
        self.scales = scales

    def forward(self, x):
        logits = self.base(x)
        pyramid = [self.base(F.interpolate(x, scale_factor=p, mode="bilinear", align_corners=False))
                   for p in self.scales]
        resized = [F.interpolate(p, size=logits.shape[2:], mode="bilinear", align_corners=False) for p in pyramid]
        logits_max = torch.max(torch.stack([logits] + resized), dim=0)[0]
        return [logits] + pyramid + [logits_max] if self.training else logits_max


@pytest.fixture(scope="module")
def kazuto_msc():
    return randomize_(_KMSC(_KDeepLabV2(5)), 70).eval()


def test_kazuto_key_map(kazuto_msc):
    ksd = kazuto_msc.state_dict()
    assert "base.layer1.conv1.conv.weight" in ksd and "base.layer5.block3.increase.bn.running_var" in ksd
    conv = convert_kazuto_deeplabv2(ksd)
    ours = deeplab_v2_resnet101(num_classes=5, msc=True)
    assert set(conv) == set(ours.state_dict())
    ours.load_state_dict(conv, strict=True)
    # spot checks of the map, written out
    pairs = {"base.layer1.conv1.conv.weight": "backbone.conv1.weight",
             "base.layer1.conv1.bn.running_mean": "backbone.bn1.running_mean",
             "base.layer2.block1.shortcut.conv.weight": "backbone.layer1.0.downsample.0.weight",
             "base.layer3.block2.reduce.bn.bias": "backbone.layer2.1.bn1.bias",
             "base.layer4.block23.conv3x3.conv.weight": "backbone.layer3.22.conv2.weight",
             "base.layer5.block1.shortcut.bn.num_batches_tracked": "backbone.layer4.0.downsample.1.num_batches_tracked",
             "base.layer5.block3.increase.conv.weight": "backbone.layer4.2.conv3.weight",
             "base.aspp.c3.bias": "aspp.c3.bias"}
    for k, v in pairs.items():
        assert conv[v] is ksd[k], f"{k} -> {v}"
    # round trips, and the prefix-less / DataParallel / older ("proj", "aspp.stages") names
    assert to_kazuto_deeplabv2(conv) == ksd
    assert convert_kazuto_deeplabv2(to_kazuto_deeplabv2(ours.state_dict())).keys() == ours.state_dict().keys()
    bare = {k[len("base."):]: v for k, v in ksd.items()}
    assert convert_kazuto_deeplabv2(bare) == conv
    assert convert_kazuto_deeplabv2({"module." + k: v for k, v in ksd.items()}) == conv
    old = {re.sub(r"\.shortcut\.", ".proj.", k).replace("aspp.c", "aspp.stages.c"): v for k, v in ksd.items()}
    assert convert_kazuto_deeplabv2(old) == conv
    with pytest.raises(ValueError, match="not kazuto1011 DeepLabV2 names: base.fc.weight"):
        convert_kazuto_deeplabv2({**ksd, "base.fc.weight": torch.ones(1)})


def test_kazuto_outputs_match(kazuto_msc):
    """Our v2 (Caffe-style backbone) with kazuto1011-named weights computes kazuto1011's MSC model."""
    ours = load_weights(deeplab_v2_resnet101(num_classes=5, msc=True), kazuto_msc.state_dict()).eval()
    x = random_input(1, 69, 61, 71)
    ref = kazuto_msc(x)
    assert_matches(ours.forward_logits(x), ref, TOL32, "kazuto eval logits_max")
    up = F.interpolate(ref, size=(69, 61), mode="bilinear", align_corners=False)
    assert_matches(ours(x), up, TOL32, "kazuto eval, upsampled")
    kazuto_msc.train()
    ours.train()
    try:
        refs = kazuto_msc(x)
        outs = ours(x)
        assert isinstance(outs, list) and len(outs) == 4
        for i, (o, r) in enumerate(zip(outs, refs)):
            assert_matches(o, r, TOL32, f"kazuto train output {i}")
    finally:
        kazuto_msc.eval()


def test_v2_msc_is_max_over_scales():
    """msc=True eval = max over the single-scale network's logits at scales 1, 0.75, 0.5 (resized to the 1x
    logits' size), upsampled to the input; train mode returns [1.0, 0.5, 0.75, max]."""
    msc = randomize_(deeplab_v2_resnet101(num_classes=5, msc=True), 80).eval()
    single = deeplab_v2_resnet101(num_classes=5).eval()
    single.load_state_dict(msc.state_dict(), strict=True)
    x = random_input(1, 75, 67, 81)
    per_scale = {s: single.forward_logits(F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
                                          if s != 1.0 else x) for s in (1.0, 0.75, 0.5)}
    size = per_scale[1.0].shape[-2:]
    resized = [F.interpolate(per_scale[s], size=size, mode="bilinear", align_corners=False) for s in per_scale]
    fused = torch.stack(resized).max(dim=0).values
    expected = F.interpolate(fused, size=(75, 67), mode="bilinear", align_corners=False)
    y = msc(x)
    assert isinstance(y, torch.Tensor) and y.shape == (1, 5, 75, 67)
    assert_matches(y, expected, TOL32, "MSC eval")
    # every scale wins somewhere: the max is not one scale's output
    winners = torch.stack(resized).argmax(dim=0).unique().tolist()
    assert winners == [0, 1, 2], f"only scales {winners} win: the test would not exercise the fusion"
    msc.train()
    single.train()
    outs = msc(x)
    assert [tuple(o.shape[-2:]) for o in outs] == [tuple(size), tuple(per_scale[0.5].shape[-2:]),
                                                   tuple(per_scale[0.75].shape[-2:]), tuple(size)]
    assert_matches(outs[0], single.forward_logits(x), TOL32, "train: scale 1.0")
    for o, s in zip(outs[1:3], (0.5, 0.75)):
        xs = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        assert_matches(o, single.forward_logits(xs), TOL32, f"train: scale {s}")
    ref_max = torch.stack([outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False)
                                       for o in outs[1:3]]).max(dim=0).values
    assert_matches(outs[3], ref_max, TOL32, "train: max")


# ----------------------------------------------------------------------------------------------------------
# Checkpoints and wrong architectures


def test_load_checkpoint(tmp_path):
    m = randomize_(deeplab_v3_resnet50(num_classes=3, head="paper"), 90).eval()
    sd = m.state_dict()
    for name, obj in [("plain.pth", sd), ("wrapped_sd.pth", {"state_dict": sd, "epoch": 3}),
                      ("wrapped_model.pth", {"model": sd}),
                      ("dataparallel.pth", OrderedDict(("module." + k, v) for k, v in sd.items()))]:
        torch.save(obj, tmp_path / name)
        got = load_checkpoint(tmp_path / name)
        assert list(got) == list(sd) and all(torch.equal(got[k], sd[k]) for k in sd), name
    fresh = deeplab_v3_resnet50(num_classes=3, head="paper").eval()
    load_weights(fresh, load_checkpoint(tmp_path / "plain.pth"))
    x = random_input(1, 41, 41, 91)
    assert_matches(fresh(x)["out"], m(x)["out"], 0.0, "reloaded model")

    missing = tmp_path / "nope" / "weights.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_checkpoint(missing)
    with pytest.raises(ValueError, match="is a directory"):
        load_checkpoint(tmp_path)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        load_checkpoint(tmp_path / "list.pth")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        load_checkpoint(tmp_path / "meta.pth")
    torch.save(nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled module: refused by weights_only
    with pytest.raises(ValueError, match="weights-only"):
        load_checkpoint(tmp_path / "module.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights-only"):
        load_checkpoint(tmp_path / "garbage.pth")


def test_wrong_architecture(tv_deeplab50):
    with pytest.raises(ValueError, match=r"deeplab_v3_resnet101.*missing keys \(backbone\.layer3\.6\.conv1\.weight"):
        load_torchvision_deeplabv3(deeplab_v3_resnet101(aux_loss=True), tv_deeplab50.state_dict())
    with pytest.raises(ValueError, match=r"missing keys.*unexpected keys \(features\.0\.weight"):
        load_weights(deeplab_v3_resnet50(), deeplab_v1_largefov().state_dict())
    with pytest.raises(ValueError, match=r"shape mismatches \(classifier\.4\.weight: checkpoint \(21, 256, 1, 1\) "
                                         r"vs model \(5, 256, 1, 1\)"):
        load_torchvision_deeplabv3(deeplab_v3_resnet50(num_classes=5, aux_loss=True), tv_deeplab50.state_dict())
    with pytest.raises(ValueError, match=r"unexpected keys \(aux_classifier"):
        load_torchvision_deeplabv3(deeplab_v3_resnet50(), tv_deeplab50.state_dict(), drop_aux=False)
    with pytest.raises(ValueError, match="model expects"):
        load_vgg16_features(deeplab_v1_largefov(), resnet50().state_dict())
