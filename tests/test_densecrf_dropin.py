"""``deeplab_fast.densecrf`` against the real pydensecrf2 on fresh random inputs.

Bar: max |Q - Q_ref| <= 1e-4 and the same argmax on >= 99.99% of the variables; step-by-step inference equals
``inference(n)`` to 1e-5; ``klDivergence`` matches pydensecrf's to a relative 1e-4.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ref = pytest.importorskip("pydensecrf.densecrf", reason="the reference pydensecrf2 is not installed")
ref_utils = pytest.importorskip("pydensecrf.utils")

import deeplab_fast.densecrf as dcrf  # noqa: E402
from deeplab_fast.densecrf import utils as our_utils  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "densecrf"

TOL = 1e-4
ARGMAX_AGREEMENT = 0.9999

DEFAULT_KERNELS = dict(g_sxy=3, g_compat=3, b_sxy=80, b_srgb=13, b_compat=10)  # pydensecrf's example
DEEPLAB_KERNELS = dict(g_sxy=1, g_compat=3, b_sxy=67, b_srgb=3, b_compat=4)  # DeepLab v2
KERNELS = {"default": DEFAULT_KERNELS, "deeplab": DEEPLAB_KERNELS}


# ---------------------------------------------------------------------------------------------------------
# Helpers.


def random_unary(rng, L, N, peaked=False):
    """Fresh random unaries: uniform energies, or -log of a peaked softmax (DeepLab-like)."""
    if peaked:
        logits = rng.normal(0.0, 3.0, size=(L, N))
        p = np.exp(logits - logits.max(0))
        p /= p.sum(0)
        return ref_utils.unary_from_softmax(p.astype(np.float32))
    return rng.uniform(0.1, 5.0, size=(L, N)).astype(np.float32)


def random_image(rng, H, W, anchor_origin=False):
    """A random RGB image. ``anchor_origin`` makes the top-left pixel black, so that its bilateral feature is
    the zero vector (see :func:`test_lattice_padding_vertices`)."""
    im = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    if anchor_origin:
        im[0, 0] = 0
    return im


def random_features(rng, D, N, scale):
    """Random normal features times ``scale``, so that the lattice has many cells."""
    return (rng.normal(size=(D, N)) * scale).astype(np.float32)


def random_compat(rng, kind, L):
    if kind == "scalar":
        return float(rng.uniform(1.0, 6.0))
    if kind == "vector":
        return rng.uniform(0.5, 4.0, size=L).astype(np.float32)  # positive diagonal
    if kind == "matrix":
        m = rng.uniform(-3.0, 3.0, size=(L, L)).astype(np.float32)
        assert not np.allclose(m, m.T)  # non-symmetric: checks the symmetrisation
        return m
    raise AssertionError(kind)


def load_photo(name):
    if not (DATA / name).exists():
        pytest.skip(f"real test photo {name} not found in {DATA} (shared test data missing)")
    PIL = pytest.importorskip("PIL.Image", reason="Pillow is needed to read the test photos")
    return np.ascontiguousarray(np.array(PIL.open(DATA / name).convert("RGB")))


def build(mod, ctor, unary, terms):
    """The same CRF in ``mod`` (pydensecrf or ours): ``ctor`` = ("2d", W, H, L) or ("generic", N, L);
    ``terms`` = [(method name, args, kwargs)]."""
    d = mod.DenseCRF2D(*ctor[1:]) if ctor[0] == "2d" else mod.DenseCRF(*ctor[1:])
    if unary is not None:
        d.setUnaryEnergy(unary)
    for name, args, kwargs in terms:
        getattr(d, name)(*args, **kwargs)
    return d


def run_both(ctor, unary, terms, n):
    q = build(dcrf, ctor, unary, terms).inference(n)
    q_ref = np.array(build(ref, ctor, unary, terms).inference(n))
    return q, q_ref


def assert_close(q, q_ref, tol=TOL):
    assert isinstance(q, np.ndarray) and q.dtype == np.float32, (type(q), getattr(q, "dtype", None))
    assert q.shape == q_ref.shape, (q.shape, q_ref.shape)
    assert np.isfinite(q).all()
    err = float(np.abs(q - q_ref).max())
    agree = float((q.argmax(0) == q_ref.argmax(0)).mean())
    assert err <= tol, f"max |Q - Q_ref| = {err:.3g} > {tol}"
    assert agree >= ARGMAX_AGREEMENT, f"argmax agreement {agree:.6f} < {ARGMAX_AGREEMENT}"
    return err


def image_terms(k, im):
    return [
        ("addPairwiseGaussian", (), dict(sxy=k["g_sxy"], compat=k["g_compat"])),
        ("addPairwiseBilateral", (), dict(sxy=k["b_sxy"], srgb=k["b_srgb"], rgbim=im, compat=k["b_compat"])),
    ]


# ---------------------------------------------------------------------------------------------------------
# DenseCRF2D.


@pytest.mark.parametrize(
    "photo,kernels,L,n,seed",
    [
        ("im1.png", "default", 21, 5, 0),
        ("im1.png", "deeplab", 21, 5, 1),
        ("im2.png", "default", 21, 5, 2),
        ("im2.png", "deeplab", 21, 5, 3),
        ("im1.png", "default", 2, 10, 4),
        ("im2.png", "deeplab", 81, 2, 5),
    ],
)
def test_photo(photo, kernels, L, n, seed):
    im = load_photo(photo)
    H, W = im.shape[:2]
    rng = np.random.default_rng(seed)
    unary = random_unary(rng, L, H * W, peaked=(L != 2))
    q, q_ref = run_both(("2d", W, H, L), unary, image_terms(KERNELS[kernels], im), n)
    assert_close(q, q_ref)
    # np.array / np.argmax on the result work as on pydensecrf's
    assert np.array_equal(np.argmax(np.array(q), axis=0), np.argmax(q, axis=0))


@pytest.mark.parametrize("HW", [(1, 37), (37, 1), (53, 71), (1, 1), (2, 3)])
@pytest.mark.parametrize("kernels", ["default", "deeplab"])
@pytest.mark.parametrize("L", [2, 21, 81])
def test_random_image(HW, kernels, L):
    H, W = HW
    for seed in range(2):
        rng = np.random.default_rng([seed, H, W, L])
        im = random_image(rng, H, W)
        unary = random_unary(rng, L, H * W, peaked=bool(seed))
        n = int(rng.integers(1, 11))
        q, q_ref = run_both(("2d", W, H, L), unary, image_terms(KERNELS[kernels], im), n)
        assert_close(q, q_ref)


@pytest.mark.parametrize("n", list(range(0, 11)))
def test_iterations(n):
    rng = np.random.default_rng(100 + n)
    H, W, L = 29, 41, 5
    im = random_image(rng, H, W)
    unary = random_unary(rng, L, H * W)
    q, q_ref = run_both(("2d", W, H, L), unary, image_terms(DEFAULT_KERNELS, im), n)
    assert_close(q, q_ref)


@pytest.mark.parametrize("seed", range(3))
def test_per_axis_standard_deviations(seed):
    rng = np.random.default_rng(200 + seed)
    H, W, L = 47, 31, 4
    im = random_image(rng, H, W)
    unary = random_unary(rng, L, H * W)
    sxy_g = tuple(float(v) for v in rng.uniform(0.7, 5.0, size=2))
    sxy_b = tuple(float(v) for v in rng.uniform(5.0, 60.0, size=2))
    srgb = tuple(float(v) for v in rng.uniform(3.0, 30.0, size=3))
    assert sxy_g[0] != sxy_g[1] and srgb[0] != srgb[1] != srgb[2]
    terms = [
        ("addPairwiseGaussian", (), dict(sxy=sxy_g, compat=3)),
        ("addPairwiseBilateral", (), dict(sxy=sxy_b, srgb=srgb, rgbim=im, compat=5)),
    ]
    q, q_ref = run_both(("2d", W, H, L), unary, terms, 5)
    assert_close(q, q_ref)
    # swapping the axes changes the answer, so the (x, y) order is really exercised
    swapped = [
        ("addPairwiseGaussian", (), dict(sxy=sxy_g[::-1], compat=3)),
        ("addPairwiseBilateral", (), dict(sxy=sxy_b[::-1], srgb=srgb, rgbim=im, compat=5)),
    ]
    q_swapped = build(dcrf, ("2d", W, H, L), unary, swapped).inference(5)
    assert np.abs(q_swapped - q).max() > 1e-3


@pytest.mark.parametrize("compat_kind", ["scalar", "vector", "matrix"])
@pytest.mark.parametrize("normalization", [0, 1, 2, 3])
@pytest.mark.parametrize("kernel", [0, 1, 2])
def test_2d_compat_normalization_kernel(compat_kind, normalization, kernel):
    rng = np.random.default_rng([300, normalization, kernel, len(compat_kind)])
    H, W, L = 23, 19, 6
    im = random_image(rng, H, W)
    unary = random_unary(rng, L, H * W, peaked=True)
    kw = dict(kernel=kernel, normalization=normalization)
    # without normalisation the kernel sums are large: keep the messages in a sane range
    scale = 0.05 if normalization == 0 else 1.0
    terms = [
        ("addPairwiseGaussian", (), dict(sxy=3, compat=_scaled(random_compat(rng, compat_kind, L), scale), **kw)),
        ("addPairwiseBilateral", (),
         dict(sxy=30, srgb=13, rgbim=im, compat=_scaled(random_compat(rng, compat_kind, L), scale), **kw)),
    ]
    q, q_ref = run_both(("2d", W, H, L), unary, terms, 4)
    assert_close(q, q_ref)


# pydensecrf's lattice construction (the SSE branch of Permutohedral::init, the one built on x86-64) embeds the
# variables four at a time and fills the last block with zero feature vectors when N % 4 != 0. Those padding
# entries are inserted into the lattice's hash table, so the d+1 vertices of the simplex around the origin of
# feature space exist as lattice points even when no variable uses them. They get nothing from splatting but
# relay values during the blur, which changes the result for variables whose features lie near the origin
# (bilateral features: dark pixels near the top-left corner). The op must create them too; a variable whose
# feature vector is exactly zero creates the same vertices, so "anchored" inputs do not exercise this.
@pytest.mark.parametrize("anchor", [False, True])
def test_lattice_padding_vertices(anchor):
    H, W, L = 53, 71, 2  # N = 3763 = 3 (mod 4): pydensecrf pads one zero feature vector
    rng = np.random.default_rng([1, H, W, L])
    im = random_image(rng, H, W, anchor_origin=anchor)  # without the padding vertices: max |dQ| = 0.21
    unary = random_unary(rng, L, H * W, peaked=True)
    q, q_ref = run_both(("2d", W, H, L), unary, [image_terms(DEFAULT_KERNELS, im)[1]], 1)
    assert_close(q, q_ref)


@pytest.mark.parametrize("extra", [1, 2, 3])
def test_lattice_padding_vertices_generic(extra):
    """700 variables near the origin plus ``extra`` far away ones, which cannot influence them, except through
    pydensecrf's padding vertices (4 - extra of them)."""
    D, L = 5, 2
    rng = np.random.default_rng(3)  # a case where the origin simplex is not otherwise fully occupied
    feats = np.ascontiguousarray(np.concatenate(
        [(rng.normal(size=(D, 700)) * 1.5), np.full((D, extra), 100.0) + np.arange(extra) * 10], 1),
        dtype=np.float32)
    N = feats.shape[1]
    unary = random_unary(np.random.default_rng(103), L, N)
    for n in (1, 4):
        q, q_ref = run_both(("generic", N, L), unary, [("addPairwiseEnergy", (feats, 5.0), {})], n)
        assert_close(q, q_ref)


