"""The trainable dense CRF (``DenseCRF(trainable=True)``, CRF-as-RNN) and the ``train --crf-rnn`` stage.

- The layer: the default stays the parameter-free post-processing; a trainable layer starts exactly at its preset
  (Potts weights, or ``-w * I`` matrices), trains its compatibilities and the logits below it, round-trips its
  state dict, moves between devices, runs under autocast and under ``torch.compile(fullgraph=True)`` with a
  backward, and refuses what it cannot learn (the bandwidths: ``NotImplementedError`` naming them).
- Learning: on a synthetic set made here (noisy images whose colour edges carry the labels, a small network
  whose logits are coarse), fine-tuning the network through the CRF with learned compatibilities beats the same
  fine-tuning through the CRF fixed at its preset, on held-out images, by a clear margin.
- The training stage: ``denormalize``, ``CRFasRNNHead``, the engine's gradients through the head, and the
  ``train --crf-rnn`` / ``eval --trained-crf`` commands on ``make_synthetic_voc``.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import cpu_and_cuda
from torch import nn

from deeplab_fast.cli import main
from deeplab_fast.data import make_synthetic_voc, normalize
from deeplab_fast.nn import DenseCRF
from deeplab_fast.ops import dense_crf
from deeplab_fast.train import (CRFasRNNHead, CRFasRNNStage, TrainConfig, build_training, compute_loss, denormalize,
                                load_trained_crf)

PRESETS = ("pydensecrf", "deeplab_v2_voc")


def _inputs(B=2, L=4, h=6, w=8, H=24, W=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, h, w, generator=g) * 2
    image = torch.randint(0, 256, (B, 3, H, W), generator=g, dtype=torch.uint8)
    return logits, image


# ---------------------------------------------------------------------------------------------------------
# the layer


def test_default_layer_is_unchanged_post_processing():
    logits, image = _inputs()
    logits.requires_grad_(True)
    crf = DenseCRF.from_preset("deeplab_v2_voc")
    assert list(crf.parameters()) == [] and crf.state_dict() == {} and not crf.trainable
    q = crf(logits, image)
    assert not q.requires_grad  # no_grad post-processing
    ref = dense_crf(-F.log_softmax(F.interpolate(logits.detach(), size=(24, 32), mode="bilinear",
                                                 align_corners=False), dim=1), image, iterations=10,
                    gaussian_sxy=1.0, gaussian_compat=3.0, bilateral_sxy=67.0, bilateral_srgb=3.0,
                    bilateral_compat=4.0)
    assert torch.equal(q, ref)
    assert repr(DenseCRF()) == ("DenseCRF(iterations=10, gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=80.0, "
                                "bilateral_srgb=13.0, bilateral_compat=10.0)")


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("compat", ["potts", "matrix"])
def test_trainable_layer_starts_at_its_preset(preset, compat):
    """A Potts weight w is the matrix compatibility -w * I: both initialisations give the preset's marginals."""
    logits, image = _inputs(L=5)
    fixed = DenseCRF.from_preset(preset)(logits, image)
    crf = DenseCRF.from_preset(preset, trainable=True, compat=compat, num_classes=5)
    names = [n for n, _ in crf.named_parameters()]
    assert names == ["gaussian_compat", "bilateral_compat"]
    shape = () if compat == "potts" else (5, 5)
    assert all(tuple(p.shape) == shape and p.dtype == torch.float32 for p in crf.parameters())
    if compat == "matrix":
        assert torch.equal(crf.bilateral_compat.detach(), -PRESETS_W[preset] * torch.eye(5))
    q = crf(logits, image)
    assert q.requires_grad and torch.equal(q.detach(), fixed)
    assert "(learned" in repr(crf) and f"compat={compat!r}" in repr(crf)


PRESETS_W = {"pydensecrf": 10.0, "deeplab_v2_voc": 4.0}  # their bilateral Potts weights


