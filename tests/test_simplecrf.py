"""``deeplab_fast.simplecrf``: the SimpleCRF drop-in (``from deeplab_fast.simplecrf import denseCRF, denseCRF3D``).

- 2-D: the labels equal those of pydensecrf2's ``DenseCRF2D`` driven as SimpleCRF's ``dense_crf_inference`` drives
  Krähenbühl's (clipped unary, bilateral then Gaussian term).
- 3-D, ``simplecrf_order=True``: the labels equal those of pydensecrf2's generic ``DenseCRF`` fed SimpleCRF's feature
  layout, built here with numpy from its C++ loops (``DenseCRF3D(W_=D, H_=H, Z_=W)`` over C-ordered voxels).
- 3-D, default: the correct geometry, i.e. :func:`dense_crf_3d` with spacing 1 and (Z, C, R) standard deviations
  along (D, H, W), and pydensecrf2 fed those features.
- SimpleCRF's demos (examples/demo_densecrf.py, demo_densecrf3d.py) re-enacted on images made here: their
  conversions, parameters and calls, with the import changed. Two of their lines cannot run in this environment
  whichever module is imported, and are adapted: ``nibabel``'s ``get_data()`` (removed in nibabel 5; here
  ``get_fdata()``) and ``lab * 255`` on int8 labels (an OverflowError under NumPy 2's promotion rules; SimpleCRF
  itself builds only against NumPy < 2).
- Errors name the argument or the ``param`` key.
"""
import numpy as np
import pytest
import torch

from deeplab_fast.data import synthetic_volume
from deeplab_fast.ops import dense_crf_3d
from deeplab_fast.simplecrf import denseCRF, denseCRF3D

from helpers import volume_features_numpy

F32 = np.float32


def _dcrf():
    return pytest.importorskip("pydensecrf.densecrf")


PARAM_2D = (10.0, 80, 13, 3.0, 3, 5.0)  # SimpleCRF's demo values (w1, alpha, beta, w2, gamma, it)
PARAM_3D = dict(MaxIterations=2.0, PosW=2.0, PosRStd=5, PosCStd=5, PosZStd=5, BilateralW=3.0, BilateralRStd=5.0,
                BilateralCStd=5.0, BilateralZStd=5.0, ModalityNum=1, BilateralModsStds=(5.0,))


def energies(p: np.ndarray) -> np.ndarray:
    """[..., L] -> [L, N] float32 -log(p) (float64 log, rounded once)."""
    L = p.shape[-1]
    with np.errstate(divide="ignore"):
        return np.ascontiguousarray((-np.log(p.reshape(-1, L).astype(np.float64))).astype(F32).T)


def volume(shape, labels=2, channels=1, seed=0):
    """SimpleCRF's layout: I [D, H, W, C] uint8, P [D, H, W, L] float32; and the truth."""
    v = synthetic_volume(shape, labels, channels, seed=seed)
    return (np.ascontiguousarray(np.moveaxis(v.image, 0, -1)), np.ascontiguousarray(np.moveaxis(v.probabilities, 0, -1)),
            v.truth)


# ----------------------------------------------------------------------------------------------------------
# 2-D


def reference_2d(I, P, param):
    w1, alpha, beta, w2, gamma, it = param
    dcrf = _dcrf()
    H, W, L = P.shape
    d = dcrf.DenseCRF2D(W, H, L)
    d.setUnaryEnergy(energies(np.clip(P, F32(0.01), F32(0.99))))
    d.addPairwiseBilateral(sxy=alpha, srgb=beta, rgbim=np.array(I, order="C"), compat=w1)
    d.addPairwiseGaussian(sxy=gamma, compat=w2)
    return np.array(d.inference(int(it))).argmax(0).reshape(H, W).astype(np.int8)