def _scaled(c, s):
    return c * s if isinstance(c, float) else (c * np.float32(s)).astype(np.float32)


def test_utils_features_through_add_pairwise_energy():
    """The pydensecrf.utils workflow ((y, x) feature order) on a DenseCRF2D via addPairwiseEnergy."""
    rng = np.random.default_rng(400)
    H, W, L = 37, 53, 7
    im = random_image(rng, H, W)
    probs = np.ascontiguousarray(rng.dirichlet(np.ones(L), size=H * W).T.reshape(L, H, W), dtype=np.float32)
    unary = our_utils.unary_from_softmax(probs)
    np.testing.assert_array_equal(unary, ref_utils.unary_from_softmax(probs))
    g = our_utils.create_pairwise_gaussian(sdims=(3, 2), shape=(H, W))
    b = our_utils.create_pairwise_bilateral(sdims=(50, 70), schan=(13, 10, 7), img=im, chdim=2)
    np.testing.assert_array_equal(g, ref_utils.create_pairwise_gaussian(sdims=(3, 2), shape=(H, W)))
    np.testing.assert_array_equal(b, ref_utils.create_pairwise_bilateral(sdims=(50, 70), schan=(13, 10, 7),
                                                                          img=im, chdim=2))
    terms = [
        ("addPairwiseEnergy", (g,), dict(compat=3)),
        ("addPairwiseEnergy", (b,), dict(compat=10, kernel=dcrf.DIAG_KERNEL,
                                          normalization=dcrf.NORMALIZE_SYMMETRIC)),
    ]
    q, q_ref = run_both(("2d", W, H, L), unary, terms, 5)
    assert_close(q, q_ref)


