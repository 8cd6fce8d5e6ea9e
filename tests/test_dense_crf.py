"""deeplab_fast.ops.dense_crf against pydensecrf2 (Krähenbühl's C++ code), plus batching, threads, bad input,
non-contiguous input, opcheck and torch.compile.

Parity bar (issue 2): max |Q - Q_ref| <= 1e-4 and argmax identical on >= 99.99% of pixels.
"""
import numpy as np
import pytest
import torch

import deeplab_fast
from deeplab_fast.ops import dense_crf, dense_crf_features, dense_crf_pairwise_energy

from conftest import load_rgb

dcrf = pytest.importorskip("pydensecrf.densecrf")

DEFAULT = dict(gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=80.0, bilateral_srgb=13.0, bilateral_compat=10.0)
DEEPLAB_V2 = dict(gaussian_sxy=1.0, gaussian_compat=3.0, bilateral_sxy=67.0, bilateral_srgb=3.0, bilateral_compat=4.0)
KERNELS = {"default": DEFAULT, "deeplab_v2": DEEPLAB_V2}


def reference(unary: np.ndarray, img: np.ndarray, iterations: int, k: dict) -> np.ndarray:
    """pydensecrf2's DenseCRF2D on unary [L, H, W] and img [H, W, 3]; returns Q [L, H, W]."""
    L, H, W = unary.shape
    d = dcrf.DenseCRF2D(W, H, L)
    d.setUnaryEnergy(np.ascontiguousarray(unary.reshape(L, -1), dtype=np.float32))
    d.addPairwiseGaussian(sxy=k["gaussian_sxy"], compat=k["gaussian_compat"])
    d.addPairwiseBilateral(sxy=k["bilateral_sxy"], srgb=k["bilateral_srgb"], rgbim=np.ascontiguousarray(img),
                           compat=k["bilateral_compat"])
    return np.array(d.inference(iterations)).reshape(L, H, W)


def ours(unary: np.ndarray, img: np.ndarray, iterations: int, k: dict) -> np.ndarray:
    q = dense_crf(torch.from_numpy(unary)[None], torch.from_numpy(img).permute(2, 0, 1)[None],
                  iterations=iterations, **k)
    return q[0].numpy()


def assert_parity(q: np.ndarray, q_ref: np.ndarray):
    assert q.shape == q_ref.shape
    assert np.isfinite(q).all(), "output has unwritten (NaN-poisoned) or non-finite elements"
    diff = np.abs(q - q_ref).max()
    agree = (q.argmax(0) == q_ref.argmax(0)).mean()
    assert diff <= 1e-4, f"max |dQ| = {diff:.3g}"
    assert agree >= 0.9999, f"argmax agreement {agree:.6f}"