def test_trainable_layer_gradients():
    """Gradients reach the logits and both compatibilities; a matrix's is symmetric; the Potts weight's agrees
    with a finite difference; checkpoint=True gives the same gradients; only named terms are learned."""
    logits, image = _inputs(L=4)
    target = torch.randint(0, 4, (2, 24, 32), generator=torch.Generator().manual_seed(1))

    def loss_of(crf, lg):
        return F.nll_loss(torch.log(crf(lg, image) + 1e-6), target)

    grads = {}
    for ckpt in (False, True):
        crf = DenseCRF.from_preset("pydensecrf", trainable=True, compat="matrix", num_classes=4, iterations=4,
                                   checkpoint=ckpt)
        lg = logits.clone().requires_grad_(True)
        loss_of(crf, lg).backward()
        grads[ckpt] = (lg.grad, crf.gaussian_compat.grad, crf.bilateral_compat.grad)
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads[ckpt])
        for g in grads[ckpt][1:]:
            assert torch.allclose(g, g.T, rtol=1e-5, atol=1e-8)
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

    crf = DenseCRF.from_preset("pydensecrf", trainable=True, iterations=4)
    loss_of(crf, logits).backward()
    h = 0.05
    with torch.no_grad():
        w = crf.bilateral_compat.clone()
        crf.bilateral_compat.copy_(w + h)
        up = loss_of(crf, logits)
        crf.bilateral_compat.copy_(w - h)
        down = loss_of(crf, logits)
    assert float(crf.bilateral_compat.grad) == pytest.approx(float(up - down) / (2 * h), rel=2e-2)

    only = DenseCRF.from_preset("pydensecrf", trainable="bilateral_compat")
    assert [n for n, _ in only.named_parameters()] == ["bilateral_compat"] and only.gaussian_compat == 3.0
    lg = logits.clone().requires_grad_(True)
    loss_of(only, lg).backward()
    assert lg.grad.abs().sum() > 0 and only.bilateral_compat.grad is not None


def test_frozen_trainable_layer_still_passes_gradients_to_the_logits():
    """requires_grad_(False) on a trainable layer fixes the CRF but keeps it differentiable for the network (the
    baseline of the learning test)."""
    logits, image = _inputs()
    crf = DenseCRF.from_preset("pydensecrf", trainable=True).requires_grad_(False)
    lg = logits.clone().requires_grad_(True)
    crf(lg, image)[:, 0].sum().backward()
    assert lg.grad.abs().sum() > 0 and crf.bilateral_compat.grad is None


