"""deeplab_fast.ops.dense_crf_3d (issue: the volumetric dense CRF) against pydensecrf2's generic ``DenseCRF`` fed
the equivalent features, built here with numpy from the definition (positions float32(i * spacing / sigma) along
D, H, W; intensities float32(x) / float32(sigma)): Q within 1e-4 (it is bit-exact, as the generic op is),
including anisotropic spacing, per-axis and per-channel standard deviations, several modalities, every
compatibility form and normalisation. Gradients: gradcheck in float64, and bitwise equal to those of
dense_crf_features with the explicit features. Bad input: a clear error naming the argument; the memory check.
"""
import importlib
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from deeplab_fast.data import synthetic_volume
from deeplab_fast.ops import (NORMALIZE_AFTER, NORMALIZE_BEFORE, NORMALIZE_SYMMETRIC, NO_NORMALIZATION, dense_crf_3d,
                              dense_crf_3d_memory, dense_crf_features)
from deeplab_fast.ops.dense_crf import label_stride

from helpers import cpu_and_cuda, seeded, volume_features_numpy as numpy_features

F32 = np.float32
TOL = 1e-4


def _dcrf():
    return pytest.importorskip("pydensecrf.densecrf")


def reference(unary: np.ndarray, image: np.ndarray, iterations=5, *, spacing=1.0, gaussian_sigma=3.0,
              gaussian_compat=3.0, bilateral_sigma=5.0, intensity_sigma=3.0, bilateral_compat=5.0,
              normalization=NORMALIZE_SYMMETRIC) -> np.ndarray:
    """pydensecrf2's generic DenseCRF on one volume: unary [L, D, H, W], image [C, D, H, W] -> Q [L, D, H, W]."""
    dcrf = _dcrf()
    L = unary.shape[0]
    gauss, bilateral = numpy_features(image, spacing, gaussian_sigma, bilateral_sigma, intensity_sigma)
    d = dcrf.DenseCRF(int(np.prod(unary.shape[1:])), L)
    d.setUnaryEnergy(np.ascontiguousarray(unary.reshape(L, -1), dtype=F32))
    for feats, compat in ((gauss, gaussian_compat), (bilateral, bilateral_compat)):
        compat = np.asarray(compat, dtype=F32) if np.ndim(compat) else float(compat)
        d.addPairwiseEnergy(np.ascontiguousarray(feats), compat=compat, kernel=dcrf.DIAG_KERNEL,
                            normalization=normalization)
    return np.array(d.inference(iterations)).reshape(unary.shape)


def volume_problem(shape, L, C, seed, dtype=torch.uint8):
    """A synthetic MR-like volume: unary Tensor[1, L, D, H, W] (-log of its noisy probabilities), image
    Tensor[1, C, D, H, W] (uint8, or float32 values with a fractional part)."""
    v = synthetic_volume(shape, max(L, 2), C, seed=seed)
    probs = v.probabilities[:L] / v.probabilities[:L].sum(0, keepdims=True)
    unary = torch.from_numpy(-np.log(np.clip(probs, 1e-5, 1.0)).astype(F32))[None]
    image = torch.from_numpy(v.image)[None]
    if dtype == torch.float32:
        image = image.float() * 0.37 + 100.5  # e.g. MR values, with fractions
    return unary.contiguous(), image.contiguous()


def assert_parity(q: torch.Tensor, q_ref: np.ndarray):
    q = q.detach().cpu().numpy()
    assert np.isfinite(q).all(), "unwritten or non-finite elements"
    diff = np.abs(q - q_ref).max()
    assert diff <= TOL, f"max |dQ| = {diff:.3g}"
    assert (q.argmax(0) == q_ref.argmax(0)).mean() >= 0.9999