# ---------------------------------------------------------------------------------------------------------
# Generic DenseCRF.


@pytest.mark.parametrize("D", [1, 2, 5, 7, 16])
@pytest.mark.parametrize("compat_kind", ["scalar", "vector", "matrix"])
@pytest.mark.parametrize("normalization", [0, 1, 2, 3])
def test_generic_features(D, compat_kind, normalization):
    rng = np.random.default_rng([500, D, normalization, len(compat_kind)])
    N, L = 697 + D, 5  # N % 4 = 2, 3, 2, 0, 1
    unary = random_unary(rng, L, N, peaked=True)
    feats = random_features(rng, D, N, 2.5)
    compat = random_compat(rng, compat_kind, L)
    if normalization == 0:
        compat = _scaled(compat, 0.05)
    kernel = int(rng.integers(0, 3))
    terms = [("addPairwiseEnergy", (feats, compat), dict(kernel=kernel, normalization=normalization))]
    for n in (1, 6):
        q, q_ref = run_both(("generic", N, L), unary, terms, n)
        assert_close(q, q_ref)


@pytest.mark.parametrize("seed", range(4))
def test_generic_several_terms(seed):
    rng = np.random.default_rng(600 + seed)
    N, L = 899 + seed, int(rng.choice([2, 21]))
    unary = random_unary(rng, L, N)
    terms = []
    for _ in range(3):
        D = int(rng.choice([2, 5, 7]))
        feats = random_features(rng, D, N, rng.uniform(1.0, 4.0))
        compat = random_compat(rng, str(rng.choice(["scalar", "vector", "matrix"])), L)
        terms.append(("addPairwiseEnergy", (feats, compat),
                      dict(kernel=int(rng.integers(0, 3)), normalization=int(rng.integers(1, 4)))))
    q, q_ref = run_both(("generic", N, L), unary, terms, int(rng.integers(1, 11)))
    assert_close(q, q_ref)