def random_unary(rng, L, H, W, smooth=False) -> np.ndarray:
    """Unary energies: i.i.d. or (smooth) upsampled low-resolution logits, as a DeepLab head gives them."""
    if smooth:
        low = torch.from_numpy(rng.standard_normal((1, L, max(1, H // 8), max(1, W // 8))).astype(np.float32) * 3)
        logits = torch.nn.functional.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)[0]
        return (-torch.log_softmax(logits, 0)).numpy().copy()
    return (rng.standard_normal((L, H, W)) * 2 + 3).astype(np.float32)


def random_image(rng, H, W) -> np.ndarray:
    """A random image with some structure (blocks of colour plus noise), so the bilateral kernel matters."""
    base = rng.integers(0, 256, size=(max(1, H // 7 + 1), max(1, W // 7 + 1), 3))
    img = np.kron(base, np.ones((7, 7, 1)))[:H, :W] + rng.normal(0, 8, size=(H, W, 3))
    return np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------------------
# Parity with pydensecrf2


@pytest.mark.parametrize("kernels", ["default", "deeplab_v2"])
@pytest.mark.parametrize("photo", ["im1", "im2", "im3"])
def test_parity_real_photos(densecrf_data, photo, kernels):
    img = load_rgb(densecrf_data / f"{photo}.png")
    rng = np.random.default_rng(abs(hash((photo, kernels))) % 2**32)
    unary = random_unary(rng, 21, *img.shape[:2], smooth=True)
    assert_parity(ours(unary, img, 10, KERNELS[kernels]), reference(unary, img, 10, KERNELS[kernels]))


@pytest.mark.parametrize(
    "H,W,L,iterations,kernels",
    [
        (1, 97, 2, 1, "default"),
        (97, 1, 21, 3, "deeplab_v2"),
        (1, 1, 2, 2, "default"),
        (17, 23, 81, 10, "default"),
        (31, 45, 21, 7, "deeplab_v2"),
        (333, 257, 2, 5, "default"),
        (333, 257, 21, 10, "deeplab_v2"),
        (257, 333, 81, 4, "default"),
        (64, 48, 1, 3, "default"),
        (40, 30, 5, 0, "default"),
    ],
)
def test_parity_random(H, W, L, iterations, kernels):
    rng = np.random.default_rng(H * 1000 + W * 10 + L)
    img = random_image(rng, H, W)
    unary = random_unary(rng, L, H, W, smooth=(H > 8 and W > 8))
    assert_parity(ours(unary, img, iterations, KERNELS[kernels]), reference(unary, img, iterations, KERNELS[kernels]))


@pytest.mark.parametrize("iterations", list(range(1, 11)))
def test_parity_every_iteration_count(iterations):
    rng = np.random.default_rng(100 + iterations)
    img = random_image(rng, 45, 61)
    unary = random_unary(rng, 21, 45, 61)
    assert_parity(ours(unary, img, iterations, DEFAULT), reference(unary, img, iterations, DEFAULT))


@pytest.mark.parametrize("form", ["vector", "matrix"])
def test_parity_compat_forms(form):
    """Diagonal and (non-symmetric, hence symmetrised) matrix compatibilities, as pydensecrf's compat."""
    rng = np.random.default_rng(7)
    L, H, W = 6, 50, 40
    img, unary = random_image(rng, H, W), random_unary(rng, L, H, W)
    if form == "vector":
        cg, cb = rng.uniform(-4, -1, L).astype(np.float32), rng.uniform(-9, -3, L).astype(np.float32)
    else:
        cg = rng.uniform(0, 3, (L, L)).astype(np.float32)
        cb = rng.uniform(0, 8, (L, L)).astype(np.float32)
    k = dict(DEFAULT, gaussian_compat=cg, bilateral_compat=cb)
    d = dcrf.DenseCRF2D(W, H, L)
    d.setUnaryEnergy(unary.reshape(L, -1))
    d.addPairwiseGaussian(sxy=3, compat=cg)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=img, compat=cb)
    q_ref = np.array(d.inference(5)).reshape(L, H, W)
    assert_parity(ours(unary, img, 5, {**k, "gaussian_compat": torch.from_numpy(cg),
                                       "bilateral_compat": torch.from_numpy(cb)}), q_ref)


@pytest.mark.parametrize("dim", [2, 5, 7])
def test_parity_generic_features(dim):
    rng = np.random.default_rng(dim)
    N, L = 3000, 7
    unary = (rng.standard_normal((L, N)) * 2).astype(np.float32)
    feats = (rng.standard_normal((dim, N)) * 4).astype(np.float32)
    d = dcrf.DenseCRF(N, L)
    d.setUnaryEnergy(unary)
    d.addPairwiseEnergy(feats, compat=5.0)
    q_ref = np.array(d.inference(6))
    q = dense_crf_features(torch.from_numpy(unary)[None], [torch.from_numpy(feats)[None]], [5.0], iterations=6)[0]
    assert_parity(q.numpy(), q_ref)


@pytest.mark.parametrize("dim,magnitude", [(5, 3000.0), (7, 400.0), (16, 3.0)])
def test_generic_key_table(dim, magnitude):
    """Features whose lattice keys do not fit packed 64-bit keys take the generic hash table; the result is
    still pydensecrf's and still independent of the thread count (40k points: several build ranges)."""
    rng = np.random.default_rng(dim)
    N, L = 40000, 3
    unary = (rng.standard_normal((L, N)) * 2).astype(np.float32)
    feats = (rng.uniform(-1, 1, (dim, N)) * magnitude).astype(np.float32)
    d = dcrf.DenseCRF(N, L)
    d.setUnaryEnergy(unary)
    d.addPairwiseEnergy(feats, compat=3.0)
    q_ref = np.array(d.inference(3))
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(dense_crf_features(torch.from_numpy(unary)[None], [torch.from_numpy(feats)[None]], [3.0],
                                              iterations=3)[0])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    assert_parity(results[0].numpy(), q_ref)


def test_pairwise_energy_matches_kl_divergence():
    """(q * pairwise).sum() is the pairwise part of pydensecrf's klDivergence."""
    rng = np.random.default_rng(3)
    N, L = 2000, 4
    unary = (rng.standard_normal((L, N)) * 2).astype(np.float32)
    feats = (rng.standard_normal((3, N)) * 3).astype(np.float32)
    d = dcrf.DenseCRF(N, L)
    d.setUnaryEnergy(unary)
    d.addPairwiseEnergy(feats, compat=4.0)
    q_ref = d.inference(3)
    q = np.array(q_ref)
    pairwise = dense_crf_pairwise_energy(torch.from_numpy(q)[None], [torch.from_numpy(feats)[None]], [4.0])[0].numpy()
    ent = (q * np.log(np.maximum(q, 1e-20))).sum(dtype=np.float64)
    kl = ent + (unary * q).sum(dtype=np.float64) + (q * pairwise).sum(dtype=np.float64)
    assert kl == pytest.approx(d.klDivergence(q_ref), rel=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Batching, threads, layout


def batch_inputs(B, H=48, W=64, L=21, seed=0):
    rng = np.random.default_rng(seed)
    unary = torch.from_numpy(np.stack([random_unary(rng, L, H, W, smooth=True) for _ in range(B)]))
    image = torch.from_numpy(np.stack([random_image(rng, H, W) for _ in range(B)])).permute(0, 3, 1, 2).contiguous()
    return unary, image


@pytest.mark.parametrize("kernels", ["default", "deeplab_v2"])
def test_batch_equals_separate_calls(kernels):
    unary, image = batch_inputs(5)
    q = dense_crf(unary, image, iterations=6, **KERNELS[kernels])
    for b in range(5):
        assert torch.equal(q[b:b + 1], dense_crf(unary[b:b + 1], image[b:b + 1], iterations=6, **KERNELS[kernels]))


@pytest.mark.parametrize("B,H,W", [(1, 192, 256), (4, 96, 128)])
def test_identical_for_any_thread_count(B, H, W):
    # 192x256 spans several pixel ranges of the parallel lattice build, so their merge is exercised.
    unary, image = batch_inputs(B, H=H, W=W)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(dense_crf(unary, image, iterations=5))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_repeatable():
    unary, image = batch_inputs(2)
    assert torch.equal(dense_crf(unary, image), dense_crf(unary, image))


def test_non_contiguous_inputs():
    unary, image = batch_inputs(2, H=40, W=56, L=9)
    expected = dense_crf(unary, image, iterations=4)
    unary_nhwc_view = unary.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    image_cl = image.contiguous(memory_format=torch.channels_last)
    assert not unary_nhwc_view.is_contiguous() and not image_cl.is_contiguous()
    assert torch.equal(dense_crf(unary_nhwc_view, image_cl, iterations=4), expected)
    wide = torch.zeros(2, 9, 40, 112)
    wide[..., ::2] = unary
    assert torch.equal(dense_crf(wide[..., ::2], image, iterations=4), expected)


def test_iterations_zero_is_softmax():
    unary, image = batch_inputs(1, L=5)
    torch.testing.assert_close(dense_crf(unary, image, iterations=0), torch.softmax(-unary, 1), rtol=1e-6, atol=1e-7)


def test_plus_inf_unary_is_an_impossible_label():
    unary, image = batch_inputs(1, L=4)
    unary[:, 2] = float("inf")
    q = dense_crf(unary, image, iterations=3)
    assert torch.isfinite(q).all() and (q[:, 2] == 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones_like(q[:, 0]))


# ----------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument


def good():
    unary, image = batch_inputs(2, H=12, W=10, L=3)
    return unary, image


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda u, i: (u, i[:, :, :11]), RuntimeError, "image size"),
        (lambda u, i: (u, i[:1]), RuntimeError, "batch size"),
        (lambda u, i: (u, torch.cat([i, i[:, :1]], 1)), RuntimeError, "3 channels"),
        (lambda u, i: (u, i[:, :1]), RuntimeError, "3 channels"),
        (lambda u, i: (u.index_put((torch.tensor([0]), torch.tensor([1]), torch.tensor([3]), torch.tensor([4])),
                                   torch.tensor(float("nan"))), i), RuntimeError, "NaN"),
        (lambda u, i: (u.index_put((torch.tensor([1]), torch.tensor([0]), torch.tensor([0]), torch.tensor([0])),
                                   torch.tensor(float("-inf"))), i), RuntimeError, "-inf"),
        (lambda u, i: (u.index_fill(3, torch.tensor([2]), float("inf")), i), RuntimeError, r"\+inf"),
        (lambda u, i: (u[:, :0], i), RuntimeError, "at least one label"),
        (lambda u, i: (u[0], i), RuntimeError, "unary must be 4-D"),
        (lambda u, i: (u[:0], i[:0]), RuntimeError, "empty batch"),
        (lambda u, i: (u.half(), i), RuntimeError, "unary must be float32"),
        (lambda u, i: (u, i.float()), RuntimeError, "image must be uint8"),
        (lambda u, i: (u, i[0]), RuntimeError, "image must be 4-D"),
        (lambda u, i: (u, i.numpy()), ValueError, "image must be a torch.Tensor"),
        (lambda u, i: (u.numpy(), i), ValueError, "unary must be a torch.Tensor"),
    ],
)
def test_bad_input(mutate, exc, match):
    u, i = mutate(*good())
    with pytest.raises(exc, match=match):
        dense_crf(u, i)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(iterations=-1), "iterations"),
        (dict(iterations=2.5), "iterations"),
        (dict(gaussian_sxy=0.0), "gaussian_sxy"),
        (dict(bilateral_sxy=-3.0), "bilateral_sxy"),
        (dict(bilateral_srgb=0.0), "bilateral_srgb"),
        (dict(bilateral_srgb=float("nan")), "bilateral_srgb"),
        (dict(gaussian_compat="3"), "gaussian_compat"),
        (dict(gaussian_compat=torch.tensor([1, 2])), "gaussian_compat"),
    ],
)
def test_bad_arguments_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dense_crf(*good(), **kwargs)