# ----------------------------------------------------------------------------------------------------------
# Against pydensecrf2


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("case", [
    dict(),  # dense3dCrf's defaults, 1 mm voxels
    dict(spacing=(2.5, 0.7, 0.9), gaussian_sigma=(3.0, 2.0, 1.5), bilateral_sigma=(5.0, 4.0, 3.0)),
    dict(spacing=(5.0, 0.8, 0.8), gaussian_sigma=2.0, bilateral_sigma=(10.0, 6.0, 6.0), intensity_sigma=7.5),
])
@pytest.mark.parametrize("image_dtype", [torch.uint8, torch.float32])
def test_parity_anisotropic(case, image_dtype, device):
    unary, image = volume_problem((9, 20, 17), 3, 1, seed=1, dtype=image_dtype)
    q = dense_crf_3d(unary.to(device), image.to(device), **case)
    assert q.shape == unary.shape and q.dtype == torch.float32 and q.device.type == device
    assert_parity(q[0], reference(unary[0].numpy(), image[0].numpy(), **case))


@pytest.mark.parametrize("C,L", [(2, 2), (3, 4), (5, 3), (13, 2)])
def test_parity_multimodal(C, L):
    unary, image = volume_problem((6, 14, 12), L, C, seed=C)
    sig = tuple(2.0 + k for k in range(C))  # one intensity standard deviation per channel
    kw = dict(spacing=(1.5, 1.0, 1.0), intensity_sigma=sig, iterations=4)
    assert_parity(dense_crf_3d(unary, image, **kw)[0], reference(unary[0].numpy(), image[0].numpy(), **kw))


@pytest.mark.parametrize("L", [1, 2, 5, 9])
@pytest.mark.parametrize("form", ["potts", "diagonal", "matrix"])
@pytest.mark.parametrize("normalization", [NO_NORMALIZATION, NORMALIZE_BEFORE, NORMALIZE_AFTER, NORMALIZE_SYMMETRIC])
def test_parity_compat_and_normalization(L, form, normalization):
    g = seeded(L)
    unary = torch.rand(1, L, 5, 9, 8, generator=g) * 4
    image = (torch.rand(1, 1, 5, 9, 8, generator=g) * 255).to(torch.uint8)
    if form == "potts":
        compat = dict(gaussian_compat=2.0, bilateral_compat=4.0)
    elif form == "diagonal":
        compat = dict(gaussian_compat=-(1 + torch.rand(L, generator=g)), bilateral_compat=-3 * torch.rand(L, generator=g))
    else:
        compat = dict(gaussian_compat=torch.randn(L, L, generator=g), bilateral_compat=-4 * torch.eye(L))
    q = dense_crf_3d(unary, image, normalization=normalization, **compat)
    ref_compat = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in compat.items()}
    assert_parity(q[0], reference(unary[0].numpy(), image[0].numpy(), normalization=normalization, **ref_compat))


@pytest.mark.parametrize("iterations", [0, 1, 2, 7])
def test_parity_iterations(iterations):
    unary, image = volume_problem((8, 12, 10), 3, 1, seed=3)
    q = dense_crf_3d(unary, image, iterations=iterations)
    assert_parity(q[0], reference(unary[0].numpy(), image[0].numpy(), iterations))


def test_positions_at_unit_spacing_are_the_float_division():
    """With spacing 1 a position is i / sigma in float32 (Krähenbühl's DenseCRF2D, dense3dCrf's DenseCRF3D), bit for
    bit, also for standard deviations that float32 does not hold exactly."""
    from deeplab_fast.ops.dense_crf_3d import _volume_features

    image = torch.zeros(1, 1, 40, 3, 300, dtype=torch.uint8)
    for sigma in (3.0, 0.1, 13.7, 1 / 3, 80.0):
        s = float(F32(sigma))
        gauss, _ = _volume_features(image, (1.0, 1.0, 1.0), (s, s, s), (s, s, s), (1.0,))
        along_w = gauss[0, 2].view(40, 3, 300)[0, 0].numpy()
        np.testing.assert_array_equal(along_w, np.arange(300, dtype=F32) / F32(sigma))