def test_kernel_type_does_not_change_inference():
    rng = np.random.default_rng(700)
    N, L = 500, 4
    unary = random_unary(rng, L, N)
    feats = (rng.normal(size=(3, N)) * 2).astype(np.float32)
    qs = [build(dcrf, ("generic", N, L), unary, [("addPairwiseEnergy", (feats, 5.0), dict(kernel=k))]).inference(5)
          for k in (dcrf.CONST_KERNEL, dcrf.DIAG_KERNEL, dcrf.FULL_KERNEL)]
    assert np.array_equal(qs[0], qs[1]) and np.array_equal(qs[1], qs[2])


def test_matrix_compat_is_symmetrised():
    rng = np.random.default_rng(710)
    N, L = 400, 5
    unary = random_unary(rng, L, N)
    feats = (rng.normal(size=(2, N)) * 2).astype(np.float32)
    m = rng.uniform(-3, 3, size=(L, L)).astype(np.float32)
    sym = (np.float32(0.5) * (m + m.T)).astype(np.float32)
    q_m = build(dcrf, ("generic", N, L), unary, [("addPairwiseEnergy", (feats, m), {})]).inference(4)
    q_s = build(dcrf, ("generic", N, L), unary, [("addPairwiseEnergy", (feats, sym), {})]).inference(4)
    np.testing.assert_allclose(q_m, q_s, atol=1e-6)