@pytest.mark.parametrize(
    "compat,match",
    [(torch.ones(4), "one weight per label"), (torch.ones(3, 4), r"\[L, L\]"), (torch.ones(2, 2, 2), r"\[L, L\]"),
     (torch.tensor(float("inf")), "finite")],
)
def test_bad_compat(compat, match):
    with pytest.raises(RuntimeError, match=match):
        dense_crf(*good(), bilateral_compat=compat)


def test_op_level_checks_without_python_wrapper():
    """The C++ op itself validates what the Python wrapper would (for C++ and torch.ops users)."""
    u, i = good()
    op = torch.ops.deeplab_fast.dense_crf
    with pytest.raises(RuntimeError, match="iterations"):
        op(u, i, -1, 3.0, torch.tensor(3.0), 80.0, 13.0, torch.tensor(10.0))
    with pytest.raises(RuntimeError, match="gaussian_sxy"):
        op(u, i, 1, 0.0, torch.tensor(3.0), 80.0, 13.0, torch.tensor(10.0))
    with pytest.raises(RuntimeError, match="bilateral_srgb"):
        op(u, i, 1, 3.0, torch.tensor(3.0), 80.0, -1.0, torch.tensor(10.0))


def test_oversize_features_are_an_error():
    with pytest.raises(RuntimeError, match="bilateral_srgb must be at least"):
        dense_crf(*good(), bilateral_srgb=1e-7)