def test_state_dict_config_and_repr_round_trip():
    logits, image = _inputs(L=3)
    crf = DenseCRF.from_preset("deeplab_v2_voc", trainable=True, compat="matrix", num_classes=3, iterations=5)
    with torch.no_grad():
        crf.gaussian_compat.add_(torch.tensor([[0.0, 0.5, -0.2], [0.5, 0.3, 0.1], [-0.2, 0.1, -1.0]]))
        crf.bilateral_compat.mul_(1.5)
    state = crf.state_dict()
    assert set(state) == {"gaussian_compat", "bilateral_compat"}
    again = DenseCRF(**crf.config())
    assert not torch.equal(again(logits, image), crf(logits, image))
    again.load_state_dict(state)
    assert torch.equal(again(logits, image), crf(logits, image))
    assert again.config() == crf.config() and repr(again) == repr(crf)
    assert "iterations=5" in repr(crf) and "matrix[3, 3] (learned, initial Potts 3.0)" in repr(crf)
    potts = DenseCRF(trainable=True)
    potts.load_state_dict({"gaussian_compat": torch.tensor(1.5), "bilateral_compat": torch.tensor(7.0)})
    assert "gaussian_compat=1.5 (learned)" in repr(potts) and "bilateral_compat=7 (learned)" in repr(potts)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_device_move_and_autocast(device):
    logits, image = _inputs(L=4)
    crf = DenseCRF(trainable=True, compat="matrix", num_classes=4, iterations=3)
    ref = crf(logits, image)
    moved = crf.to(device)
    assert moved.bilateral_compat.device.type == device
    lg = logits.to(device).requires_grad_(True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        q = moved(lg, image.to(device))
    assert q.dtype == torch.float32 and q.device.type == device
    torch.testing.assert_close(q.cpu(), ref.detach(), rtol=1e-4, atol=1e-4)
    q[:, 1].sum().backward()
    assert lg.grad.abs().sum() > 0 and moved.gaussian_compat.grad.device.type == device


def test_layer_errors():
    with pytest.raises(NotImplementedError, match="bilateral_srgb"):
        DenseCRF(trainable=["bilateral_compat", "bilateral_srgb"])
    for name in ("gaussian_sxy", "bilateral_sxy"):
        with pytest.raises(NotImplementedError, match=name):
            DenseCRF(trainable=name)
    with pytest.raises(ValueError, match="trainable names"):
        DenseCRF(trainable="iterations")
    with pytest.raises(ValueError, match="trainable must be"):
        DenseCRF(trainable=3)
    with pytest.raises(ValueError, match="compat must be one of"):
        DenseCRF(trainable=True, compat="diagonal")
    with pytest.raises(ValueError, match="needs num_classes"):
        DenseCRF(trainable=True, compat="matrix")
    with pytest.raises(ValueError, match="needs trainable=True"):
        DenseCRF(compat="matrix", num_classes=3)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        DenseCRF(trainable=True, compat="matrix", num_classes=0)
    with pytest.raises(ValueError, match="finite number"):
        DenseCRF(trainable=True, bilateral_compat=float("nan"))
    logits, image = _inputs(L=4)
    with pytest.raises(ValueError, match="logits have 4 classes.*matrices 3"):
        DenseCRF(trainable=True, compat="matrix", num_classes=3)(logits, image)
    with pytest.raises(ValueError, match="larger than the image"):
        DenseCRF(trainable=True)(logits, image[..., :4, :4])


# ---------------------------------------------------------------------------------------------------------
# the layer's kernel normalisation (pydensecrf's choices; CRF-as-RNN normalises after filtering)


def _image_features(image, sxy_g, sxy_b, srgb):
    """pydensecrf DenseCRF2D's features, made here from pixel positions and colours (not by the op)."""
    B, _, H, W = image.shape
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    pos = torch.stack([x.reshape(-1), y.reshape(-1)])[None].expand(B, 2, H * W)
    rgb = image.reshape(B, 3, H * W).float()
    return [pos / sxy_g, torch.cat([pos / sxy_b, rgb / srgb], 1)]


NORMALIZATION_NUMBERS = {"none": 0, "before": 1, "after": 2, "symmetric": 3}


@pytest.mark.parametrize("normalization", ["none", "before", "after", "symmetric", 2])
def test_layer_normalization_is_dense_crf_features_with_it(normalization):
    """DenseCRF(normalization=n) computes dense_crf_features with the image's features and n for both terms."""
    from deeplab_fast.ops import dense_crf_features

    logits, image = _inputs(B=2, L=4)
    preset = dict(iterations=5, gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=20.0, bilateral_srgb=13.0,
                  bilateral_compat=10.0)
    crf = DenseCRF(**preset, normalization=normalization)
    q = crf(logits, image)
    n = NORMALIZATION_NUMBERS.get(normalization, normalization)
    unary = crf.unary(logits, image)
    B, L, H, W = unary.shape
    ref = dense_crf_features(unary.reshape(B, L, H * W), _image_features(image, 3.0, 20.0, 13.0), [3.0, 10.0],
                             [n, n], iterations=5).reshape(B, L, H, W)
    torch.testing.assert_close(q, ref, rtol=0, atol=1e-5)
    others = {m: DenseCRF(**preset, normalization=m)(logits, image) for m in ("symmetric", "after")}
    assert (others["symmetric"] - others["after"]).abs().max() > 1e-3  # the argument changes the model
    assert crf.config()["normalization"] == {2: "after"}.get(normalization, normalization)
    assert DenseCRF(**crf.config()).normalization == crf.normalization


def test_layer_normalize_after_matches_pydensecrf():
    """CRF-as-RNN's model (NORMALIZE_AFTER) against pydensecrf2 on a real photo: bit for bit on the CPU (bar 1e-4)."""
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    skdata = pytest.importorskip("skimage.data")
    img = np.ascontiguousarray(skdata.astronaut()[100:164, 180:260])  # 64x80 RGB
    H, W, _ = img.shape
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 5, H // 4, W // 4, generator=g) * 2
    image = torch.from_numpy(img).permute(2, 0, 1)[None].contiguous()
    crf = DenseCRF.from_preset("pydensecrf", normalization=dcrf.NORMALIZE_AFTER)
    q = crf(logits, image)[0].reshape(5, -1).numpy()
    d = dcrf.DenseCRF2D(W, H, 5)
    d.setUnaryEnergy(np.ascontiguousarray(crf.unary(logits, image)[0].reshape(5, -1).numpy()))
    d.addPairwiseGaussian(sxy=3, compat=3, normalization=dcrf.NORMALIZE_AFTER)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=img, compat=10, normalization=dcrf.NORMALIZE_AFTER)
    ref = np.array(d.inference(10))
    assert np.abs(q - ref).max() <= 1e-4
    symmetric = DenseCRF.from_preset("pydensecrf")(logits, image)[0].reshape(5, -1).numpy()
    assert np.abs(symmetric - ref).max() > 1e-3  # and the default is another model