def test_features_layout():
    """The internal feature builder against the numpy definition, bit for bit (shapes, order, values)."""
    from deeplab_fast.ops.dense_crf_3d import _check_volume_args, _volume_features

    unary, image = volume_problem((5, 7, 9), 2, 3, seed=4, dtype=torch.float32)
    image = torch.cat([image, image * 0.5])  # a batch of two
    unary = torch.cat([unary, unary])
    raw = dict(spacing=(1.2, 0.9, 3.3), gaussian_sigma=(2.0, 3.0, 4.0), bilateral_sigma=7.0,
               intensity_sigma=(1.5, 2.5, 40.0))
    args = _check_volume_args(unary, image, raw["spacing"], raw["gaussian_sigma"], raw["bilateral_sigma"],
                              raw["intensity_sigma"], 3)
    gauss, bilateral = _volume_features(image, *args[:4])
    assert gauss.shape == (2, 3, 5 * 7 * 9) and bilateral.shape == (2, 6, 5 * 7 * 9)
    for b in range(2):
        g_ref, b_ref = numpy_features(image[b].numpy(), **raw)
        np.testing.assert_array_equal(gauss[b].numpy(), g_ref)
        np.testing.assert_array_equal(bilateral[b].numpy(), b_ref)


def test_crf_improves_a_noisy_segmentation():
    """On the synthetic volume the default model cleans a noisy probability map (not a parity check: that the
    defaults are sensible for 1 mm, 8-bit volumes)."""
    v = synthetic_volume((24, 48, 48), 3, 1, seed=7)
    unary = torch.from_numpy(-np.log(np.clip(v.probabilities, 1e-5, 1)))[None]
    q = dense_crf_3d(unary, torch.from_numpy(v.image)[None])
    before = (v.probabilities.argmax(0) == v.truth).mean()
    after = (q[0].argmax(0).numpy() == v.truth).mean()
    assert before < 0.8 and after > 0.99, (before, after)


# ----------------------------------------------------------------------------------------------------------
# Batches, threads, q_init, layouts


def test_batch_equals_separate_calls_and_threads():
    u1, i1 = volume_problem((6, 10, 12), 3, 2, seed=5)
    u2, i2 = volume_problem((6, 10, 12), 3, 2, seed=6)
    kw = dict(spacing=(2.0, 1.0, 1.0), intensity_sigma=(4.0, 6.0))
    batch = dense_crf_3d(torch.cat([u1, u2]), torch.cat([i1, i2]), **kw)
    assert torch.equal(batch[0], dense_crf_3d(u1, i1, **kw)[0])
    assert torch.equal(batch[1], dense_crf_3d(u2, i2, **kw)[0])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(dense_crf_3d(torch.cat([u1, u2]), torch.cat([i1, i2]), **kw), batch)
    finally:
        torch.set_num_threads(threads)


def test_q_init_and_chunked_iterations():
    """Iterations run in chunks through q_init give exactly the single call's marginals (what the command line's
    progress bar does)."""
    unary, image = volume_problem((6, 11, 9), 4, 1, seed=8)
    whole = dense_crf_3d(unary, image, iterations=5)
    q = dense_crf_3d(unary, image, iterations=0)
    for _ in range(5):
        q = dense_crf_3d(unary, image, iterations=1, q_init=q)
    assert torch.equal(q, whole)


def test_non_contiguous_inputs():
    unary, image = volume_problem((6, 8, 10), 3, 2, seed=9)
    ref = dense_crf_3d(unary, image)
    u_nc = unary.permute(0, 1, 4, 3, 2).contiguous().permute(0, 1, 4, 3, 2)
    i_nc = image.permute(0, 4, 2, 3, 1).contiguous().permute(0, 4, 2, 3, 1)
    assert not u_nc.is_contiguous() and not i_nc.is_contiguous()
    assert torch.equal(dense_crf_3d(u_nc, i_nc), ref)


def test_image_dtypes_are_converted_exactly():
    unary, image = volume_problem((5, 8, 8), 2, 1, seed=10)
    ref = dense_crf_3d(unary, image)
    for dtype in (torch.int16, torch.float64, torch.float16):
        assert torch.equal(dense_crf_3d(unary, image.to(dtype)), ref), dtype


# ----------------------------------------------------------------------------------------------------------
# Gradients


