"""DeepLab v3+ and the mobile DeepLabs against their references, on the CPU, as built and after ``optimize``.

References (seeded random weights with every BN's running statistics and affine parameters randomised; fresh
random inputs):
- segmentation_models_pytorch 0.6.0's ``DeepLabV3Plus(encoder, encoder_weights=None, encoder_output_stride=16 | 8)``
  (a test extra, pure Python): its state dict saved to a file and loaded with ``get_model(name, weights=path,
  flavor="smp", output_stride=...)``. smp refuses sizes that are not multiples of 16, so the inputs are 48x80.
- torchvision 0.28's ``deeplabv3_mobilenet_v3_large`` (with and without ``aux_loss``) and
  ``lraspp_mobilenet_v3_large`` (``weights=None``), their state dicts loaded as they are; inputs 161x241.
- The paper flavor: ``tf_deeplabv3plus`` below, a float64 re-statement of the official TensorFlow model
  (research/deeplab ``model.py``: ``extract_features`` / ``refine_by_decoder``; ``feature_extractor.py``'s end
  points; ``mobilenet.py``'s and ``resnet_v1_beta``'s output-stride rules) written here with functional ops on
  the parameter tensors, taken by their roles as a converted TensorFlow checkpoint would give them (the
  projection's input channels in the official order [pool, 1x1, rates...]). Why it proves the architecture: it
  shares no module code with the model, only parameters; everything structural (which feature the decoder taps,
  the rates and where they apply, BN + ReLU after the depthwise conv, the concat orders, the 48-channel
  projection, two decoder convs, ``align_corners=True`` resizes, written here as its own interpolation) is
  restated, and in float64 any structural slip is an O(1) difference against float32 rounding (< 1e-5). The
  negative controls show the comparison sees a flip of one resize mode or one rate. The model is also run in
  float64 against the reference (1e-9): the architecture is the same to rounding. Sizes: odd, small enough for
  a float64 reference on a 2-core CI machine (129x97, 97x65, 65x65); DEEPLAB_FAST_LARGE_SIZES=1 runs the same
  test at 513x513 and 321x481 (minutes per case on 2 cores: not in CI).

Tolerance (``helpers.assert_matches``): per element ``|out - ref| <= tol * (max|ref| + |ref|)``; 1e-5 as built,
1e-4 after ``optimize``.
"""
from __future__ import annotations

import os
import sys
import types
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from deeplab_fast import models, optimize
from deeplab_fast.models import get_model

sys.path.insert(0, os.path.dirname(__file__))
from helpers import F64, assert_matches  # noqa: E402
from helpers import randomize_ as _randomize_  # noqa: E402

TOL_BUILT, TOL_OPT = 1e-5, 1e-4
V3PLUS = {"resnet50": "deeplab_v3plus_resnet50", "resnet101": "deeplab_v3plus_resnet101",
          "mobilenet_v2": "deeplab_v3plus_mobilenet_v2"}


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    return _randomize_(module, seed, gain=2.0, spread=0.2, var_low=0.5)


def image(n, h, w, seed):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def smp():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return pytest.importorskip("segmentation_models_pytorch")


# ----------------------------------------------------------------------------------------------------------
# segmentation_models_pytorch 0.6.0


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize("encoder", list(V3PLUS))
def test_smp_deeplabv3plus(encoder, output_stride, tmp_path):
    ref = randomize_(smp().DeepLabV3Plus(encoder, encoder_weights=None, encoder_output_stride=output_stride,
                                         classes=5), 10 + output_stride).eval()
    path = tmp_path / "smp.pth"
    torch.save(ref.state_dict(), path)
    ours = get_model(V3PLUS[encoder], weights=str(path), flavor="smp", output_stride=output_stride).eval()
    assert ours.num_classes == 5 and ours.flavor == "smp" and ours.atrous_rates == (12, 24, 36)
    x = image(2, 48, 80, 1)
    with torch.no_grad():
        expected = ref(x)
        out = ours(x)
        fused = optimize(ours)(x)
    assert isinstance(out, OrderedDict) and list(out) == ["out"]
    assert_matches(out["out"], expected, TOL_BUILT, f"smp {encoder} OS {output_stride}")
    assert_matches(fused["out"], expected, TOL_OPT, f"smp {encoder} OS {output_stride} after optimize")