def test_infinite_unary_entries():
    """+inf marks an impossible label (probability 0), as in pydensecrf."""
    rng = np.random.default_rng(720)
    H, W, L = 17, 23, 4
    im = random_image(rng, H, W)
    unary = random_unary(rng, L, H * W)
    mask = rng.random((L, H * W)) < 0.3
    mask[rng.integers(0, L, size=H * W), np.arange(H * W)] = False  # every pixel keeps a possible label
    unary[mask] = np.inf
    q, q_ref = run_both(("2d", W, H, L), unary, image_terms(DEFAULT_KERNELS, im), 5)
    assert_close(q, q_ref)
    assert (q[mask] == 0).all()


# ---------------------------------------------------------------------------------------------------------
# Missing unary / pairwise terms.


@pytest.mark.parametrize("n", [-2, 0, 1, 5])
def test_no_pairwise_is_softmax(n):
    rng = np.random.default_rng(800)
    N, L = 300, 6
    unary = random_unary(rng, L, N)
    q, q_ref = run_both(("generic", N, L), unary, [], n)
    assert_close(q, q_ref, tol=1e-6)
    e = np.exp(-(unary - unary.min(0)).astype(np.float64))
    np.testing.assert_allclose(q, e / e.sum(0), atol=1e-6)


@pytest.mark.parametrize("n", [0, 3])
def test_no_unary(n):
    rng = np.random.default_rng(810)
    H, W, L = 13, 11, 3
    im = random_image(rng, H, W)
    q, q_ref = run_both(("2d", W, H, L), None, image_terms(DEFAULT_KERNELS, im), n)
    assert_close(q, q_ref, tol=1e-6)
    q, q_ref = run_both(("2d", W, H, L), None, [], n)
    np.testing.assert_allclose(q, np.full((L, H * W), 1.0 / L), atol=1e-7)
    assert_close(q, q_ref, tol=1e-7)


def test_set_unary_replaces_and_copies():
    rng = np.random.default_rng(820)
    N, L = 200, 4
    u1, u2 = random_unary(rng, L, N), random_unary(rng, L, N)
    feats = (rng.normal(size=(2, N)) * 2).astype(np.float32)
    d = build(dcrf, ("generic", N, L), u1, [("addPairwiseEnergy", (feats, 3.0), {})])
    d.setUnaryEnergy(u2)
    u2_copy = u2.copy()
    q = d.inference(3)
    u2[:] = 0  # the CRF keeps its own copy, as pydensecrf
    feats[:] = 0
    np.testing.assert_array_equal(d.inference(3), q)
    # and ConstUnary / setUnary do the same as setUnaryEnergy
    d2 = dcrf.DenseCRF(N, L)
    d2.setUnary(dcrf.ConstUnary(u2_copy))
    d3 = dcrf.DenseCRF(N, L)
    d3.setUnaryEnergy(u2_copy)
    np.testing.assert_array_equal(d2.inference(2), d3.inference(2))