def _grad_problem(dtype=torch.float64):
    g = seeded(11)
    unary = (torch.rand(1, 3, 3, 4, 5, generator=g, dtype=dtype) * 3).requires_grad_()
    image = (torch.rand(1, 2, 3, 4, 5, generator=g) * 255).to(torch.uint8)
    return unary, image, g


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("normalization", [NORMALIZE_SYMMETRIC, NORMALIZE_AFTER])
def test_gradcheck(checkpoint, normalization):
    unary, image, g = _grad_problem()
    q_init = torch.softmax(torch.rand(1, 3, 3, 4, 5, generator=g, dtype=torch.float64), 1).requires_grad_()
    gc = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    bc = (torch.randn(3, 3, generator=g, dtype=torch.float64) - 3 * torch.eye(3, dtype=torch.float64)).requires_grad_()
    kw = dict(spacing=(2.0, 1.0, 0.5), bilateral_sigma=(3.0, 2.0, 2.0), intensity_sigma=(20.0, 30.0),
              iterations=3, normalization=normalization, checkpoint=checkpoint)

    def f(u, qi, c1, c2):
        return dense_crf_3d(u, image, q_init=qi, gaussian_compat=c1, bilateral_compat=c2, **kw)

    assert torch.autograd.gradcheck(f, (unary, q_init, gc, bc), eps=1e-6, atol=1e-6)


def test_gradients_equal_those_of_the_generic_op():
    """float32: the gradients (unary, diagonal and matrix compatibilities) bitwise equal dense_crf_features' with
    the explicit features."""
    unary, image = volume_problem((6, 9, 8), 3, 2, seed=12)
    g = seeded(13)
    grad_q = torch.randn(unary.shape, generator=g)
    kw = dict(spacing=(3.0, 1.0, 1.0), intensity_sigma=(4.0, 9.0))
    gc0, bc0 = -(1 + torch.rand(3, generator=g)), torch.randn(3, 3, generator=g) - 5 * torch.eye(3)

    u, gc, bc = unary.clone().requires_grad_(), gc0.clone().requires_grad_(), bc0.clone().requires_grad_()
    dense_crf_3d(u, image, gaussian_compat=gc, bilateral_compat=bc, **kw).backward(grad_q)

    gauss, bilateral = numpy_features(image[0].numpy(), kw["spacing"], 3.0, 5.0, kw["intensity_sigma"])
    u2, gc2, bc2 = unary.clone().requires_grad_(), gc0.clone().requires_grad_(), bc0.clone().requires_grad_()
    q2 = dense_crf_features(u2.reshape(1, 3, -1), [torch.from_numpy(gauss)[None], torch.from_numpy(bilateral)[None]],
                            [gc2, bc2], iterations=5)
    q2.backward(grad_q.reshape(1, 3, -1))
    assert torch.equal(u.grad, u2.grad) and torch.equal(gc.grad, gc2.grad) and torch.equal(bc.grad, bc2.grad)
    assert u.grad.abs().max() > 0 and gc.grad.abs().max() > 0


# ----------------------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    unary, image = volume_problem((5, 8, 9), 3, 2, seed=14)

    def refine(u, im):
        return dense_crf_3d(u * 1.0, im, spacing=(2.0, 1.0, 0.7), intensity_sigma=(5.0, 7.0), iterations=3)

    torch._dynamo.reset()
    out = torch.compile(refine, fullgraph=True, backend=backend)(unary, image)
    assert torch.equal(out, refine(unary, image))


# ----------------------------------------------------------------------------------------------------------
# Bad input


def good():
    g = seeded(15)
    return torch.rand(2, 3, 4, 5, 6, generator=g), (torch.rand(2, 2, 4, 5, 6, generator=g) * 255).to(torch.uint8)