def test_smp_state_dict_needs_flavor_and_output_stride(tmp_path):
    ref = smp().DeepLabV3Plus("mobilenet_v2", encoder_weights=None, classes=3)
    path = tmp_path / "smp.pth"
    torch.save(ref.state_dict(), path)
    for kwargs in ({}, {"flavor": "smp"}, {"output_stride": 16}):
        with pytest.raises(ValueError, match="segmentation_models_pytorch DeepLabV3Plus weights: build the model with "
                                             "flavor='smp' and the output_stride"):
            get_model("deeplab_v3plus_mobilenet_v2", weights=str(path), **kwargs)
    with_aux = smp().DeepLabV3Plus("mobilenet_v2", encoder_weights=None, classes=3, aux_params={"classes": 3})
    torch.save(with_aux.state_dict(), path)
    with pytest.raises(ValueError, match="classification_head"):
        get_model("deeplab_v3plus_mobilenet_v2", weights=str(path), flavor="smp", output_stride=16)
    # A paper-flavor state dict into the smp flavor: the keys are listed
    paper = get_model("deeplab_v3plus_mobilenet_v2", num_classes=3)
    torch.save(paper.state_dict(), path)
    with pytest.raises(ValueError, match="does not fit DeepLabV3Plus"):
        get_model("deeplab_v3plus_mobilenet_v2", weights=str(path), flavor="smp", output_stride=16)


# ----------------------------------------------------------------------------------------------------------
# torchvision's mobile DeepLabs


@pytest.mark.parametrize("name,tv_name,kwargs", [
    ("deeplab_v3_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", {"aux_loss": True}),
    ("deeplab_v3_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", {}),
    ("lraspp_mobilenet_v3_large", "lraspp_mobilenet_v3_large", {}),
])
def test_torchvision_mobile(name, tv_name, kwargs, tmp_path):
    tv = getattr(torchvision.models.segmentation, tv_name)(weights=None, weights_backbone=None, num_classes=7,
                                                            **kwargs)
    tv = randomize_(tv, 20).eval()
    ours = get_model(name, num_classes=7, **kwargs).eval()
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = image(1, 161, 241, 2)
    fast = optimize(ours)
    with torch.no_grad():
        expected, out, fused = tv(x), ours(x), fast(x)
    assert isinstance(out, OrderedDict) and list(out) == list(expected)
    # every BN of the backbone folded (into the fused 1x1 convs, and into the depthwise convs by the grouped rule)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.backbone.modules())
    for k in expected:
        assert_matches(out[k], expected[k], TOL_BUILT, f"{name} {k}")
        assert_matches(fused[k], expected[k], TOL_OPT, f"{name} {k} after optimize")
    # torchvision's file by path: the class count is read from it; the aux head of the file is dropped when the
    # model is built without it (torchvision's released weights carry it)
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    loaded = get_model(name, weights=str(path), **kwargs).eval()
    assert loaded.num_classes == 7
    with torch.no_grad():
        assert torch.equal(loaded(x)["out"], out["out"])


def test_mobile_builders_and_metadata():
    w = models.DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1
    assert w.meta["metrics"]["COCO-val2017-VOC-labels"]["miou"] == 60.3 and round(w.meta["gflops"], 2) == 10.45
    assert w.model_kwargs == {"num_classes": 21, "aux_loss": True} and len(w.meta["categories"]) == 21
    assert w.url.endswith("deeplabv3_mobilenet_v3_large-fc3c493d.pth")
    w = models.LRASPP_MobileNet_V3_Large_Weights.DEFAULT
    assert w.meta["metrics"]["COCO-val2017-VOC-labels"]["miou"] == 57.9 and round(w.meta["gflops"], 2) == 2.09
    assert w.url.endswith("lraspp_mobilenet_v3_large-d234d4ea.pth")
    # torchvision's member for the same file is accepted where ours is (matched by its URL, nothing downloaded)
    tvw = torchvision.models.segmentation.LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1
    assert models.resolve_weights("lraspp_mobilenet_v3_large", tvw) is w
    tvb = torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1
    assert models.resolve_backbone_weights("lraspp_mobilenet_v3_large", tvb).backbone_only
    with pytest.raises(ValueError, match="no auxiliary head"):
        get_model("lraspp_mobilenet_v3_large", aux_loss=True)
    for name in V3PLUS.values():
        pub = models.get_model_weights(name).IMAGENET1K_BACKBONE.meta["published"]
        assert pub
    r101 = models.DeepLabV3Plus_ResNet101_Weights.IMAGENET1K_BACKBONE.meta["published"]
    assert any(v.get("miou") == 78.85 and "ECCV 2018" in v["source"] for v in r101.values() if isinstance(v, dict))


