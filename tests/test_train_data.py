"""deeplab_fast.train (losses, poly lr, parameter groups, ConfusionMatrix) and deeplab_fast.data (VOCSegmentation,
the transforms, the synthetic VOC set). CPU only."""
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from helpers import seeded

from deeplab_fast.data.transforms import CAFFE_MEAN_BGR, IMAGENET_MEAN, IMAGENET_STD
from deeplab_fast.data import EvalTransform, TrainTransform, VOCSegmentation, make_synthetic_voc, normalize
from deeplab_fast.models import MODELS, get_model
from deeplab_fast.train import (HEAD_ATTRIBUTES, ConfusionMatrix, downsampled_cross_entropy, msc_loss,
                                param_groups, poly_lr, upsampled_cross_entropy)


# --------------------------------------------------------------------------------------------- ConfusionMatrix
def test_confusion_matrix_hand_example():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = ConfusionMatrix(3).update(pred, target)
    expected = torch.tensor([[2, 1, 0],
                             [0, 2, 0],
                             [1, 0, 1]])
    assert cm.matrix.dtype == torch.int64
    assert torch.equal(cm.matrix, expected)
    iou = cm.per_class_iou()
    assert iou.dtype == torch.float64
    assert torch.allclose(iou, torch.tensor([2 / 4, 2 / 3, 1 / 2], dtype=torch.float64), rtol=0, atol=1e-15)
    assert cm.miou() == pytest.approx(5 / 9, abs=1e-15)
    assert cm.pixel_accuracy() == pytest.approx(5 / 7, abs=1e-15)
    assert cm.mean_class_accuracy() == pytest.approx((2 / 3 + 1 + 1 / 2) / 3, abs=1e-15)
    summary = cm.summary()
    assert summary["miou"] == cm.miou() and len(summary["per_class_iou"]) == 3
    cm.reset()
    assert int(cm.matrix.sum()) == 0 and math.isnan(cm.miou()) and math.isnan(cm.pixel_accuracy())


def _numpy_iou(pred, target, L, ignore=255):
    valid = target != ignore
    ious = []
    for c in range(L):
        p, t = (pred == c) & valid, (target == c) & valid
        union = (p | t).sum()
        ious.append((p & t).sum() / union if union else np.nan)
    return np.array(ious)


def test_confusion_matrix_random_against_numpy():
    g = seeded(0)
    L = 6
    target = torch.randint(0, L, (4, 33, 29), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    pred = torch.randint(0, L, (4, 33, 29), generator=g)
    cm = ConfusionMatrix(L).update(pred, target)
    t, p = target.numpy(), pred.numpy()
    valid = t != 255
    assert int(cm.matrix.sum()) == valid.sum()
    ref = _numpy_iou(p, t, L)
    assert np.allclose(cm.per_class_iou().numpy(), ref, rtol=0, atol=1e-12)
    assert cm.miou() == pytest.approx(np.nanmean(ref), abs=1e-12)
    assert cm.pixel_accuracy() == pytest.approx((p[valid] == t[valid]).mean(), abs=1e-12)
    recall = [((p == c) & (t == c)).sum() / (t == c).sum() for c in range(L)]
    assert cm.mean_class_accuracy() == pytest.approx(np.mean(recall), abs=1e-12)
    # exact counts
    for gt in range(L):
        for pr in range(L):
            assert int(cm.matrix[gt, pr]) == int(((t == gt) & (p == pr)).sum())


def test_confusion_matrix_absent_class_is_nan():
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]))  # class 3 nowhere
    iou = cm.per_class_iou()
    assert math.isnan(iou[3]) and not torch.isnan(iou[:3]).any()
    assert cm.miou() == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)
    # a class only predicted counts (IoU 0); one only in the ground truth too
    cm2 = ConfusionMatrix(4).update(torch.tensor([0, 3]), torch.tensor([0, 0]))
    assert cm2.per_class_iou()[3] == 0 and cm2.miou() == pytest.approx(0.25)
    assert math.isnan(cm2.per_class_accuracy()[3]) and cm2.mean_class_accuracy() == pytest.approx(0.5)