@pytest.mark.parametrize("mutate,match", [
    (lambda u, i: (u.numpy(), i), "unary must be a torch.Tensor"),
    (lambda u, i: (u, i.numpy()), "image must be a torch.Tensor"),
    (lambda u, i: (u[0], i), r"unary must be 5-D \[B, L, D, H, W\]"),
    (lambda u, i: (u.half(), i), "unary must be float32"),
    (lambda u, i: (u.long(), i), "unary must be float32"),
    (lambda u, i: (u[:, :0], i), "at least one label"),
    (lambda u, i: (u[:0], i[:0]), "batch"),
    (lambda u, i: (u, i[0]), r"image must be 5-D \[B, C, D, H, W\]"),
    (lambda u, i: (u, i[:1]), "batch size and volume shape"),
    (lambda u, i: (u, i[..., :5]), "batch size and volume shape"),
    (lambda u, i: (u, i[:, :0]), "1 to 13 channels"),
    (lambda u, i: (u, i[:, :1].expand(2, 14, 4, 5, 6)), "1 to 13 channels"),
    (lambda u, i: (u, i.bool()), "real intensities"),
    (lambda u, i: (u, i.float().index_fill(4, torch.tensor([2]), float("nan"))), "channel 0 contains NaN or inf"),
    (lambda u, i: (u, i.to("meta")), "image is on meta"),
])
def test_bad_tensors(mutate, match):
    u, i = mutate(*good())
    with pytest.raises(ValueError, match=match):
        dense_crf_3d(u, i, intensity_sigma=(3.0, 4.0) if isinstance(i, torch.Tensor) and i.dim() == 5 and
                     i.shape[1] == 2 else 3.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(spacing=0.0), "spacing must be a finite number > 0"),
    (dict(spacing=(1.0, -2.0, 1.0)), r"spacing\[1\] must be a finite number > 0"),
    (dict(spacing=(1.0, 1.0)), "spacing must be a number or a sequence of 3 numbers"),
    (dict(spacing="1"), "spacing must be a number or a sequence of 3 numbers"),
    (dict(spacing=(1.0, True, 1.0)), r"spacing\[1\] must be a positive number"),
    (dict(gaussian_sigma=float("inf")), "gaussian_sigma must be a finite number"),
    (dict(gaussian_sigma=(1.0, float("nan"), 1.0)), r"gaussian_sigma\[1\]"),
    (dict(gaussian_sigma=1e-40), "gaussian_sigma must be representable in float32"),
    (dict(bilateral_sigma=[1.0, 2.0, 3.0, 4.0]), "bilateral_sigma must be a number or a sequence of 3"),
    (dict(bilateral_sigma=1e-7), "bilateral_sigma along axis D is too small"),
    (dict(intensity_sigma=(1.0, 2.0, 3.0)), "intensity_sigma must be a number or a sequence of 2 numbers"),
    (dict(intensity_sigma=(1.0, 0.0)), r"intensity_sigma\[1\]"),
    (dict(intensity_sigma=1e-6), r"intensity_sigma\[0\] = 1e-06 is too small"),
    (dict(gaussian_compat="3"), "gaussian_compat"),
    (dict(gaussian_compat=torch.ones(4)), r"gaussian_compat must be a number \(Potts weight\), a vector \[L\]"),
    (dict(bilateral_compat=torch.ones(3, 4)), "bilateral_compat must be a number"),
    (dict(bilateral_compat=torch.tensor(float("nan"))), "bilateral_compat must be finite"),
    (dict(bilateral_compat=torch.ones(3, dtype=torch.int64)), "bilateral_compat must be a floating-point"),
    (dict(iterations=-1), "iterations"),
    (dict(iterations=2.0), "iterations"),
    (dict(normalization=4), "normalization"),
    (dict(q_init=torch.rand(2, 3, 4, 5, 5)), "q_init must have the unary's shape"),
    (dict(q_init=np.ones((2, 3, 4, 5, 6))), "q_init must be a torch.Tensor"),
    (dict(checkpoint=1), "checkpoint must be a bool"),
])
def test_bad_arguments(kwargs, match):
    kwargs.setdefault("intensity_sigma", 3.0)
    with pytest.raises(ValueError, match=match):
        dense_crf_3d(*good(), **kwargs)


def test_op_errors_name_the_argument():
    u, i = good()
    with pytest.raises(RuntimeError, match="unary contains NaN"):
        dense_crf_3d(u.index_fill(2, torch.tensor([1]), float("nan")), i)
    with pytest.raises(ValueError, match="q_init must have the unary's dtype"):
        dense_crf_3d(u, i, q_init=torch.rand(u.shape, dtype=torch.float64))


