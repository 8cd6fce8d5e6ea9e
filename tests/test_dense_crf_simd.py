"""The CPU dense CRF's vector paths (issue 19) against pydensecrf2, bit for bit, at every instruction-set level.

The kernels are compiled for AVX-512, AVX2 and the baseline and picked at run time; ``DEEPLAB_FAST_CPU_SIMD``
forces a level (read per call). Every level, every thread count and every path must give pydensecrf2's marginals
exactly (max |dQ| = 0 with Potts and diagonal compatibilities):
- the packed paths for 2 labels (4 pixels per 8-float vector) and 3-4 labels (2 pixels per vector), which also run
  std::exp as a vectorised copy of glibc's expf;
- the register path (up to 64 labels) and the chunked path above it (65 to 257 labels here);
- the lattice paths: 2-D and 5-D features (DenseCRF2D), the 4-D features of volumes (3-D position + intensity),
  the generic dimension, the multi-range parallel build and splat (images of more than 32768 pixels with 2
  threads), odd image sizes (blocks of 16 pixels with a partial last one), batches.
Levels this CPU lacks are skipped (forcing one is an error, checked here).
"""
import json

import numpy as np
import pytest
import torch

import deeplab_fast  # noqa: F401
from deeplab_fast.ops import dense_crf, dense_crf_features

dcrf = pytest.importorskip("pydensecrf.densecrf")

DEFAULT = dict(gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=80.0, bilateral_srgb=13.0, bilateral_compat=10.0)
DEEPLAB_V2 = dict(gaussian_sxy=1.0, gaussian_compat=3.0, bilateral_sxy=67.0, bilateral_srgb=3.0, bilateral_compat=4.0)
LEVELS = ("avx512", "avx2", "baseline")


def simd_info() -> dict:
    return json.loads(torch.ops.deeplab_fast._cpu_simd())


SUPPORTED = simd_info()["supported"]


def random_image(rng, H, W) -> np.ndarray:
    base = rng.integers(0, 256, size=(H // 7 + 1, W // 7 + 1, 3))
    img = np.kron(base, np.ones((7, 7, 1)))[:H, :W] + rng.normal(0, 8, size=(H, W, 3))
    return np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8))


def reference(unary: np.ndarray, img: np.ndarray, iterations: int, k: dict) -> np.ndarray:
    L, H, W = unary.shape
    d = dcrf.DenseCRF2D(W, H, L)
    d.setUnaryEnergy(np.ascontiguousarray(unary.reshape(L, -1)))
    d.addPairwiseGaussian(sxy=k["gaussian_sxy"], compat=k["gaussian_compat"])
    d.addPairwiseBilateral(sxy=k["bilateral_sxy"], srgb=k["bilateral_srgb"], rgbim=img, compat=k["bilateral_compat"])
    return np.array(d.inference(iterations)).reshape(L, H, W)


def ours(monkeypatch, level: str, threads: int, unary: np.ndarray, img: np.ndarray, iterations: int, k: dict):
    monkeypatch.setenv("DEEPLAB_FAST_CPU_SIMD", level)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        u = torch.from_numpy(unary)
        im = torch.from_numpy(img)
        if u.dim() == 3:
            u, im = u[None], im[None]
        q = dense_crf(u, im.permute(0, 3, 1, 2).contiguous(), iterations=iterations,
                      **{n: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for n, v in k.items()})
    finally:
        torch.set_num_threads(before)
    assert torch.isfinite(q).all(), "unwritten (NaN-poisoned) or non-finite marginals"
    return q.numpy()


def assert_exact(q: np.ndarray, ref: np.ndarray, what: str):
    assert q.shape == ref.shape
    diff = float(np.abs(q - ref).max())
    assert np.array_equal(q, ref), f"{what}: max |dQ| = {diff:.3g} (must be 0)"