def image_2d(seed, H=48, W=64, L=3):
    rng = np.random.default_rng(seed)
    truth = np.zeros((H, W), np.int64)
    for k in range(1, L):
        cy, cx, r = rng.uniform(0.2 * H, 0.8 * H), rng.uniform(0.2 * W, 0.8 * W), rng.uniform(0.12, 0.3) * min(H, W)
        yy, xx = np.mgrid[0:H, 0:W]
        truth[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    colours = rng.integers(0, 256, size=(L, 3))
    I = np.clip(colours[truth] + rng.normal(0, 12, size=(H, W, 3)), 0, 255).astype(np.uint8)
    logits = rng.normal(0, 1.2, size=(H, W, L))
    logits[np.arange(H)[:, None], np.arange(W)[None], truth] += 1.0
    P = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return I, P.astype(F32), truth


@pytest.mark.parametrize("seed,L", [(0, 2), (1, 3), (2, 5)])
@pytest.mark.parametrize("param", [PARAM_2D, (4.0, 67.0, 3.0, 3.0, 1.0, 10)])
def test_2d_equals_pydensecrf2(seed, L, param):
    I, P, truth = image_2d(seed, L=L)
    lab = denseCRF.densecrf(I, P, param)
    assert isinstance(lab, np.ndarray) and lab.dtype == np.int8 and lab.shape == P.shape[:2]
    np.testing.assert_array_equal(lab, reference_2d(I, P, param))
    assert (lab == truth).mean() > (P.argmax(-1) == truth).mean()


# ----------------------------------------------------------------------------------------------------------
# 3-D, SimpleCRF's order


def simplecrf_features(I: np.ndarray, p: dict):
    """SimpleCRF's features with numpy, from its loops: DenseCRF3D(W_=D, H_=H, Z_=W); for k < Z_, j < H_, i < W_:
    voxel k*H_*W_ + j*W_ + i gets (i / sR, j / sC, k / sZ), and intensities im[voxel * C + c] / s_c."""
    D, H, W, C = I.shape
    W_, H_, Z_ = D, H, W
    kk, jj, ii = np.meshgrid(np.arange(Z_), np.arange(H_), np.arange(W_), indexing="ij")  # voxel order
    pos = lambda keys: np.stack([ii.reshape(-1).astype(F32) / F32(p[keys[0]]),  # noqa: E731
                                 jj.reshape(-1).astype(F32) / F32(p[keys[1]]),
                                 kk.reshape(-1).astype(F32) / F32(p[keys[2]])])
    gauss = pos(("PosRStd", "PosCStd", "PosZStd"))
    values = I.reshape(-1, C).astype(F32)
    mods = np.stack([values[:, c] / F32(p["BilateralModsStds"][c]) for c in range(C)])
    return gauss, np.concatenate([pos(("BilateralRStd", "BilateralCStd", "BilateralZStd")), mods])


def reference_3d(I, P, p, features):
    dcrf = _dcrf()
    L = P.shape[-1]
    d = dcrf.DenseCRF(int(np.prod(P.shape[:3])), L)
    d.setUnaryEnergy(energies(P))
    gauss, bilateral = features
    d.addPairwiseEnergy(np.ascontiguousarray(gauss, dtype=F32), compat=float(p["PosW"]))
    if bilateral is not None:
        d.addPairwiseEnergy(np.ascontiguousarray(bilateral, dtype=F32), compat=float(p["BilateralW"]))
    return np.array(d.inference(int(p["MaxIterations"]))).argmax(0).reshape(P.shape[:3]).astype(np.int8)


@pytest.mark.parametrize("shape,channels,labels", [((7, 12, 15), 1, 2), ((10, 9, 10), 1, 3), ((6, 11, 8), 2, 2),
                                                   ((5, 8, 9), 3, 4)])
def test_3d_simplecrf_order_equals_pydensecrf2(shape, channels, labels):
    I, P, _ = volume(shape, labels, channels, seed=sum(shape))
    p = dict(PARAM_3D, MaxIterations=5.0, PosRStd=3.0, PosCStd=2.0, PosZStd=1.5, BilateralRStd=4.0,
             BilateralCStd=3.0, BilateralZStd=2.5, ModalityNum=channels,
             BilateralModsStds=tuple(5.0 + k for k in range(channels)))
    lab = denseCRF3D.densecrf3d(I, P, p, simplecrf_order=True)
    assert isinstance(lab, np.ndarray) and lab.dtype == np.int8 and lab.shape == shape
    np.testing.assert_array_equal(lab, reference_3d(I, P, p, simplecrf_features(I, p)))


def test_3d_simplecrf_order_drops_the_bilateral_term_beyond_five_modalities():
    I, P, _ = volume((4, 6, 7), 2, 6, seed=3)
    p = dict(PARAM_3D, MaxIterations=3, ModalityNum=6, BilateralModsStds=(4.0,) * 6)
    with pytest.warns(UserWarning, match="no bilateral term for more than 5 modalities"):
        lab = denseCRF3D.densecrf3d(I, P, p, simplecrf_order=True)
    np.testing.assert_array_equal(lab, reference_3d(I, P, p, (simplecrf_features(I, p)[0], None)))
    default = denseCRF3D.densecrf3d(I, P, p)  # the correct model uses the six channels
    assert default.shape == lab.shape


# ----------------------------------------------------------------------------------------------------------
# 3-D, correct geometry (the default)


@pytest.mark.parametrize("shape,channels", [((7, 12, 15), 1), ((6, 10, 9), 2)])
def test_3d_default_is_dense_crf_3d(shape, channels):
    I, P, _ = volume(shape, 3, channels, seed=11)
    p = dict(PARAM_3D, MaxIterations=4, PosRStd=3.0, PosCStd=2.0, PosZStd=1.0, BilateralRStd=6.0, BilateralCStd=5.0,
             BilateralZStd=2.0, ModalityNum=channels, BilateralModsStds=tuple(4.0 * (k + 1) for k in range(channels)))
    lab = denseCRF3D.densecrf3d(I, P, p)
    q = dense_crf_3d(torch.from_numpy(energies(P)).view(1, 3, *shape), torch.from_numpy(I).permute(3, 0, 1, 2)[None],
                     gaussian_sigma=(1.0, 2.0, 3.0), bilateral_sigma=(2.0, 5.0, 6.0), gaussian_compat=2.0,
                     intensity_sigma=p["BilateralModsStds"], bilateral_compat=3.0, iterations=4)
    np.testing.assert_array_equal(lab, q[0].argmax(0).numpy().astype(np.int8))
    features = volume_features_numpy(np.moveaxis(I, -1, 0), 1.0, (1.0, 2.0, 3.0), (2.0, 5.0, 6.0),
                                     p["BilateralModsStds"])
    np.testing.assert_array_equal(lab, reference_3d(I, P, p, features))


def test_3d_orders_agree_on_a_cube_up_to_feature_order():
    """With D == W SimpleCRF's positions are right; the two modes then differ only in the features' order (which
    the lattice sees), so their labels agree on almost every voxel."""
    I, P, truth = volume((12, 12, 12), 2, 1, seed=5)
    a = denseCRF3D.densecrf3d(I, P, PARAM_3D)
    b = denseCRF3D.densecrf3d(I, P, PARAM_3D, simplecrf_order=True)
    assert (a == b).mean() > 0.99


def test_3d_scrambled_geometry_is_worse_when_d_differs_from_w():
    """Why the default is the correct geometry: on a slab (D << W) SimpleCRF's scrambled positions smooth across
    unrelated voxels."""
    I, P, truth = volume((6, 40, 40), 2, 1, seed=6)
    p = dict(PARAM_3D, MaxIterations=5)
    right = (denseCRF3D.densecrf3d(I, P, p) == truth).mean()
    scrambled = (denseCRF3D.densecrf3d(I, P, p, simplecrf_order=True) == truth).mean()
    assert right > scrambled and right > (P.argmax(-1) == truth).mean()


# ----------------------------------------------------------------------------------------------------------
# SimpleCRF's demos, re-enacted on images made here


def test_demo_densecrf_binary(tmp_path):
    """demo_densecrf1: an RGB image and a mask PNG; P from the mask's first two channels."""
    from PIL import Image

    rgb, _, truth = image_2d(7, L=2)
    Image.fromarray(rgb).save(tmp_path / "brain.png")
    mask = np.zeros(truth.shape + (3,), np.uint8)
    mask[..., 0] = np.where(truth == 1, 230, 25)  # a soft, imperfect mask
    mask[5:9, 5:20, 0] = 200
    Image.fromarray(mask).save(tmp_path / "brain_mask.png")

    I = Image.open(tmp_path / "brain.png")
    Iq = np.asarray(I)
    L = Image.open(tmp_path / "brain_mask.png")
    Lq = np.asarray(L, np.float32) / 255
    prob = Lq[:, :, :2]
    prob[:, :, 0] = 1.0 - prob[:, :, 0]
    w1, alpha, beta, w2, gamma, it = 10.0, 80, 13, 3.0, 3, 5.0
    param = (w1, alpha, beta, w2, gamma, it)
    lab = denseCRF.densecrf(Iq, prob, param)
    Image.fromarray(lab.astype(np.int16) * 255)  # demo: Image.fromarray(lab*255) (int8 * 255: NumPy 2 refuses)
    np.testing.assert_array_equal(lab, reference_2d(Iq, np.ascontiguousarray(prob), param))
    assert lab.dtype == np.int8 and set(np.unique(lab)) <= {0, 1}


def test_demo_densecrf_multiclass(tmp_path):
    """demo_densecrf2: a colour annotation turned into P (unknown: uniform), three classes, colourised result."""
    from PIL import Image

    I, _, truth = image_2d(8, H=30, W=40, L=3)
    color_list = [[0, 128, 0], [192, 128, 0], [64, 64, 0]]
    anno = np.array(color_list, np.uint8)[truth]
    anno[::3] = 0  # unannotated rows
    Image.fromarray(I).save(tmp_path / "im3.ppm")
    Image.fromarray(anno).save(tmp_path / "anno3.ppm")

    Iq = np.asarray(Image.open(tmp_path / "im3.ppm"), np.uint8)
    Lq = np.asarray(Image.open(tmp_path / "anno3.ppm"), np.float32)
    H, W, _ = Lq.shape
    C = len(color_list)
    prob = np.zeros([H, W, C], np.float32)
    for h in range(H):
        for w in range(W):
            ca = Lq[h, w, :]
            if sum(ca) == 0:
                prob[h, w, :] = 1.0 / C
            else:
                for c in range(C):
                    if all(ca[k] == color_list[c][k] for k in range(3)):
                        prob[h, w, c] = 1.0
                        break
    lab = denseCRF.densecrf(Iq, prob, (10.0, 80, 13, 3.0, 3, 5.0))
    out = np.zeros((H, W, 3), np.uint8)
    for h in range(H):
        for w in range(W):
            out[h, w, :] = np.asarray(color_list[lab[h, w]])
    Image.fromarray(out)
    np.testing.assert_array_equal(lab, reference_2d(Iq, prob, (10.0, 80, 13, 3.0, 3, 5.0)))
    assert (lab == truth).mean() > 0.95


@pytest.mark.parametrize("modalities", [1, 2])
def test_demo_densecrf3d(tmp_path, modalities):
    """demo_densecrf3d_1 / _2: NIfTI volumes, intensities to 0..255, P = [1 - p, p], SimpleCRF's parameter dict."""
    nibabel = pytest.importorskip("nibabel")
    v = synthetic_volume((20, 24, 16), 2, modalities, seed=9)
    for k in range(modalities):
        nibabel.save(nibabel.Nifti1Image(v.image[k].astype(np.float32) * 0.02 - 3.0, np.eye(4)),
                     str(tmp_path / f"img{k}.nii.gz"))
    nibabel.save(nibabel.Nifti1Image(v.probabilities[1], np.eye(4)), str(tmp_path / "init.nii.gz"))

    images = [nibabel.load(str(tmp_path / f"img{k}.nii.gz")).get_fdata() for k in range(modalities)]  # get_data()
    P = nibabel.load(str(tmp_path / "init.nii.gz")).get_fdata()
    I = np.asarray(images, np.float32)
    I = np.transpose(I, [1, 2, 3, 0])
    if modalities == 1:
        I = I / I.max() * 255
    else:
        I = (I + 3) / 6.0 * 255
        I[I < 0] = 0
        I[I > 255] = 255
    I = np.asarray(I, np.uint8)
    if modalities == 1:
        P = 0.5 + (P - 0.5) * 0.8
    P = np.asarray([1.0 - P, P], np.float32)
    P = np.transpose(P, [1, 2, 3, 0])
    dense_crf_param = {}
    dense_crf_param['MaxIterations'] = 2.0
    dense_crf_param['PosW'] = 2.0
    dense_crf_param['PosRStd'] = 5
    dense_crf_param['PosCStd'] = 5
    dense_crf_param['PosZStd'] = 5
    dense_crf_param['BilateralW'] = 3.0
    dense_crf_param['BilateralRStd'] = 5.0
    dense_crf_param['BilateralCStd'] = 5.0
    dense_crf_param['BilateralZStd'] = 5.0
    dense_crf_param['ModalityNum'] = modalities
    dense_crf_param['BilateralModsStds'] = (5.0,) * modalities
    lab = denseCRF3D.densecrf3d(I, P, dense_crf_param)
    nibabel.save(nibabel.Nifti1Image(lab, np.eye(4)), str(tmp_path / "seg_densecrf.nii.gz"))
    assert nibabel.load(str(tmp_path / "seg_densecrf.nii.gz")).get_data_dtype() == np.int8
    assert (lab == v.truth).mean() > (P.argmax(-1) == v.truth).mean()
    features = volume_features_numpy(np.moveaxis(I, -1, 0), 1.0, 5.0, 5.0, 5.0)
    np.testing.assert_array_equal(lab, reference_3d(I, P, dense_crf_param, features))


# ----------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("mutate,match", [
    (lambda I, P, p: (I.astype(np.float32), P, p), "I must be a uint8 array"),
    (lambda I, P, p: (I[..., 0], P, p), r"I must be 3-D \[H, W, 3\]"),
    (lambda I, P, p: (I[..., :2], P, p), r"I must be an RGB image \[H, W, 3\]"),
    (lambda I, P, p: (I, P[..., 0], p), r"P must be 3-D \[H, W, L\]"),
    (lambda I, P, p: (I, P[:-1], p), "must have the same height and width"),
    (lambda I, P, p: (I, np.full_like(P, np.nan), p), "P contains NaN"),
    (lambda I, P, p: (I, P.astype(np.complex64), p), "P must be a float32 array"),
    (lambda I, P, p: (I, P, p[:5]), "param must have 6 values"),
    (lambda I, P, p: (I, P, {"w1": 1}), "param must be a tuple"),
    (lambda I, P, p: (I, P, ("10",) + p[1:]), r"param\[0\] \(w1, the bilateral term's weight\) must be a number"),
    (lambda I, P, p: (I, P, p[:1] + (0,) + p[2:]), r"param\[1\] \(alpha, .*\) must be > 0"),
    (lambda I, P, p: (I, P, p[:2] + (float("nan"),) + p[3:]), r"param\[2\] \(beta"),
    (lambda I, P, p: (I, P, p[:4] + (1e-9,) + p[5:]), r"param\[4\] \(gamma\) = 1e-09 is too small"),
    (lambda I, P, p: (I, P, p[:5] + (-1,)), r"param\[5\] \(it, the number of iterations\) must be >= 0"),
])
def test_2d_errors(mutate, match):
    I, P, _ = image_2d(10, H=12, W=14)
    with pytest.raises(ValueError, match=match):
        denseCRF.densecrf(*mutate(I, P, PARAM_2D))