def test_trainable_layer_with_normalize_after_learns():
    logits, image = _inputs(L=3)
    lg = logits.clone().requires_grad_(True)
    crf = DenseCRF(trainable=True, compat="matrix", num_classes=3, iterations=3, normalization="after")
    q = crf(lg, image)
    q[:, 0].sum().backward()
    for t in (lg.grad, crf.gaussian_compat.grad, crf.bilateral_compat.grad):
        assert t is not None and torch.isfinite(t).all() and t.abs().sum() > 0
    assert "normalization='after'" in repr(crf)


@pytest.mark.parametrize("bad", ["sym", 4, -1, True, 2.0, None])
def test_layer_normalization_errors(bad):
    with pytest.raises(ValueError, match=r"normalization must be one of \('none', 'before', 'after', 'symmetric'\)"):
        DenseCRF(normalization=bad)


class _Segmenter(nn.Module):
    """A model with the trainable CRF inside its forward (uint8 image in, marginals out)."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.net = nn.Conv2d(3, num_classes, 1)
        self.crf = DenseCRF.from_preset("pydensecrf", trainable=True, compat="matrix", num_classes=num_classes,
                                        iterations=3)

    def forward(self, image):
        logits = self.net(F.avg_pool2d(image.float() / 255 - 0.5, 4))
        return self.crf(logits, image)


def test_torch_compile_fullgraph_with_backward():
    """The layer inside a model's forward, compiled whole (fullgraph=True) and differentiated: outputs and the
    gradients of the network and of the CRF match eager mode."""
    torch.manual_seed(0)
    _, image = _inputs(L=4)
    target = torch.randint(0, 4, (2, 24, 32), generator=torch.Generator().manual_seed(2))
    eager = _Segmenter()
    compiled_model = _Segmenter()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    results = []
    for model, fn in ((eager, eager), (compiled_model, compiled)):
        q = fn(image)
        F.nll_loss(torch.log(q + 1e-6), target).backward()
        results.append((q.detach(), model.net.weight.grad, model.crf.gaussian_compat.grad,
                        model.crf.bilateral_compat.grad))
    for a, b in zip(*results):
        assert b is not None and b.abs().sum() > 0
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# learning the compatibilities on a synthetic set

H, W, L = 48, 64, 4
# Class colours (background grey, red, green, blue); every region's colour is jittered, and the pixel noise (std
# 40) is strong, so that the network, reading colours averaged over 4x4 blocks, gives coarse, blurry-edged scores.
COLOURS = np.array([(110, 110, 110), (200, 60, 60), (60, 170, 70), (70, 80, 200)], np.float32)


def _synthetic(n: int, seed: int):
    """n (image uint8 [3, H, W], label [H, W]) pairs: 2-4 discs and rectangles of classes 1-3 on a background,
    with the labels exactly on the colour edges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    images, labels = [], []
    for _ in range(n):
        label = np.zeros((H, W), np.int64)
        img = np.empty((H, W, 3), np.float32)
        img[:] = COLOURS[0] + rng.uniform(-10, 10, 3)
        for _ in range(int(rng.integers(2, 5))):
            k = int(rng.integers(1, L))
            if rng.random() < 0.5:
                r, cy, cx = rng.uniform(5, 14), rng.uniform(0, H), rng.uniform(0, W)
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                h, w, y0, x0 = rng.uniform(6, 24), rng.uniform(6, 30), rng.uniform(-4, H - 4), rng.uniform(-4, W - 4)
                mask = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
            img[mask] = COLOURS[k] + rng.uniform(-10, 10, 3)
            label[mask] = k
        img += rng.normal(0, 40, img.shape)
        images.append(np.clip(img, 0, 255).astype(np.uint8).transpose(2, 0, 1))
        labels.append(label)
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels))