# ---------------------------------------------------------------------------------------------------------
# Step-by-step inference and the KL divergence.


def _step_case(seed, with_unary=True):
    rng = np.random.default_rng(900 + seed)
    H, W, L = 31, 27, int(rng.choice([2, 5, 21]))
    im = random_image(rng, H, W)
    unary = random_unary(rng, L, H * W, peaked=bool(seed % 2)) if with_unary else None
    terms = image_terms(KERNELS["deeplab" if seed % 2 else "default"], im)
    terms.append(("addPairwiseEnergy", (random_features(rng, 3, H * W, 2.0),
                                        random_compat(rng, "matrix", L)), dict(normalization=int(seed % 4))))
    return ("2d", W, H, L), unary, terms


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n", [1, 3, 7])
def test_step_inference(seed, n):
    ctor, unary, terms = _step_case(seed)
    d = build(dcrf, ctor, unary, terms)
    Q, tmp1, tmp2 = d.startInference()
    np.testing.assert_array_equal(Q, d.inference(0))
    Q_id, Q_ptr = id(Q), Q.__array_interface__["data"][0]
    for _ in range(n):
        before = Q.copy()
        assert d.stepInference(Q, tmp1, tmp2) is None
        assert not np.array_equal(before, Q)  # updated in place
    assert id(Q) == Q_id and Q.__array_interface__["data"][0] == Q_ptr
    np.testing.assert_allclose(Q, d.inference(n), atol=1e-5, rtol=0)
    # and against pydensecrf's own stepping
    r = build(ref, ctor, unary, terms)
    Qr, t1, t2 = r.startInference()
    for _ in range(n):
        r.stepInference(Qr, t1, t2)
    assert_close(Q, np.array(Qr))