def test_memory_check(monkeypatch):
    """A volume whose estimate exceeds the available memory is refused before anything is allocated; the variable
    DEEPLAB_FAST_NO_MEMORY_CHECK skips the check."""
    mod = importlib.import_module("deeplab_fast.ops.dense_crf_3d")  # the module (the package attribute is the op)

    u, i = good()
    need = dense_crf_3d_memory((4, 5, 6), 3, 2, batch=2)
    monkeypatch.setattr(mod, "_available_bytes", lambda device: need - 1)
    with pytest.raises(MemoryError, match=r"2 x 4x5x6 voxels with 3 labels and 2 channel\(s\) need about"):
        dense_crf_3d(u, i)
    monkeypatch.setenv("DEEPLAB_FAST_NO_MEMORY_CHECK", "1")
    assert torch.isfinite(dense_crf_3d(u, i)).all()
    monkeypatch.delenv("DEEPLAB_FAST_NO_MEMORY_CHECK")
    monkeypatch.setattr(mod, "_available_bytes", lambda device: need)
    dense_crf_3d(u, i)


def test_memory_estimate():
    n = 64 * 128 * 128
    base = dense_crf_3d_memory((64, 128, 128), 3, 1)
    assert 180 * n < base < 300 * n  # measured peak 199 bytes per voxel (see the docstring)
    s = label_stride(3, torch.device("cpu"))
    assert dense_crf_3d_memory((64, 128, 128), 3, 1, history=True, iterations=5) - base == n * 4 * 5 * s
    assert dense_crf_3d_memory((64, 128, 128), 3, 2) > base
    # S = 4 with 3 labels on both devices; with 5 labels 8 on both; with 2, 2 on the CPU and 4 on CUDA
    assert dense_crf_3d_memory((64, 128, 128), 3, 1, device="cuda") == base
    assert dense_crf_3d_memory((64, 128, 128), 5, 1, device="cuda") == dense_crf_3d_memory((64, 128, 128), 5, 1)
    assert dense_crf_3d_memory((64, 128, 128), 2, 1, device="cuda") > dense_crf_3d_memory((64, 128, 128), 2, 1)
    assert dense_crf_3d_memory((512, 512, 512), 3, 1) > 24e9  # phase 1 cannot run 512^3 on a 24 GB machine
    for bad, match in [(dict(shape=(4, 5)), "shape must be three positive ints"),
                       (dict(shape=(4, 0, 5)), "shape"), (dict(labels=0), "labels"),
                       (dict(channels=14), "channels must be at most 13"), (dict(batch=1.5), "batch"),
                       (dict(spacing=-1.0), "spacing")]:
        kw = dict(shape=(4, 5, 6), labels=3)
        kw.update(bad)
        with pytest.raises(ValueError, match=match):
            dense_crf_3d_memory(**kw)


# ----------------------------------------------------------------------------------------------------------
# Fuzzing (hypothesis): every input either works (finite marginals summing to 1) or raises a ValueError /
# RuntimeError naming one of the function's arguments, never another exception.

ARG_NAMES = ("unary", "image", "spacing", "gaussian_sigma", "gaussian_compat", "bilateral_sigma", "intensity_sigma",
             "bilateral_compat", "iterations", "normalization", "q_init", "checkpoint")