@pytest.mark.parametrize("name,tv_fn,key,ours_key", [
    ("deeplab_v3_mobilenet_v3_large", "mobilenet_v3_large", "features.4.block.0.0.weight", "backbone.4.block.0.0.weight"),
    ("deeplab_v3plus_mobilenet_v2", "mobilenet_v2", "features.4.conv.0.0.weight", "backbone.features.4.conv.0.0.weight"),
    ("deeplab_v3plus_resnet50", "resnet50", "layer3.2.conv2.weight", "backbone.layer3.2.conv2.weight"),
])
def test_weights_backbone_by_path(name, tv_fn, key, ours_key, tmp_path):
    """torchvision's ImageNet classifier state dict as weights_backbone: it lands in the backbone by name."""
    tv = randomize_(getattr(torchvision.models, tv_fn)(), 30)
    path = tmp_path / f"{tv_fn}.pth"
    torch.save(tv.state_dict(), path)
    model = get_model(name, weights_backbone=str(path), num_classes=4)
    assert torch.equal(model.state_dict()[ours_key], tv.state_dict()[key])


# ----------------------------------------------------------------------------------------------------------
# The paper flavor against a float64 re-statement of the official TensorFlow model


def _p(module, name):
    return module.get_parameter(name).detach().to(F64) if name.endswith(("weight", "bias")) \
        else module.get_buffer(name).detach().to(F64)


def tf_bn(x, m, prefix):
    """slim.batch_norm at inference: gamma * (x - mean) / sqrt(var + eps) + beta (eps 1e-5, the official code's)."""
    v = lambda n: _p(m, f"{prefix}.{n}").view(1, -1, 1, 1)  # noqa: E731
    return (x - v("running_mean")) / torch.sqrt(v("running_var") + 1e-5) * v("weight") + v("bias")