def test_step_inference_without_unary():
    ctor, _, terms = _step_case(0, with_unary=False)
    d, r = build(dcrf, ctor, None, terms), build(ref, ctor, None, terms)
    Q, t1, t2 = d.startInference()
    Qr, r1, r2 = r.startInference()
    np.testing.assert_array_equal(Q, np.array(Qr))  # pydensecrf starts from zeros here
    for _ in range(3):
        d.stepInference(Q, t1, t2)
        r.stepInference(Qr, r1, r2)
    assert_close(Q, np.array(Qr))
    # the first step from zeros gives the uniform softmax(-0): n steps are inference(n - 1) here, as in pydensecrf
    np.testing.assert_allclose(Q, d.inference(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("with_unary", [True, False])
def test_kl_divergence(seed, with_unary):
    ctor, unary, terms = _step_case(seed, with_unary)
    d, r = build(dcrf, ctor, unary, terms), build(ref, ctor, unary, terms)
    Qr, t1, t2 = r.startInference()
    if not with_unary:
        r.stepInference(Qr, t1, t2)  # from the all-zero start to a proper distribution
    for step in range(3):
        kl_ref = r.klDivergence(Qr)
        kl = d.klDivergence(np.array(Qr))  # the very same marginals
        assert isinstance(kl, float)
        assert abs(kl - kl_ref) <= 1e-4 * abs(kl_ref), (step, kl, kl_ref)
        r.stepInference(Qr, t1, t2)


def test_kl_divergence_no_pairwise():
    rng = np.random.default_rng(950)
    N, L = 321, 7
    unary = random_unary(rng, L, N)
    d, r = build(dcrf, ("generic", N, L), unary, []), build(ref, ("generic", N, L), unary, [])
    Qr, _, _ = r.startInference()
    kl_ref = r.klDivergence(Qr)
    assert abs(d.klDivergence(np.array(Qr)) - kl_ref) <= 1e-4 * abs(kl_ref)


# ---------------------------------------------------------------------------------------------------------
# API surface and errors.


def test_constants_match_pydensecrf():
    for name in ["CONST_KERNEL", "DIAG_KERNEL", "FULL_KERNEL", "NO_NORMALIZATION", "NORMALIZE_BEFORE",
                 "NORMALIZE_AFTER", "NORMALIZE_SYMMETRIC"]:
        assert int(getattr(dcrf, name)) == int(getattr(ref, name)), name
    assert (dcrf.CONST_KERNEL, dcrf.DIAG_KERNEL, dcrf.FULL_KERNEL) == (0, 1, 2)
    normalizations = (dcrf.NO_NORMALIZATION, dcrf.NORMALIZE_BEFORE, dcrf.NORMALIZE_AFTER, dcrf.NORMALIZE_SYMMETRIC)
    assert normalizations == (0, 1, 2, 3)
    assert isinstance(dcrf.DIAG_KERNEL, dcrf.KernelType) and isinstance(dcrf.NO_NORMALIZATION, dcrf.NormalizationType)


def test_keyword_names_match_pydensecrf():
    rng = np.random.default_rng(1050)
    H, W, L = 9, 14, 3
    im = random_image(rng, H, W)
    unary = random_unary(rng, L, H * W)
    qs = []
    for mod in (dcrf, ref):
        d = mod.DenseCRF2D(W, H, L)  # pydensecrf's constructors take positional arguments only
        d.setUnaryEnergy(u=unary)
        d.addPairwiseGaussian(sxy=(2, 3), compat=3, kernel=mod.FULL_KERNEL, normalization=mod.NORMALIZE_AFTER)
        d.addPairwiseBilateral(sxy=40, srgb=(10, 12, 14), rgbim=im, compat=5, kernel=mod.CONST_KERNEL,
                               normalization=mod.NORMALIZE_BEFORE)
        d.addPairwiseEnergy(features=random_features(np.random.default_rng(1), 4, H * W, 2.0), compat=2.0)
        qs.append(np.array(d.inference(3)))  # pydensecrf: positional only
        g = mod.DenseCRF(H * W, L)
        g.setUnaryEnergy(unary)
        qs.append(np.array(g.inference(1)))
    assert_close(qs[0], qs[2])
    assert_close(qs[1], qs[3])


def test_learning_path_not_implemented():
    rng = np.random.default_rng(1000)
    d = dcrf.DenseCRF(10, 3)
    u = random_unary(rng, 3, 10)
    with pytest.raises(NotImplementedError, match="learning"):
        d.setUnaryEnergy(u, rng.normal(size=(4, 10)).astype(np.float32))
    with pytest.raises(NotImplementedError, match="learning"):
        dcrf.LogisticUnary(u, u)


def test_bad_arguments():
    rng = np.random.default_rng(1100)
    H, W, L = 5, 7, 3
    N = H * W
    d = dcrf.DenseCRF2D(W, H, L)
    with pytest.raises(ValueError, match="unary"):
        d.setUnaryEnergy(random_unary(rng, L, N + 1))
    with pytest.raises(ValueError, match="unary"):
        d.setUnaryEnergy(random_unary(rng, L + 1, N))
    with pytest.raises(ValueError, match="unary"):
        d.setUnaryEnergy(np.full((L, N), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="u "):
        d.setUnaryEnergy(random_unary(rng, L, N)[None])
    with pytest.raises(ValueError, match="features"):
        d.addPairwiseEnergy(rng.normal(size=(2, N - 1)).astype(np.float32), 3)
    with pytest.raises(ValueError, match="features"):
        d.addPairwiseEnergy(np.full((2, N), np.inf, dtype=np.float32), 3)
    with pytest.raises(NotImplementedError, match="dimensions"):
        d.addPairwiseEnergy(rng.normal(size=(17, N)).astype(np.float32), 3)
    with pytest.raises(ValueError, match="rgbim"):
        d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=random_image(rng, W, H), compat=10)  # (W, H) swapped
    with pytest.raises(ValueError, match="rgbim"):
        d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=rng.integers(0, 255, (H, W, 4), dtype=np.uint8), compat=10)
    with pytest.raises(ValueError, match="rgbim"):
        d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=random_image(rng, H, W)[..., 0], compat=10)
    with pytest.raises(ValueError, match="rgbim"):
        d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=random_image(rng, H, W).astype(np.float32), compat=10)
    with pytest.raises(ValueError, match="dimension > 2"):
        d.addPairwiseGaussian(sxy=3, compat=np.ones((L, L, L), dtype=np.float32))
    with pytest.raises(ValueError, match="compat"):
        d.addPairwiseGaussian(sxy=3, compat=np.ones(L + 1, dtype=np.float32))
    with pytest.raises(ValueError, match="compat"):
        d.addPairwiseGaussian(sxy=3, compat=np.ones((L, L + 1), dtype=np.float32))
    with pytest.raises(ValueError, match="sxy"):
        d.addPairwiseGaussian(sxy=0, compat=3)
    with pytest.raises(ValueError, match="sxy"):
        d.addPairwiseGaussian(sxy=(1, 2, 3), compat=3)
    with pytest.raises(ValueError, match="srgb"):
        d.addPairwiseBilateral(sxy=80, srgb=(13, 13), rgbim=random_image(rng, H, W), compat=10)
    with pytest.raises(ValueError, match="kernel"):
        d.addPairwiseGaussian(sxy=3, compat=3, kernel=3)
    with pytest.raises(ValueError, match="normalization"):
        d.addPairwiseGaussian(sxy=3, compat=3, normalization=4)
    Q, t1, t2 = d.startInference()
    with pytest.raises(ValueError, match="Q"):
        d.stepInference(Q[:, 1:].copy(), t1, t2)
    with pytest.raises(ValueError, match="Q"):
        d.klDivergence(Q.T.copy())
    with pytest.raises(TypeError, match="niter"):
        d.inference(2.0)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="^nvar "):
            dcrf.DenseCRF(bad, L)
        with pytest.raises(ValueError, match="^nlabels "):
            dcrf.DenseCRF(N, bad)
        with pytest.raises(ValueError, match="^w "):
            dcrf.DenseCRF2D(bad, H, L)
        with pytest.raises(ValueError, match="^h "):
            dcrf.DenseCRF2D(W, bad, L)
        with pytest.raises(ValueError, match="^nlabels "):
            dcrf.DenseCRF2D(W, H, bad)
    # nothing bad was added along the way: the CRF still matches pydensecrf's empty one
    assert_close(d.inference(2), np.array(ref.DenseCRF2D(W, H, L).inference(2)), tol=1e-7)