class _CoarseNet(nn.Module):
    """Scores at 1/4 resolution from 4x4-averaged colours (the CRF upsamples them)."""

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, L, 1))

    def forward(self, image):
        return self.f(F.avg_pool2d(image.float() / 255 - 0.5, 4))


def _miou(pred, label):
    cm = torch.bincount((label * L + pred).flatten(), minlength=L * L).reshape(L, L).double()
    iou = cm.diag() / (cm.sum(0) + cm.sum(1) - cm.diag())
    return iou[~iou.isnan()].mean().item()


STEPS, BATCH, CRF_LR, NET_LR, ITERATIONS = 30, 8, 0.2, 0.003, 5


@contextlib.contextmanager
def _one_thread():
    """Tiny tensors: one thread is fastest, and on a busy machine OpenMP's spin-waiting makes two 30x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def learning_setup():
    """(train set, held-out set, the pretrained network's state, results of the fixed-CRF fine-tune)."""
    with _one_thread():
        return _learning_setup()


def _learning_setup():
    torch.manual_seed(0)
    train_set, test_set = _synthetic(64, seed=1), _synthetic(32, seed=2)
    net = _CoarseNet()
    opt = torch.optim.Adam(net.parameters(), 0.05)
    for _ in range(150):  # pretraining without the CRF (plain cross-entropy on the upsampled scores)
        i = torch.randint(0, 64, (BATCH,))
        scores = F.interpolate(net(train_set[0][i]), size=(H, W), mode="bilinear", align_corners=False)
        loss = F.cross_entropy(scores, train_set[1][i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    fixed = _fine_tune(state, train_set, test_set, compat="potts", train_crf=False)
    return train_set, test_set, state, fixed


def _fine_tune(state, train_set, test_set, *, compat, train_crf):
    """CRF-as-RNN fine-tuning of the pretrained network through the pydensecrf-preset CRF, its compatibilities
    learned or fixed; returns held-out mIoU before / after, the network's first gradient norm and the time."""
    torch.manual_seed(1)
    net = _CoarseNet()
    net.load_state_dict(state)
    crf = DenseCRF.from_preset("pydensecrf", trainable=True, compat=compat, num_classes=L, iterations=ITERATIONS)
    groups = [dict(params=list(net.parameters()), lr=NET_LR)]
    if train_crf:
        groups.append(dict(params=list(crf.parameters()), lr=CRF_LR))
    else:
        crf.requires_grad_(False)
    opt = torch.optim.Adam(groups)
    with torch.no_grad():
        before = _miou(crf(net(test_set[0]), test_set[0]).argmax(1), test_set[1])
    start, first_grad = time.perf_counter(), None
    for _ in range(STEPS):
        i = torch.randint(0, 64, (BATCH,))
        q = crf(net(train_set[0][i]), train_set[0][i])
        loss = F.nll_loss(torch.log(q + 1e-6), train_set[1][i])
        opt.zero_grad()
        loss.backward()
        if first_grad is None:
            first_grad = sum(float(p.grad.norm()) for p in net.parameters())
        opt.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        after = _miou(crf(net(test_set[0]), test_set[0]).argmax(1), test_set[1])
        no_crf = _miou(F.interpolate(net(test_set[0]), size=(H, W), mode="bilinear").argmax(1), test_set[1])
    return dict(before=before, after=after, no_crf=no_crf, first_grad=first_grad, seconds=seconds,
                crf=crf, net=net)


@pytest.mark.parametrize("compat", ["potts", "matrix"])
def test_learned_compatibilities_beat_the_fixed_preset(learning_setup, compat):
    """The same 30 steps of end-to-end fine-tuning (batch 8, Adam: network lr 0.003, CRF lr 0.2), through the
    pydensecrf preset's CRF (5 iterations) with its compatibilities fixed or learned: held-out mIoU. Measured
    (these seeds, 1 thread of a 2-core EPYC): the fixed-preset CRF 0.865 before and 0.909 after fine-tuning the
    network through it (no CRF after it: 0.890; the preset over-smooths these small noisy images); learned
    compatibilities 0.946 (Potts: 3 -> 1.54 and 10 -> 4.90) and 0.951 (matrices); other torch seeds gave the
    same margins (+0.033 to +0.047). Each 30-step run takes 6-8 s."""
    train_set, test_set, state, fixed = learning_setup
    with _one_thread():
        learned = _fine_tune(state, train_set, test_set, compat=compat, train_crf=True)
    assert learned["before"] == pytest.approx(fixed["before"])  # the same start: the preset, the same network
    # the network's weights receive gradients through the CRF, in both runs, and move
    for run in (fixed, learned):
        assert run["first_grad"] > 0
        assert not torch.equal(run["net"].f[0].weight.detach(), state["f.0.weight"])
    assert float(fixed["crf"].bilateral_compat) == 10.0  # fixed: the preset
    assert not torch.equal(learned["crf"].bilateral_compat.detach(),
                           DenseCRF.from_preset("pydensecrf", trainable=True, compat=compat,
                                                num_classes=L).bilateral_compat.detach())
    assert fixed["after"] > fixed["before"]  # fine-tuning the network alone helps too...
    assert learned["after"] > fixed["after"] + 0.02, (compat, fixed["after"], learned["after"])  # ...learning more
    assert learned["after"] > learned["no_crf"], (learned["no_crf"], learned["after"])


# ---------------------------------------------------------------------------------------------------------
# the training stage: normalisation, head, engine, command line


@pytest.mark.parametrize("mode", ["torchvision", "caffe"])
def test_denormalize_inverts_normalize(mode):
    image = torch.randint(0, 256, (2, 3, 17, 23), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    image[0, :, 0, 0] = 0
    image[0, :, 0, 1] = 255
    assert torch.equal(denormalize(normalize(image, mode), mode), image)
    assert torch.equal(denormalize(normalize(image[0], mode), mode), image[0])
    mean = denormalize(torch.zeros(3, 2, 2), mode)[:, 0, 0].tolist()  # the padding value: the mean colour
    assert mean == ([124, 116, 104] if mode == "torchvision" else [123, 117, 104])
    with pytest.raises(ValueError, match="mode must be one of"):
        denormalize(normalize(image, mode), "rgb")
    with pytest.raises(ValueError, match="floating-point"):
        denormalize(image, mode)


def test_head_refines_the_final_scores_of_every_output_form():
    torch.manual_seed(0)
    _, image = _inputs(L=4)
    x = normalize(image, "caffe")
    scores = torch.randn(2, 4, 3, 4)
    crf = DenseCRF(trainable=True, iterations=2)
    head = CRFasRNNHead(crf, "caffe")
    expected = torch.log(crf(scores, image) + 1e-6)
    out = head(scores, x)
    assert torch.equal(out, expected) and out.shape == (2, 4, 24, 32)
    assert torch.allclose(out.exp().sum(1), torch.ones(2, 24, 32), atol=1e-4)
    msc = head([scores * 2, scores * 3, scores], x)
    assert torch.equal(msc[-1], expected) and torch.equal(msc[0], scores * 2)
    v3 = head({"out": scores, "aux": scores * 2}, x)
    assert torch.equal(v3["out"], expected) and torch.equal(v3["aux"], scores * 2)
    assert "mode='caffe'" in repr(head) and set(head.state_dict()) == {"crf.gaussian_compat", "crf.bilateral_compat"}
    with pytest.raises(ValueError, match="must be trainable"):
        CRFasRNNHead(DenseCRF(), "caffe")
    with pytest.raises(ValueError, match="mode must be one of"):
        CRFasRNNHead(crf, "bgr")
    with pytest.raises(ValueError, match="unknown preset"):
        CRFasRNNStage("densecrf")
    with pytest.raises(ValueError, match="compat must be one of"):
        CRFasRNNStage(compat="diag")
    with pytest.raises(ValueError, match="iterations must be"):
        CRFasRNNStage(iterations=0)
    with pytest.raises(ValueError, match="mode"):
        CRFasRNNStage()(nn.Module())


NUM_CLASSES = 4
MODEL = "deeplab_v1_largefov"
TINY = {"width_divisor": 8, "dropout": 0.0}


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_synthetic_voc(tmp_path_factory.mktemp("data") / "VOC2012", num_train=8, num_val=4, size=(64, 80),
                              num_classes=NUM_CLASSES, seed=0)


def test_engine_gradients_reach_the_network_through_the_crf(voc, tmp_path):
    """build_training with the CRF stage: the head gets the run's normalisation, and one loss on its output
    gives gradients to the network's first and last layers and to the CRF."""
    cfg = TrainConfig(model=MODEL, data_root=voc, out_dir=tmp_path, num_classes=NUM_CLASSES, steps=1, batch_size=2,
                      lr=0.01, crop_size=65, mode="caffe", model_kwargs=TINY, progress=False,
                      extra_head=CRFasRNNStage("pydensecrf", compat="matrix", iterations=3), extra_head_lr=0.5)
    state = build_training(cfg, verbose=False)
    assert isinstance(state.extra_head, CRFasRNNHead) and state.extra_head.mode == "caffe"
    assert state.optimizer.param_groups[-1]["lr"] == 0.5
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (2, 3, 65, 65), dtype=torch.uint8, generator=g)
    target = torch.randint(0, NUM_CLASSES, (2, 65, 65), generator=g)
    out = state.net(normalize(image, "caffe"))
    assert out.shape == (2, NUM_CLASSES, 65, 65)  # the CRF's log-marginals at the crop's size
    compute_loss(state.family, out, target).backward()
    first = next(p for p in state.model.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert state.model.fc8.weight.grad.abs().sum() > 0
    assert state.extra_head.crf.bilateral_compat.grad.abs().sum() > 0
    assert cfg.checkpoint_args(1)["crf_rnn"]["mode"] == "caffe"


def test_train_and_eval_cli_crf_rnn_stage(voc, tmp_path, capsys):
    """train a tiny model, then 'train --crf-rnn' from it (model, classes, options and mode read from the --init
    checkpoint), resume it, and 'eval --trained-crf'."""
    base = tmp_path / "base"
    assert main(["train", "--model", MODEL, "--width-divisor", "8", "--model-kwargs", '{"dropout": 0}',
                 "--num-classes", str(NUM_CLASSES), "--data", str(voc), "--out", str(base), "--steps", "2",
                 "--batch-size", "2", "--crop-size", "65", "--mode", "torchvision", "--workers", "0",
                 "--no-progress", "--threads", "1"]) == 0
    stage = tmp_path / "crf"
    args = ["train", "--crf-rnn", "pydensecrf", "--crf-compat", "matrix", "--crf-lr", "0.5", "--crf-iterations",
            "3", "--init", str(base / "last.pth"), "--data", str(voc), "--out", str(stage), "--steps", "4",
            "--batch-size", "2", "--crop-size", "65", "--lr", "0.001", "--workers", "0", "--no-progress",
            "--threads", "1", "--log-every", "1", "--val-every", "4"]
    assert main(args + ["--stop-at", "2"]) == 0
    assert main(args + ["--resume", str(stage / "last.pth")]) == 0
    out = capsys.readouterr().out
    assert "+ CRF-as-RNN to step 4" in out and "with the trained CRF: mIoU" in out
    assert "learned bilateral_compat: (4, 4) matrix" in out

    ckpt = torch.load(stage / "last.pth", weights_only=True)
    spec = ckpt["args"]["crf_rnn"]
    assert spec == dict(preset="pydensecrf", compat="matrix", iterations=3, checkpoint=False, mode="torchvision")
    assert ckpt["args"]["model_kwargs"] == TINY and ckpt["args"]["num_classes"] == NUM_CLASSES
    assert ckpt["optimizer"]["param_groups"][-1]["initial_lr"] == 0.5
    learned = ckpt["extra_head"]["crf.bilateral_compat"]
    assert learned.shape == (4, 4) and not torch.equal(learned, -10.0 * torch.eye(4))
    assert torch.allclose(learned, learned.T)
    start = torch.load(base / "last.pth", weights_only=True)["model"]
    assert not torch.equal(ckpt["model"]["fc8.weight"], start["fc8.weight"])  # trained through the CRF
    crf = load_trained_crf(stage / "last.pth", iterations=10)
    assert crf.iterations == 10 and torch.equal(crf.bilateral_compat.detach(), learned)

    assert main(["eval", "--weights", str(stage / "last.pth"), "--data", str(voc), "--trained-crf", "--workers",
                 "0", "--no-progress", "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "CRF (trained, pydensecrf)" in out and "trained CRF: DenseCRF(iterations=3" in out

    fixed = tmp_path / "fixed"  # --crf-lr 0: the network alone is fine-tuned through the preset's CRF
    assert main(["train", "--crf-rnn", "deeplab_v2_voc", "--crf-lr", "0", "--init", str(base / "last.pth"),
                 "--data", str(voc), "--out", str(fixed), "--steps", "1", "--batch-size", "2", "--crop-size", "65",
                 "--workers", "0", "--no-progress", "--threads", "1", "--crf-checkpoint"]) == 0
    head = torch.load(fixed / "last.pth", weights_only=True)["extra_head"]
    assert float(head["crf.bilateral_compat"]) == 4.0 and float(head["crf.gaussian_compat"]) == 3.0


def test_crf_rnn_cli_errors(voc, tmp_path, capsys):
    base = tmp_path / "base"
    assert main(["train", "--model", MODEL, "--width-divisor", "8", "--num-classes", str(NUM_CLASSES), "--data",
                 str(voc), "--out", str(base), "--steps", "1", "--batch-size", "2", "--crop-size", "33",
                 "--workers", "0", "--no-progress"]) == 0
    common = ["--data", str(voc), "--steps", "1", "--batch-size", "2", "--crop-size", "33", "--workers", "0",
              "--no-progress", "--out", str(tmp_path / "x")]
    capsys.readouterr()
    assert main(["train", "--model", MODEL, "--crf-lr", "0.1"] + common) == 2
    assert "--crf-lr is an option of the CRF-as-RNN stage" in capsys.readouterr().err
    assert main(["train", "--crf-rnn", "nope", "--init", str(base / "last.pth")] + common) == 2
    assert main(["train", "--crf-rnn", "pydensecrf", "--crf-lr", "-1", "--init", str(base / "last.pth")]
                + common) == 2
    capsys.readouterr()
    assert main(["eval", "--weights", str(base / "last.pth"), "--data", str(voc), "--trained-crf"]) == 2
    assert "holds no trained CRF" in capsys.readouterr().err
    assert main(["eval", "--weights", str(base / "last.pth"), "--data", str(voc), "--trained-crf", "--crf",
                 "pydensecrf"]) == 2
    assert "choose one" in capsys.readouterr().err
    assert main(["eval", "--weights", str(base / "last.pth"), "--data", str(voc), "--crf-iterations", "3"]) == 2
    assert "--crf-iterations is for --trained-crf" in capsys.readouterr().err