def test_confusion_matrix_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="target"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="target"):
        cm.update(torch.tensor([0, 1]), torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="pred"):
        cm.update(torch.tensor([0, 5]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="pred"):
        cm.update(torch.tensor([0, 5]), torch.tensor([0, 255]))  # pred checked at ignored pixels too
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        cm.update(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(0)
    with pytest.raises(ValueError):
        cm.merge(ConfusionMatrix(4))
    assert int(cm.matrix.sum()) == 0  # failed updates count nothing
    cm.update(torch.tensor([0, 1]), torch.tensor([255, 255]))  # all ignored: fine, nothing counted
    assert int(cm.matrix.sum()) == 0


def test_confusion_matrix_merge_and_all_reduce():
    g = seeded(1)
    L = 5
    t1, t2 = torch.randint(0, L, (2, 16, 16), generator=g), torch.randint(0, L, (3, 16, 16), generator=g)
    p1, p2 = torch.randint(0, L, (2, 16, 16), generator=g), torch.randint(0, L, (3, 16, 16), generator=g)
    t1[0, :4] = 255
    a, b = ConfusionMatrix(L).update(p1, t1), ConfusionMatrix(L).update(p2, t2)
    whole = ConfusionMatrix(L).update(torch.cat([p1, p2]), torch.cat([t1, t2]))
    summed = a + b
    assert torch.equal(summed.matrix, whole.matrix)
    assert torch.equal(a.matrix + b.matrix, whole.matrix)  # __add__ left both alone
    a.merge(b)
    assert torch.equal(a.matrix, whole.matrix)
    assert not torch.distributed.is_initialized()
    before = whole.matrix.clone()
    assert whole.all_reduce() is whole and torch.equal(whole.matrix, before)


# ------------------------------------------------------------------------------------------------------ losses
def _nearest_target(target, h, w):
    H, W = target.shape[-2:]
    rows = torch.tensor([(i * H) // h for i in range(h)])
    cols = torch.tensor([(j * W) // w for j in range(w)])
    return target[:, rows][:, :, cols]


def _data(seed, B=2, L=5, h=7, w=9, H=50, W=67, ignore_frac=0.2):
    g = seeded(seed)
    logits = torch.randn(B, L, h, w, generator=g, dtype=torch.float64)
    target = torch.randint(0, L, (B, H, W), generator=g)
    target[torch.rand(B, H, W, generator=g) < ignore_frac] = 255
    return logits, target


def test_downsampled_cross_entropy_matches_independent_computation():
    logits, target = _data(0)
    small = _nearest_target(target, 7, 9)
    ref = F.cross_entropy(logits, small, ignore_index=255)
    out = downsampled_cross_entropy(logits, target)
    assert out.dim() == 0
    assert torch.allclose(out, ref, rtol=1e-12, atol=0)
    # by hand: -log softmax at the label, averaged over the valid pixels
    logp = torch.log_softmax(logits, 1)
    valid = small != 255
    picked = logp.gather(1, small.clamp(max=4)[:, None])[:, 0]
    assert torch.allclose(out, -picked[valid].mean(), rtol=1e-12, atol=0)
    # the same size: no resize
    same = downsampled_cross_entropy(logits, small)
    assert torch.allclose(same, ref, rtol=1e-12, atol=0)


def test_ignored_pixels_contribute_nothing():
    logits, target = _data(1, H=7, W=9, ignore_frac=0.3)
    ignored = target == 255
    assert ignored.any() and (~ignored).any()
    bumped = logits.clone()
    bumped.permute(0, 2, 3, 1)[ignored] += 100 * torch.randn(int(ignored.sum()), logits.shape[1], dtype=logits.dtype)
    for fn in (downsampled_cross_entropy, upsampled_cross_entropy):
        assert torch.allclose(fn(logits, target), fn(bumped, target), rtol=1e-12, atol=0)
        x = logits.clone().requires_grad_(True)
        fn(x, target).backward()
        assert (x.grad.permute(0, 2, 3, 1)[ignored] == 0).all()
    # all ignored: 0, not NaN, and backward works
    x = logits.clone().requires_grad_(True)
    for fn in (downsampled_cross_entropy, upsampled_cross_entropy):
        loss = fn(x, torch.full_like(target, 255))
        assert loss.item() == 0.0 and not torch.isnan(loss)
        loss.backward()
        assert torch.isfinite(x.grad).all() and (x.grad == 0).all()
    loss = msc_loss([x], x, torch.full_like(target, 255))
    assert loss.item() == 0.0


def test_upsampled_cross_entropy_matches_interpolate():
    logits, target = _data(2)
    up = F.interpolate(logits, size=(50, 67), mode="bilinear", align_corners=False)
    ref = F.cross_entropy(up, target, ignore_index=255)
    assert torch.allclose(upsampled_cross_entropy(logits, target), ref, rtol=1e-12, atol=0)
    assert torch.allclose(upsampled_cross_entropy(up, target), ref, rtol=1e-12, atol=0)
    # another ignore_index
    t2 = target.clone()
    t2[t2 == 255] = 0
    t2[:, :5] = -1
    ref2 = F.cross_entropy(up, t2, ignore_index=-1)
    assert torch.allclose(upsampled_cross_entropy(logits, t2, ignore_index=-1), ref2, rtol=1e-12, atol=0)


def test_msc_loss_is_the_sum():
    g = seeded(3)
    B, L, H, W = 2, 4, 41, 41
    target = torch.randint(0, L, (B, H, W), generator=g)
    target[:, :3] = 255
    scales = [torch.randn(B, L, 6, 6, generator=g, dtype=torch.float64),
              torch.randn(B, L, 3, 3, generator=g, dtype=torch.float64),
              torch.randn(B, L, 5, 5, generator=g, dtype=torch.float64)]
    fused = torch.randn(B, L, 6, 6, generator=g, dtype=torch.float64)
    for down, fn in ((True, downsampled_cross_entropy), (False, upsampled_cross_entropy)):
        ref = sum(fn(t, target) for t in scales + [fused])
        assert torch.allclose(msc_loss(scales, fused, target, downsample=down), ref, rtol=1e-12, atol=0)
        manual = sum(F.cross_entropy(t, _nearest_target(target, *t.shape[-2:]), ignore_index=255)
                     for t in scales + [fused]) if down else None
        if down:
            assert torch.allclose(msc_loss(scales, fused, target), manual, rtol=1e-12, atol=0)
    assert torch.allclose(msc_loss(tuple(scales), None, target), sum(downsampled_cross_entropy(t, target)
                                                                    for t in scales), rtol=1e-12, atol=0)


def test_loss_shape_errors():
    logits, target = _data(4)
    for fn in (downsampled_cross_entropy, upsampled_cross_entropy):
        with pytest.raises(ValueError, match="logits"):
            fn(logits[0], target)
        with pytest.raises(ValueError, match="logits"):
            fn(logits.long(), target)
        with pytest.raises(ValueError, match="target"):
            fn(logits, target.double())
        with pytest.raises(ValueError, match="target"):
            fn(logits, target[0])
        with pytest.raises(ValueError, match="batch"):
            fn(logits, target[:1])
    with pytest.raises(ValueError, match="outputs_per_scale"):
        msc_loss(logits, logits, target)
    with pytest.raises(ValueError, match=r"outputs_per_scale\[1\]"):
        msc_loss([logits, logits[0]], logits, target)
    with pytest.raises(ValueError, match="fused"):
        msc_loss([logits], logits[:, :3], target)
    with pytest.raises(ValueError, match="fused"):
        msc_loss([logits], logits.long(), target)
    with pytest.raises(ValueError, match="target"):
        msc_loss([logits], logits, target.float())
    with pytest.raises(ValueError, match="empty"):
        msc_loss([], None, target)


# ------------------------------------------------------------------------------------------ poly lr and groups
def test_poly_lr():
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.01}, {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.1}],
                          lr=0.01, momentum=0.9)
    sched = poly_lr(opt, max_steps=10)
    assert isinstance(sched, torch.optim.lr_scheduler.PolynomialLR)
    for k in range(13):
        expected = [base * (1 - min(k, 10) / 10) ** 0.9 for base in (0.01, 0.1)]
        for group, e in zip(opt.param_groups, expected):
            assert group["lr"] == pytest.approx(e, rel=1e-9, abs=1e-15), k
        opt.step()
        sched.step()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_steps"):
            poly_lr(opt, bad)
    with pytest.raises(ValueError, match="power"):
        poly_lr(opt, 5, power=-1.0)
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = poly_lr(opt2, 4, power=2.0)
    for _ in range(3):
        opt2.step()
        sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx((1 - 3 / 4) ** 2)


def _check_groups(model, groups, base_lr, head_modules, wd=5e-4, mult=10.0):
    trainable = [p for p in model.parameters() if p.requires_grad]
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(trainable), "each trainable parameter in exactly one group"
    assert set(seen) == {id(p) for p in trainable}
    head_ids = {id(p) for m in head_modules for p in m.parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    assert head_ids, "no head parameters"
    for g in groups:
        is_head = g["name"].startswith("head")
        is_bias = g["name"].endswith("bias")
        assert g["lr"] == pytest.approx(base_lr * (mult if is_head else 1.0))
        assert g["weight_decay"] == (0.0 if is_bias else wd)
        for p in g["params"]:
            assert (id(p) in head_ids) == is_head, names[id(p)]
            assert names[id(p)].endswith("bias") == is_bias, names[id(p)]
    assert groups[0]["name"] == "backbone" and groups[1]["name"] == "head"
    torch.optim.SGD(groups, lr=base_lr, momentum=0.9)  # SGD accepts them


@pytest.mark.parametrize("name", sorted(MODELS))
def test_param_groups_every_model(name):
    torch.manual_seed(0)
    model = get_model(name, num_classes=3)
    groups = param_groups(model, 2.5e-4)
    heads = [getattr(model, a) for a in HEAD_ATTRIBUTES if isinstance(getattr(model, a, None), nn.Module)]
    _check_groups(model, groups, 2.5e-4, heads)
    expected_heads = {"deeplab_v1_largefov": ["fc8"], "deeplab_v1_msc_largefov": ["fc8", "msc"],
                      "deeplab_v2_resnet101": ["aspp"], "deeplab_v3_resnet50": ["classifier"],
                      "deeplab_v3_resnet101": ["classifier"], "deeplab_v3_mobilenet_v3_large": ["classifier"],
                      "lraspp_mobilenet_v3_large": ["classifier"],
                      **{f"deeplab_v3plus_{b}": ["aspp", "classifier", "low_level", "decoder"]
                         for b in ("resnet50", "resnet101", "mobilenet_v2")}}[name]
    assert heads == [getattr(model, a) for a in expected_heads]


def test_param_groups_options():
    torch.manual_seed(0)
    model = get_model("deeplab_v3_resnet50", num_classes=3, aux_loss=True)
    _check_groups(model, param_groups(model, 0.01), 0.01, [model.classifier, model.aux_classifier])
    # frozen parameters are left out; an explicit head; other multipliers
    for p in model.backbone.conv1.parameters():
        p.requires_grad_(False)
    groups = param_groups(model, 0.01, weight_decay=1e-4, head_lr_mult=1.0, head=[model.classifier])
    _check_groups(model, groups, 0.01, [model.classifier], wd=1e-4, mult=1.0)
    groups = param_groups(model, 0.01, head=model.classifier[-1])
    _check_groups(model, groups, 0.01, [model.classifier[-1]])
    with pytest.raises(ValueError, match="head"):
        param_groups(nn.Sequential(nn.Conv2d(3, 3, 1)), 0.01)
    with pytest.raises(ValueError, match="head"):
        param_groups(model, 0.01, head=nn.Conv2d(3, 3, 1))  # not the model's
    with pytest.raises(ValueError, match="base_lr"):
        param_groups(model, -1.0)


# ---------------------------------------------------------------------------------------------- VOC dataset
@pytest.fixture(scope="module")
def synthetic_voc(tmp_path_factory):
    return make_synthetic_voc(tmp_path_factory.mktemp("voc") / "VOC2012", num_train=12, num_val=4,
                              size=(48, 64), num_classes=4, seed=0)


def test_synthetic_voc_is_deterministic(tmp_path):
    a = make_synthetic_voc(tmp_path / "a", num_train=3, num_val=1, size=(40, 50), seed=7)
    b = make_synthetic_voc(tmp_path / "b", num_train=3, num_val=1, size=(40, 50), seed=7)
    c = make_synthetic_voc(tmp_path / "c", num_train=3, num_val=1, size=(40, 50), seed=8)
    for sub in ("JPEGImages/train_000002.jpg", "SegmentationClass/train_000002.png"):
        assert (a / sub).read_bytes() == (b / sub).read_bytes()
        assert (a / sub).read_bytes() != (c / sub).read_bytes()
    lbl = Image.open(a / "SegmentationClass/train_000000.png")
    assert lbl.mode == "P" and lbl.getpalette()[3:6] == [128, 0, 0]  # the VOC colour of class 1
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_voc(tmp_path / "d", num_classes=1)


def test_voc_dataset_on_synthetic(synthetic_voc):
    train, val = VOCSegmentation(synthetic_voc), VOCSegmentation(synthetic_voc, split="val")
    assert (len(train), len(val)) == (12, 4)
    assert len(VOCSegmentation(synthetic_voc, split="trainval")) == 16
    assert train.ids[0] == "train_000000" and val.ids[-1] == "val_000003"
    labels = set()
    for i in range(len(train)):
        image, target = train[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 48, 64)
        assert target.dtype == torch.int64 and target.shape == (48, 64)
        labels |= set(target.unique().tolist())
    assert labels <= {0, 1, 2, 3, 255} and {0, 255} < labels and len(labels) >= 4
    seen = []
    ds = VOCSegmentation(synthetic_voc, transform=lambda im, t: seen.append(1) or (im.float(), t + 1))
    image, target = ds[0]
    assert seen and image.dtype == torch.float32 and target.min() == 1


def test_voc_dataset_errors(tmp_path, synthetic_voc):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        VOCSegmentation(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="test.txt"):
        VOCSegmentation(synthetic_voc, split="test")
    with pytest.raises(FileNotFoundError, match="train_aug.txt"):
        VOCSegmentation(synthetic_voc, augmented=True)
    root = tmp_path / "copy"
    shutil.copytree(synthetic_voc, root)
    (root / "JPEGImages" / "train_000003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="train_000003.jpg"):
        VOCSegmentation(root)
    VOCSegmentation(root, split="val")  # other splits still load
    (root / "SegmentationClass" / "val_000001.png").unlink()
    with pytest.raises(FileNotFoundError, match="val_000001.png"):
        VOCSegmentation(root, split="val")
    # an RGB label is refused
    root2 = tmp_path / "rgb"
    shutil.copytree(synthetic_voc, root2)
    Image.open(root2 / "SegmentationClass" / "val_000000.png").convert("RGB").save(
        root2 / "SegmentationClass" / "val_000000.png")
    with pytest.raises(ValueError, match="val_000000.png"):
        VOCSegmentation(root2, split="val")[0]


def test_voc_dataset_finds_vocdevkit(tmp_path):
    make_synthetic_voc(tmp_path / "VOCdevkit" / "VOC2012", num_train=2, num_val=1, size=(32, 32))
    for root in (tmp_path, tmp_path / "VOCdevkit", str(tmp_path / "VOCdevkit" / "VOC2012")):
        ds = VOCSegmentation(root)
        assert len(ds) == 2 and ds.root == tmp_path / "VOCdevkit" / "VOC2012"


def test_voc_dataset_augmented_layout(tmp_path, synthetic_voc):
    root = tmp_path / "aug"
    shutil.copytree(synthetic_voc, root)
    aug = root / "SegmentationClassAug"
    aug.mkdir()
    ids = ["train_000001", "train_000004", "val_000002"]
    for i in ids:  # grey PNGs, labels shifted so that they differ from SegmentationClass
        lbl = np.array(Image.open(root / "SegmentationClass" / f"{i}.png"))
        lbl = np.where(lbl == 255, 255, (lbl + 1) % 4).astype(np.uint8)
        Image.fromarray(lbl).save(aug / f"{i}.png")
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text(
        "train_000001\n/JPEGImages/train_000004.jpg /SegmentationClassAug/train_000004.png\n\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("val_000002\n")
    ds = VOCSegmentation(root, split="train", augmented=True)
    assert ds.ids == ["train_000001", "train_000004"]
    _, target = ds[1]
    expected = np.array(Image.open(aug / "train_000004.png")).astype(np.int64)
    assert target.dtype == torch.int64 and np.array_equal(target.numpy(), expected)
    plain = np.array(Image.open(root / "SegmentationClass" / "train_000004.png"))
    assert not np.array_equal(expected, plain)
    val = VOCSegmentation(root, split="val", augmented=True)
    assert val.ids == ["val_000002"] and val.labels[0] == aug / "val_000002.png"
    with pytest.raises(FileNotFoundError, match="train_000002.png"):
        (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("train_000002\n")
        VOCSegmentation(root, augmented=True)


# ------------------------------------------------------------------------------------------------ transforms
def _expected_norm(rgb, mode):
    if mode == "torchvision":
        return [(c / 255.0 - m) / s for c, m, s in zip(rgb, IMAGENET_MEAN, IMAGENET_STD)]
    return [c - m for c, m in zip(rgb[::-1], CAFFE_MEAN_BGR)]


@pytest.mark.parametrize("mode", ["torchvision", "caffe"])
def test_normalisation_on_constant_image(mode):
    rgb = (200, 30, 111)
    image = torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand(3, 40, 50).contiguous()
    target = torch.zeros(40, 50, dtype=torch.int64)
    expected = torch.tensor(_expected_norm(rgb, mode), dtype=torch.float32).view(3, 1, 1)
    for x, _ in (TrainTransform(crop_size=(24, 32), mode=mode, generator=0)(image, target),
                 EvalTransform(mode)(image, target)):
        assert x.dtype == torch.float32
        assert torch.allclose(x, expected.expand_as(x), rtol=1e-6, atol=1e-5)
    assert torch.allclose(normalize(image, mode), expected.expand(3, 40, 50), rtol=1e-6, atol=1e-5)
    # the mean colour normalises to 0, the padding value
    if mode == "caffe":
        mean = torch.tensor([round(v) for v in CAFFE_MEAN_BGR[::-1]], dtype=torch.uint8).view(3, 1, 1)
        assert normalize(mean, mode).abs().max() < 0.7


def test_train_transform_shapes_and_padding():
    g = seeded(5)
    image = torch.randint(0, 256, (3, 20, 30), generator=g, dtype=torch.uint8)
    target = torch.randint(0, 3, (20, 30), generator=g)
    x, y = TrainTransform(crop_size=64, scale_range=None, flip=False, generator=0)(image, target)
    assert x.shape == (3, 64, 64) and y.shape == (64, 64) and y.dtype == torch.int64
    assert torch.equal(y[:20, :30], target)
    assert (y[20:] == 255).all() and (y[:, 30:] == 255).all()
    assert (x[:, 20:] == 0).all() and (x[:, :, 30:] == 0).all()
    assert torch.allclose(x[:, :20, :30], normalize(image))
    _, y = TrainTransform(crop_size=(25, 28), scale_range=None, flip=False, ignore_index=-1,
                          generator=1)(image, target)
    assert y.shape == (25, 28) and (y[20:] == -1).all() and (y[:20] != -1).all()
    # random scaling: shapes always the crop size, labels stay labels
    t = TrainTransform(crop_size=(33, 41), scale_range=(0.5, 2.0), generator=2)
    for _ in range(10):
        x, y = t(image, target)
        assert x.shape == (3, 33, 41) and y.shape == (33, 41)
        assert set(y.unique().tolist()) <= {0, 1, 2, 255}
    # a fixed scale 2: the target is the nearest upsampling
    x, y = TrainTransform(crop_size=(40, 60), scale_range=(2, 2), flip=False, generator=0)(image, target)
    assert torch.equal(y, target.repeat_interleave(2, 0).repeat_interleave(2, 1))
    up = F.interpolate(normalize(image)[None], size=(40, 60), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(x, up, atol=1e-5)


def test_train_transform_flip_and_crop_are_consistent():
    H, W = 16, 40
    cols = torch.arange(W)
    image = torch.zeros(3, H, W, dtype=torch.uint8)
    image[0] = (cols * 5).to(torch.uint8)  # red encodes the column
    image[1, : H // 2] = 255  # and green the top half: asymmetric
    target = (cols % 3).expand(H, W).clone()
    target[: H // 2] += 3
    flips = set()
    for seed in range(12):
        x, y = TrainTransform(crop_size=(12, 24), scale_range=None, mode="caffe", generator=seed)(image, target)
        col = torch.round((x[2] + CAFFE_MEAN_BGR[2]) / 5).long()  # red is channel 2 in BGR
        top = (x[1] + CAFFE_MEAN_BGR[1]) > 128
        assert torch.equal(y, col % 3 + 3 * top.long())
        flips.add(bool(col[0, 0] > col[0, -1]))
    assert flips == {True, False}
    # reproducible from the seed / generator
    a = TrainTransform(crop_size=(12, 24), generator=3)(image, target)
    b = TrainTransform(crop_size=(12, 24), generator=torch.Generator().manual_seed(3))(image, target)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_transform_errors_and_eval():
    image = torch.zeros(3, 10, 12, dtype=torch.uint8)
    target = torch.zeros(10, 12, dtype=torch.int64)
    with pytest.raises(ValueError, match="image"):
        TrainTransform(crop_size=8)(image.float(), target)
    with pytest.raises(ValueError, match="target"):
        TrainTransform(crop_size=8)(image, target[:5])
    with pytest.raises(ValueError, match="mode"):
        TrainTransform(mode="bgr")
    with pytest.raises(ValueError, match="crop_size"):
        TrainTransform(crop_size=0)
    with pytest.raises(ValueError, match="scale_range"):
        TrainTransform(scale_range=(1.5, 0.5))
    x, y = EvalTransform()(image, target.int())
    assert x.shape == (3, 10, 12) and x.dtype == torch.float32 and y.dtype == torch.int64
    x, y = EvalTransform("caffe")(image)
    assert y is None and torch.allclose(x, -torch.tensor(CAFFE_MEAN_BGR).view(3, 1, 1).expand(3, 10, 12))
    with pytest.raises(ValueError, match="mode"):
        EvalTransform("x")


def test_train_on_dataset_end_to_end(synthetic_voc):
    """The dataset + transform + loss + metrics chain on a batch (a smoke test of the pieces together)."""
    ds = VOCSegmentation(synthetic_voc, transform=TrainTransform(crop_size=33, generator=0))
    x, y = torch.utils.data.default_collate([ds[i] for i in range(4)])
    assert x.shape == (4, 3, 33, 33) and y.shape == (4, 33, 33)
    logits = torch.randn(4, 4, 5, 5, requires_grad=True)
    loss = downsampled_cross_entropy(logits, y)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad.abs().sum() > 0
    cm = ConfusionMatrix(4).update(F.interpolate(logits, size=(33, 33)).argmax(1), y)
    assert int(cm.matrix.sum()) == int((y != 255).sum())