def each_level_and_thread_count(monkeypatch, unary, img, iterations, k, ref, what):
    """Ours at every supported level with 1 and 2 threads: each bitwise equal to ref (and so to each other)."""
    runs = 0
    for level in LEVELS:
        if level not in SUPPORTED:
            continue
        for threads in (1, 2):
            q = ours(monkeypatch, level, threads, unary, img, iterations, k)
            assert_exact(q.reshape(ref.shape), ref, f"{what}, {level}, {threads} thread(s)")
            runs += 1
    assert runs >= 2


# ----------------------------------------------------------------------------------------------------------
# The switch


def test_the_switch(monkeypatch):
    info = simd_info()
    assert info["supported"][-1] == "baseline" and info["active"] in info["supported"]
    for level in info["supported"]:
        monkeypatch.setenv("DEEPLAB_FAST_CPU_SIMD", level)
        assert simd_info()["active"] == level
    monkeypatch.setenv("DEEPLAB_FAST_CPU_SIMD", "auto")
    assert simd_info()["active"] == info["supported"][0]
    monkeypatch.setenv("DEEPLAB_FAST_CPU_SIMD", "avx1024")
    with pytest.raises(ValueError, match="DEEPLAB_FAST_CPU_SIMD"):
        simd_info()
    with pytest.raises(ValueError, match="DEEPLAB_FAST_CPU_SIMD"):
        dense_crf(torch.rand(1, 3, 8, 8), torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    missing = [level for level in LEVELS if level not in info["supported"]]
    for level in missing:  # a level this CPU lacks is an error naming it
        monkeypatch.setenv("DEEPLAB_FAST_CPU_SIMD", level)
        with pytest.raises(RuntimeError, match=f"DEEPLAB_FAST_CPU_SIMD={level}"):
            dense_crf(torch.rand(1, 3, 8, 8), torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_glibc_expf_is_vectorised_where_it_can_be():
    """Informational on other C libraries: the vectorised expf is used only where it matched this process's."""
    info = simd_info()
    assert info["libm_exp"] in ("vector", "scalar")
    if info["active"] != "baseline" and info["libm_exp"] == "scalar":
        pytest.skip("this process's expf differs from glibc's on the check inputs: the kernels call it per lane")


# ----------------------------------------------------------------------------------------------------------
# Label counts, sizes, threads, levels


@pytest.mark.parametrize("L", list(range(1, 10)) + [15, 16, 17, 63, 64, 65, 255, 256, 257])
def test_label_counts(monkeypatch, L):
    rng = np.random.default_rng(L)
    H, W = 23, 37  # odd: a partial block of 16 pixels, a partial vector of pixels
    img = random_image(rng, H, W)
    unary = (rng.standard_normal((L, H, W)) * 2 + 3).astype(np.float32)
    ref = reference(unary, img, 5, DEFAULT)
    each_level_and_thread_count(monkeypatch, unary, img, 5, DEFAULT, ref, f"L={L}")


@pytest.mark.parametrize("kernels", ["default", "deeplab_v2"])
@pytest.mark.parametrize("L", [2, 3, 4, 21, 65])
def test_parallel_build_and_splat(monkeypatch, L, kernels):
    """181 x 193 pixels: the lattice is built in two ranges and merged, and the splat split between threads."""
    rng = np.random.default_rng(100 + L)
    H, W = 181, 193
    img = random_image(rng, H, W)
    low = rng.standard_normal((1, L, H // 8 + 1, W // 8 + 1)).astype(np.float32) * 3
    logits = torch.nn.functional.interpolate(torch.from_numpy(low), size=(H, W), mode="bilinear")
    unary = (-torch.log_softmax(logits, 1))[0].numpy().copy()
    k = DEFAULT if kernels == "default" else DEEPLAB_V2
    ref = reference(unary, img, 4, k)
    each_level_and_thread_count(monkeypatch, unary, img, 4, k, ref, f"L={L} {kernels}")


@pytest.mark.parametrize("L", [2, 3, 4, 9, 70])
def test_diagonal_compatibilities(monkeypatch, L):
    """Per-label (diagonal) compatibilities on the packed, register and chunked paths: exact."""
    rng = np.random.default_rng(7 + L)
    H, W = 29, 31
    img = random_image(rng, H, W)
    unary = (rng.standard_normal((L, H, W)) * 2 + 3).astype(np.float32)
    cg, cb = rng.uniform(-4, -1, L).astype(np.float32), rng.uniform(-9, -3, L).astype(np.float32)
    d = dcrf.DenseCRF2D(W, H, L)
    d.setUnaryEnergy(unary.reshape(L, -1).copy())
    d.addPairwiseGaussian(sxy=3, compat=cg)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=img, compat=cb)
    ref = np.array(d.inference(5)).reshape(L, H, W)
    k = dict(DEFAULT, gaussian_compat=cg, bilateral_compat=cb)
    each_level_and_thread_count(monkeypatch, unary, img, 5, k, ref, f"diagonal, L={L}")


@pytest.mark.parametrize("L", [2, 3])
def test_matrix_compatibilities_small_label_counts(monkeypatch, L):
    """A matrix compatibility with 2 or 3 labels (the generic per-pixel path): pydensecrf's to an ulp (it
    multiplies with Eigen's GEMM), and the same bits at every level."""
    rng = np.random.default_rng(30 + L)
    H, W = 26, 33
    img = random_image(rng, H, W)
    unary = (rng.standard_normal((L, H, W)) * 2 + 3).astype(np.float32)
    cg, cb = rng.uniform(0, 3, (L, L)).astype(np.float32), rng.uniform(0, 8, (L, L)).astype(np.float32)
    d = dcrf.DenseCRF2D(W, H, L)
    d.setUnaryEnergy(unary.reshape(L, -1).copy())
    d.addPairwiseGaussian(sxy=3, compat=cg)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=img, compat=cb)
    ref = np.array(d.inference(5)).reshape(L, H, W)
    k = dict(DEFAULT, gaussian_compat=cg, bilateral_compat=cb)
    qs = [ours(monkeypatch, level, threads, unary, img, 5, k)[0] for level in LEVELS if level in SUPPORTED
          for threads in (1, 2)]
    assert np.abs(qs[0] - ref).max() <= 1e-6
    for q in qs[1:]:
        assert np.array_equal(q, qs[0])


def test_batches(monkeypatch):
    """A batch of different images and label maps: each image equals pydensecrf2's, at every level."""
    rng = np.random.default_rng(5)
    for L in (2, 4, 21):
        B, H, W = 3, 27, 35
        imgs = np.stack([random_image(rng, H, W) for _ in range(B)])
        unary = (rng.standard_normal((B, L, H, W)) * 2 + 3).astype(np.float32)
        ref = np.stack([reference(unary[b], imgs[b], 4, DEFAULT) for b in range(B)])
        each_level_and_thread_count(monkeypatch, unary, imgs, 4, DEFAULT, ref, f"batch, L={L}")


@pytest.mark.parametrize("compat", [3e38, -3e38])
@pytest.mark.parametrize("L", [2, 3, 4, 9])
def test_huge_compatibilities_at_every_level(monkeypatch, L, compat):
    """Overflowing messages fall back to double per pixel on every path: finite marginals, the same bits at every
    level and thread count."""
    rng = np.random.default_rng(L)
    H, W = 20, 24
    img = random_image(rng, H, W)
    unary = (rng.standard_normal((L, H, W)) * 2 + 3).astype(np.float32)
    k = dict(DEFAULT, gaussian_compat=compat, bilateral_compat=compat)
    qs = [ours(monkeypatch, level, threads, unary, img, 3, k) for level in LEVELS if level in SUPPORTED
          for threads in (1, 2)]
    np.testing.assert_allclose(qs[0].sum(1), 1.0, atol=1e-5)
    for q in qs[1:]:
        assert np.array_equal(q, qs[0])


# ----------------------------------------------------------------------------------------------------------
# Feature dimensions: the 4-D path of volumes, and others


def volume_features(rng, D, H, W, spacing=(2.0, 1.0, 1.0), sigma=(3.0, 2.5, 2.5), intensity_sigma=12.0):
    """3-D positions (index x spacing / sigma) and one intensity channel / sigma of a blobby volume, [4, N]."""
    z, y, x = np.meshgrid(np.arange(D), np.arange(H), np.arange(W), indexing="ij")
    vol = 100.0 * (((z - D / 2) ** 2 / 4 + (y - H / 3) ** 2 + (x - W / 2) ** 2) < (H / 3) ** 2)
    vol = vol + rng.normal(0, 10, size=vol.shape)
    pos = [(a.ravel() * s / sg).astype(np.float32) for a, s, sg in zip((z, y, x), spacing, sigma)]
    return np.stack(pos + [(vol.ravel() / intensity_sigma).astype(np.float32)])


@pytest.mark.parametrize("L", [2, 3, 4, 5, 21])
@pytest.mark.parametrize("dim", [4, 3, 6])
def test_feature_dimensions(monkeypatch, dim, L):
    """dense_crf_features with 4-D features (3-D position + intensity: volumes), 3-D and 6-D: pydensecrf2's
    DenseCRF with the same features, bit for bit, at every level and thread count; 9 x 20 x 21 voxels."""
    rng = np.random.default_rng(dim * 10 + L)
    feats = volume_features(rng, 9, 20, 21)
    if dim == 3:
        feats = feats[[0, 1, 3]]
    elif dim == 6:
        feats = np.concatenate([feats, feats[3:4] * 0.5 + 1.0, feats[0:1] * 0.25])
    feats = np.ascontiguousarray(feats)
    N = feats.shape[1]
    unary = (rng.standard_normal((L, N)) * 2).astype(np.float32)
    d = dcrf.DenseCRF(N, L)
    d.setUnaryEnergy(unary.copy())
    d.addPairwiseEnergy(feats.copy(), compat=4.0)
    ref = np.array(d.inference(5))
    results = []
    for level in LEVELS:
        if level not in SUPPORTED:
            continue
        monkeypatch.setenv("DEEPLAB_FAST_CPU_SIMD", level)
        for threads in (1, 2):
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                q = dense_crf_features(torch.from_numpy(unary)[None], [torch.from_numpy(feats)[None]], [4.0],
                                       iterations=5)[0].numpy()
            finally:
                torch.set_num_threads(before)
            assert_exact(q, ref, f"d={dim}, L={L}, {level}, {threads} thread(s)")
            results.append(q)
    assert len(results) >= 2


def test_4d_volume_with_two_build_ranges(monkeypatch):
    """A 16 x 48 x 48 volume (36864 voxels: two build ranges with 2 threads), 3 labels, two 4-D terms."""
    rng = np.random.default_rng(4)
    feats = volume_features(rng, 16, 48, 48)
    gauss = np.ascontiguousarray(feats[:3] * 0.5)
    N, L = feats.shape[1], 3
    unary = (rng.standard_normal((L, N)) * 2).astype(np.float32)
    d = dcrf.DenseCRF(N, L)
    d.setUnaryEnergy(unary.copy())
    d.addPairwiseEnergy(gauss.copy(), compat=3.0)
    d.addPairwiseEnergy(np.ascontiguousarray(feats).copy(), compat=5.0)
    ref = np.array(d.inference(4))
    before = torch.get_num_threads()
    for level in LEVELS:
        if level not in SUPPORTED:
            continue
        monkeypatch.setenv("DEEPLAB_FAST_CPU_SIMD", level)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            try:
                q = dense_crf_features(torch.from_numpy(unary)[None],
                                       [torch.from_numpy(gauss)[None], torch.from_numpy(feats)[None]], [3.0, 5.0],
                                       iterations=4)[0].numpy()
            finally:
                torch.set_num_threads(before)
            assert_exact(q, ref, f"4-D volume, {level}, {threads} thread(s)")