@pytest.mark.parametrize("mutate,match", [
    (lambda I, P, p: (I.astype(np.int16), P, p), "I must be a uint8 array"),
    (lambda I, P, p: (I[..., 0], P, p), r"I must be 4-D \[D, H, W, C\]"),
    (lambda I, P, p: (I, P[:, :-1], p), "same volume shape"),
    (lambda I, P, p: (I, -P, p), "P contains negative values"),
    (lambda I, P, p: (I, P * np.array([0, 1], F32) * (P[..., 1:] > 0.5), p), "P is 0 for every label"),
    (lambda I, P, p: (I, np.ones(P.shape[:3] + (129,), F32), p), "hold at most 128"),
    (lambda I, P, p: (I, P, [1, 2]), "param must be a dict"),
    (lambda I, P, p: (I, P, {k: v for k, v in p.items() if k != "PosRStd"}), "param is missing 'PosRStd'"),
    (lambda I, P, p: (I, P, dict({k: v for k, v in p.items() if k != "PosRStd"}, PosXStd=3)),
     "unknown keys: 'PosXStd'"),
    (lambda I, P, p: (I, P, dict(p, PosW="2")), r"param\['PosW'\] must be a number"),
    (lambda I, P, p: (I, P, dict(p, BilateralZStd=-5)), r"param\['BilateralZStd'\] must be > 0"),
    (lambda I, P, p: (I, P, dict(p, MaxIterations=-1)), r"param\['MaxIterations'\] must be >= 0"),
    (lambda I, P, p: (I, P, dict(p, ModalityNum=2)), r"param\['ModalityNum'\] is 2 but I has 1 channel"),
    (lambda I, P, p: (I, P, dict(p, BilateralModsStds=5.0)), r"param\['BilateralModsStds'\] must be a tuple"),
    (lambda I, P, p: (I, P, dict(p, BilateralModsStds=(5.0, 4.0))), "one value per channel"),
    (lambda I, P, p: (I, P, dict(p, BilateralModsStds=(0.0,))), r"param\['BilateralModsStds'\]\[0\] must be > 0"),
    (lambda I, P, p: (I, P, dict(p, PosZStd=1e-9)), "gaussian_sigma along axis D is too small.*PosZStd"),
])
def test_3d_errors(mutate, match):
    I, P, _ = volume((4, 5, 6), 2, 1, seed=12)
    with pytest.raises(ValueError, match=match):
        denseCRF3D.densecrf3d(*mutate(I, P, PARAM_3D))
    with pytest.raises(ValueError, match="simplecrf_order must be a bool"):
        denseCRF3D.densecrf3d(I, P, PARAM_3D, simplecrf_order="yes")