def tf_conv(x, w, stride=1, rate=1, groups=1, bias=None):
    """A conv with 'SAME' padding at stride 1 (rate (k - 1) / 2 per side); the backbones' stride-2 convs pad
    (k - 1) / 2 as torchvision's, which equals 'SAME' on the odd sizes used here."""
    k = w.shape[-1]
    return F.conv2d(x, w, bias, stride, rate * (k - 1) // 2, rate, groups)


def resize_align_corners(x, size):
    """Bilinear resize with align_corners=True (tf.image.resize_bilinear(..., align_corners=True)), written out:
    output index i reads input position i * (in - 1) / (out - 1)."""
    def axis(n_in, n_out):
        if n_out == 1:
            pos = torch.zeros(1, dtype=F64)
        else:
            pos = torch.arange(n_out, dtype=F64) * ((n_in - 1) / (n_out - 1))
        lo = pos.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, pos - lo.to(F64)
    (y0, y1, fy), (x0, x1, fx) = axis(x.shape[2], size[0]), axis(x.shape[3], size[1])
    rows = x[:, :, y0] * (1 - fy).view(1, 1, -1, 1) + x[:, :, y1] * fy.view(1, 1, -1, 1)
    return rows[:, :, :, x0] * (1 - fx) + rows[:, :, :, x1] * fx


def tf_separable(x, m, prefix, rate):
    """split_separable_conv2d: depthwise (rate) + BN + ReLU, pointwise 1x1 + BN + ReLU."""
    c = x.shape[1]
    y = torch.relu(tf_bn(tf_conv(x, _p(m, f"{prefix}.depthwise.weight"), rate=rate, groups=c), m,
                         f"{prefix}.depthwise_bn"))
    return torch.relu(tf_bn(tf_conv(y, _p(m, f"{prefix}.pointwise.weight")), m, f"{prefix}.pointwise_bn"))


def ref_resnet(m, x, depth, output_stride):
    """torchvision's ResNet layers with the official code's output-stride rule (every unit of a dilated block at
    the block's full rate, multi-grid [1, 1, 1]): (layer1's output, layer4's output)."""
    c = lambda n, x, **kw: tf_conv(x, _p(m, f"backbone.{n}.weight"), **kw)  # noqa: E731
    x = torch.relu(tf_bn(F.conv2d(x, _p(m, "backbone.conv1.weight"), None, 2, 3), m, "backbone.bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    stride_so_far, rate, low = 4, 1, None
    for li, n in enumerate(blocks, 1):
        s = 1 if li == 1 else 2
        if s == 2 and stride_so_far >= output_stride:
            rate, s = rate * 2, 1
        elif s == 2:
            stride_so_far *= 2
        for b in range(n):
            p = f"layer{li}.{b}"
            bs = s if b == 0 else 1
            y = torch.relu(tf_bn(c(f"{p}.conv1", x), m, f"backbone.{p}.bn1"))
            y = torch.relu(tf_bn(c(f"{p}.conv2", y, stride=bs, rate=rate), m, f"backbone.{p}.bn2"))
            y = tf_bn(c(f"{p}.conv3", y), m, f"backbone.{p}.bn3")
            sc = x if b else tf_bn(F.conv2d(x, _p(m, f"backbone.{p}.downsample.0.weight"), None, bs), m,
                                   f"backbone.{p}.downsample.1")
            x = torch.relu(y + sc)
        if li == 1:
            low = x
    return low, x


def ref_mobilenet_v2(m, x, output_stride):
    """MobileNetV2 as the official code cuts it: up to layer_18 (320 channels), the decoder's tap at
    layer_4/depthwise_output, and mobilenet.py's rule (the layer that reaches the output stride runs at stride 1
    with the current rate; the rate is multiplied for the layers after it)."""
    relu6 = lambda t: t.clamp(0, 6)  # noqa: E731
    w = lambda n: _p(m, f"backbone.features.{n}.weight")  # noqa: E731
    x = relu6(tf_bn(F.conv2d(x, w("0.0"), None, 2, 1), m, "backbone.features.0.1"))
    cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    current, rate, layer, low, cin = 2, 1, 1, None, 32
    for t, cout, n, s in cfg:
        for i in range(n):
            layer += 1  # layer_2 .. layer_18 = features.1 .. features.17
            stride = s if i == 0 else 1
            if current == output_stride:
                layer_stride, layer_rate, rate = 1, rate, rate * stride
            else:
                layer_stride, layer_rate, current = stride, 1, current * stride
            f = f"backbone.features.{layer - 1}.conv"
            y, j = x, 0
            if t != 1:
                y = relu6(tf_bn(tf_conv(y, _p(m, f"{f}.0.0.weight")), m, f"{f}.0.1"))
                j = 1
            hidden = y.shape[1]
            y = relu6(tf_bn(F.conv2d(y, _p(m, f"{f}.{j}.0.weight"), None, layer_stride, layer_rate, layer_rate,
                                     hidden), m, f"{f}.{j}.1"))
            if layer == 4:
                low = y  # layer_4/depthwise_output
            y = tf_bn(tf_conv(y, _p(m, f"{f}.{j + 1}.weight")), m, f"{f}.{j + 2}")
            x = x + y if stride == 1 and cin == cout else y
            cin = cout
    return low, x


def tf_deeplabv3plus(m, x, backbone, output_stride, rates, resize=resize_align_corners):
    """The official model at inference (eval: no dropout), float64."""
    x = x.to(F64)
    if backbone == "mobilenet_v2":
        low, high = ref_mobilenet_v2(m, x, output_stride)
    else:
        low, high = ref_resnet(m, x, int(backbone[6:]), output_stride)
    h, w = high.shape[-2:]
    # extract_features: image pooling first, then the 1x1 branch, then the separable atrous branches
    pool = high.mean(dim=(2, 3), keepdim=True)
    pool = torch.relu(tf_bn(tf_conv(pool, _p(m, "aspp.convs.4.1.weight")), m, "aspp.convs.4.2"))
    branches = [resize(pool, (h, w)),
                torch.relu(tf_bn(tf_conv(high, _p(m, "aspp.convs.0.0.weight")), m, "aspp.convs.0.1"))]
    branches += [tf_separable(high, m, f"aspp.convs.{i}", r) for i, r in enumerate(rates, 1)]
    proj = _p(m, "aspp.project.0.weight")
    proj_tf = torch.cat([proj[:, 4 * 256:], proj[:, :4 * 256]], dim=1)  # the official concat order
    y = torch.relu(tf_bn(tf_conv(torch.cat(branches, dim=1), proj_tf), m, "aspp.project.1"))
    # refine_by_decoder: feature_projection0 (48), both resized to the stride-4 size, concat [ASPP, low]
    low = torch.relu(tf_bn(tf_conv(low, _p(m, "low_level.0.weight")), m, "low_level.1"))
    size = low.shape[-2:]
    y = torch.cat([resize(y, size), resize(low, size)], dim=1)
    y = tf_separable(y, m, "decoder.0", 1)
    y = tf_separable(y, m, "decoder.1", 1)
    logits = tf_conv(y, _p(m, "classifier.weight"), bias=_p(m, "classifier.bias"))
    return resize(logits, x.shape[-2:])


PAPER_SIZES = [("mobilenet_v2", 16, (129, 97)), ("mobilenet_v2", 8, (97, 65)), ("resnet50", 16, (97, 65)),
               ("resnet50", 8, (65, 65)), ("resnet101", 16, (65, 65)), ("resnet101", 8, (65, 65))]
if os.environ.get("DEEPLAB_FAST_LARGE_SIZES") == "1":  # the docs' run: the official crop sizes
    PAPER_SIZES = [(b, s, (513, 513)) for b in V3PLUS for s in (16, 8)] + [("mobilenet_v2", 16, (321, 481))]


@pytest.mark.parametrize("backbone,output_stride,size", PAPER_SIZES)
def test_paper_flavor_matches_official_model(backbone, output_stride, size):
    torch.manual_seed(0)
    # running variances in [1, 2]: a deep random MobileNet with smaller ones amplifies float32 rounding to ~1e-5
    model = get_model(V3PLUS[backbone], num_classes=6, output_stride=output_stride)
    ours = _randomize_(model, 40, gain=2.0, spread=0.2, var_low=1.0).eval()
    rates = {16: (6, 12, 18), 8: (12, 24, 36)}[output_stride]
    assert ours.flavor == "paper" and ours.atrous_rates == rates
    x = image(1, *size, 3)
    with torch.no_grad():
        expected = tf_deeplabv3plus(ours, x, backbone, output_stride, rates)
        out = ours(x)["out"]
        fused = optimize(ours)(x)["out"]
        assert_matches(out, expected, TOL_BUILT, f"paper {backbone} OS {output_stride}")
        assert_matches(fused, expected, TOL_OPT, f"paper {backbone} OS {output_stride} after optimize")
        assert_matches(ours.double()(x.double())["out"], expected, 1e-9, f"paper {backbone} float64")
        ours.float()
        if backbone == "mobilenet_v2" and output_stride == 16:  # negative controls: the comparison sees these
            def half_pixel(t, s):
                return F.interpolate(t, size=tuple(s), mode="bilinear", align_corners=False)
            wrong = tf_deeplabv3plus(ours, x, backbone, output_stride, rates, resize=half_pixel)
            assert (wrong - expected).abs().max() > 1e-3 * expected.abs().max()
            wrong = tf_deeplabv3plus(ours, x, backbone, output_stride, (4, 12, 18))
            assert (wrong - expected).abs().max() > 1e-3 * expected.abs().max()


def test_v3plus_structure():
    with torch.device("meta"):
        paper = get_model("deeplab_v3plus_mobilenet_v2")
        smp_flavor = get_model("deeplab_v3plus_mobilenet_v2", flavor="smp", output_stride=8)
        r = get_model("deeplab_v3plus_resnet101", output_stride=8)
    assert paper.backbone.out_channels == 320 and len(paper.backbone.features) == 18 and len(paper.decoder) == 2
    assert paper.aspp_conv is None and paper.aspp.convs[1].depthwise_bn is not None
    assert paper.aspp.project[3].p == 0.1 and smp_flavor.aspp.project[3].p == 0.5
    assert smp_flavor.backbone.out_channels == 1280 and len(smp_flavor.decoder) == 1
    assert smp_flavor.aspp.convs[1].depthwise_bn is None and smp_flavor.atrous_rates == (12, 24, 36)
    # dilations: the official MobileNet rule (features.7 keeps rate 1 at OS 8) vs smp's (every conv of a stage)
    dil = lambda mm, i: mm.backbone.features[i].conv[1][0].dilation[0]  # noqa: E731
    assert [dil(paper, i) for i in (13, 14, 15, 17)] == [1, 1, 2, 2]
    assert [dil(smp_flavor, i) for i in (6, 7, 8, 13, 14, 15)] == [1, 2, 2, 2, 4, 4]
    assert r.backbone.block_dilations()["layer3"] == (2,) * 23 and r.backbone.block_dilations()["layer4"] == (4,) * 3
    for bad, match in (({"flavor": "mmseg"}, "flavor must be 'paper'"), ({"output_stride": 32}, "16 or 8"),
                       ({"aux_loss": True}, "aux_loss")):
        with pytest.raises((ValueError, TypeError), match=match):
            get_model("deeplab_v3plus_resnet50", **bad)