def test_generic_op_bad_input():
    unary = torch.rand(1, 3, 50)
    with pytest.raises(RuntimeError, match=r"features\[0\] must have shape"):
        dense_crf_features(unary, [torch.rand(1, 2, 49)], [1.0])
    with pytest.raises(RuntimeError, match=r"features\[0\] must have between 1 and 16"):
        dense_crf_features(unary, [torch.rand(1, 17, 50)], [1.0])
    with pytest.raises(RuntimeError, match=r"features\[0\] contains NaN"):
        dense_crf_features(unary, [torch.full((1, 2, 50), float("nan"))], [1.0])
    with pytest.raises(ValueError, match=r"normalization\[0\] must be in \[0, 3\]"):
        dense_crf_features(unary, [torch.rand(1, 2, 50)], [1.0], [7])
    with pytest.raises(ValueError, match="one entry per pairwise term"):
        dense_crf_features(unary, [torch.rand(1, 2, 50)], [1.0, 2.0])
    with pytest.raises(RuntimeError, match="q_init must have"):
        dense_crf_features(unary, [torch.rand(1, 2, 50)], [1.0], q_init=torch.rand(1, 3, 49))


# ----------------------------------------------------------------------------------------------------------
# Custom-op machinery


def test_opcheck_dense_crf():
    u, i = good()
    args = (u, i, 3, 3.0, torch.tensor(3.0), 80.0, 13.0, torch.tensor(10.0))
    torch.library.opcheck(torch.ops.deeplab_fast.dense_crf.default, args)