FAULTS = (None,) * 10 + ("unary_dtype", "unary_shape", "unary_values", "image_shape", "image_dtype", "channels",
          "image_values", "spacing", "gaussian_sigma", "bilateral_sigma", "intensity_sigma", "compat", "iterations",
          "normalization", "q_init", "meta_one", "nontensor")


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzz_dense_crf_3d(data):
    draw = data.draw
    f = draw(st.sampled_from(FAULTS))
    note(f"fault: {f}")
    b, l, c = draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    d, h, w = (draw(st.integers(1, 4)) for _ in range(3))
    g = seeded(draw(st.integers(0, 1000)))
    dtype = draw(st.sampled_from([torch.float16, torch.int64, torch.bfloat16])) if f == "unary_dtype" else \
        draw(st.sampled_from([torch.float32, torch.float64]))
    ushape = [b, l, d, h, w]
    if f == "unary_shape":
        ushape = draw(st.sampled_from([[b, l, d, h], [b, 0, d, h, w], [0, l, d, h, w], [b, l, d, 0, w]]))
    unary = (torch.rand(ushape, generator=g, dtype=torch.float64) * 4).to(dtype)
    if f == "unary_values" and unary.numel():
        unary.view(-1)[draw(st.integers(0, unary.numel() - 1))] = draw(st.sampled_from([math.nan, -math.inf]))
    ishape = [b, c, d, h, w]
    if f == "image_shape":
        ishape = draw(st.sampled_from([[b + 1, c, d, h, w], [b, c, d + 1, h, w], [b, c, d, h], [b, c, d, h, w + 2]]))
    if f == "channels":
        ishape[1] = draw(st.sampled_from([0, 14]))
    idtype = draw(st.sampled_from([torch.bool, torch.complex64])) if f == "image_dtype" else \
        draw(st.sampled_from([torch.uint8, torch.float32, torch.int16, torch.float64]))
    image = (torch.rand(ishape, generator=g) * 255).to(idtype)
    if f == "image_values" and image.numel():
        image = image.float()
        image.view(-1)[0] = draw(st.sampled_from([math.nan, math.inf, 1e30]))
    sigma = lambda n: draw(st.sampled_from([draw(st.floats(0.5, 20.0)), tuple(  # noqa: E731
        draw(st.floats(0.5, 20.0)) for _ in range(n)), np.float32(3.0)]))
    bad_sigma = lambda: draw(st.sampled_from([0.0, -1.0, math.nan, math.inf, 1e-45, "3", None,  # noqa: E731
                                              (1.0, 2.0), [1.0] * 4, True]))
    kwargs = dict(spacing=bad_sigma() if f == "spacing" else sigma(3),
                  gaussian_sigma=bad_sigma() if f == "gaussian_sigma" else sigma(3),
                  bilateral_sigma=bad_sigma() if f == "bilateral_sigma" else sigma(3),
                  intensity_sigma=bad_sigma() if f == "intensity_sigma" else sigma(ishape[1] if len(ishape) > 1 else 1),
                  iterations=draw(st.sampled_from([-1, 2.0, None, 2**31])) if f == "iterations" else
                  draw(st.integers(0, 3)),
                  normalization=draw(st.sampled_from([4, -1, 1.5, "3"])) if f == "normalization" else
                  draw(st.integers(0, 3)),
                  checkpoint=draw(st.booleans()))
    for name in ("gaussian_compat", "bilateral_compat"):
        good = draw(st.sampled_from([3.0, torch.tensor(2.0), torch.rand(l, generator=g), -torch.eye(l) * 2]))
        kwargs[name] = draw(st.sampled_from([torch.ones(l + 1), math.nan, "3", torch.ones(l, dtype=torch.int64),
                                             torch.ones(2, 2, 2)])) if f == "compat" else good
    if f == "q_init":
        kwargs["q_init"] = draw(st.sampled_from([torch.rand(b, l + 1, d, h, w), torch.rand(ushape).double()
                                                 if dtype == torch.float32 else torch.rand(ushape).float(),
                                                 np.ones(ushape, np.float32), torch.full(ushape, math.nan)]))
    args = [unary, image]
    if f == "meta_one":
        args[draw(st.integers(0, 1))] = args[0].to("meta") if draw(st.booleans()) else args[1].to("meta")
    if f == "nontensor":
        args[draw(st.integers(0, 1))] = draw(st.sampled_from([None, 1.0, np.zeros((1, 1, 1, 1, 1), np.float32)]))
    try:
        q = dense_crf_3d(*args, **kwargs)
    except (ValueError, RuntimeError) as exc:
        assert f is not None, f"a valid call failed: {exc!r}"
        assert any(re.search(rf"\b{n}\b", str(exc)) for n in ARG_NAMES), f"the error names no argument: {exc!r}"
        return
    # a fault may be harmless: a huge but finite intensity (1e30 / sigma is still in float32 range: refused only
    # beyond the lattice's range, which the message names)
    assert f is None, f"fault {f} was accepted: {kwargs}"
    assert q.shape == unary.shape and q.dtype == unary.dtype
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.double().sum(1), torch.ones_like(q.double().sum(1)), rtol=0,
                               atol=1e-5 if q.dtype == torch.float32 else 1e-12)