def test_lenient_inputs_match_strict_ones():
    """Non-contiguous / float64 inputs (which pydensecrf rejects) give the float32 C-contiguous result."""
    rng = np.random.default_rng(1200)
    H, W, L = 19, 13, 4
    im = random_image(rng, H, W)
    unary = random_unary(rng, L, H * W)
    strict = build(dcrf, ("2d", W, H, L), unary, image_terms(DEFAULT_KERNELS, im)).inference(3)
    im_nc = np.asfortranarray(im)
    unary_nc = np.asfortranarray(unary.astype(np.float64))
    lenient = build(dcrf, ("2d", W, H, L), unary_nc, image_terms(DEFAULT_KERNELS, im_nc)).inference(3)
    np.testing.assert_array_equal(strict, lenient)


@pytest.mark.parametrize("compat", [3.5e38, -3.5e38, 10**40])
def test_scalar_compat_beyond_float32_is_refused_when_added(compat):
    """A Potts weight that is finite in double but overflows float32 is refused by the call that adds it, not
    accepted there and refused later by klDivergence (found by the fuzz suite: inference(0) then klDivergence)."""
    d = dcrf.DenseCRF2D(4, 3, 2)
    with pytest.raises(ValueError, match="compat must be finite in float32"):
        d.addPairwiseGaussian(sxy=3, compat=compat)
    with pytest.raises(ValueError, match="compat must be finite in float32"):
        d.addPairwiseEnergy(np.ones((2, 12), np.float32), compat=compat)