def test_opcheck_generic_ops():
    rng = torch.Generator().manual_seed(0)
    u = torch.rand(2, 4, 60, generator=rng)
    feats = [torch.rand(2, 3, 60, generator=rng) * 5, torch.rand(2, 2, 60, generator=rng) * 5]
    compat = [torch.tensor(2.0), torch.rand(4, 4, generator=rng)]
    torch.library.opcheck(torch.ops.deeplab_fast.dense_crf_features.default, (u, feats, compat, [3, 1], 2, None))
    q = torch.softmax(u, 1)
    torch.library.opcheck(torch.ops.deeplab_fast.dense_crf_features.default, (u, feats, compat, [0, 2], 1, q))
    torch.library.opcheck(torch.ops.deeplab_fast.dense_crf_pairwise_energy.default, (q, feats, compat, [3, 3]))


def test_torch_compile_fullgraph():
    unary, image = batch_inputs(2, H=24, W=30, L=5)

    def refine(u, im):
        return deeplab_fast.ops.dense_crf(u * 1.0, im, iterations=3).argmax(1)

    compiled = torch.compile(refine, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(unary, image), refine(unary, image))


def test_recycled_working_memory_does_not_change_results():
    """Working buffers are recycled between calls (uninitialised); results must not depend on what a previous
    call left in them, and empty_cache() releases them."""
    unary, image = batch_inputs(2, H=64, W=80, L=21)
    first = dense_crf(unary, image, iterations=4)
    dense_crf(torch.rand_like(unary) * 50, torch.randint_like(image, 0, 256), iterations=4, **DEEPLAB_V2)
    assert torch.equal(dense_crf(unary, image, iterations=4), first)
    deeplab_fast.ops.empty_cache()
    assert torch.equal(dense_crf(unary, image, iterations=4), first)


def test_ops_are_tagged_cudagraph_unsafe():
    """The CUDA kernels synchronise with the host, so torch.compile's CUDA graphs must split around the ops."""
    if not hasattr(torch.Tag, "cudagraph_unsafe"):
        pytest.skip("this torch has no cudagraph_unsafe tag")
    for name in ("dense_crf", "dense_crf_features", "dense_crf_pairwise_energy"):
        assert torch.Tag.cudagraph_unsafe in getattr(torch.ops.deeplab_fast, name).default.tags, name
