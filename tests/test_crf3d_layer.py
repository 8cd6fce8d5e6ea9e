"""``deeplab_fast.nn.DenseCRF3d``: the volumetric dense CRF layer (MONAI's call convention) and its MONAI mode.

MONAI mode is checked against a pure-PyTorch transcription of ``monai.networks.blocks.CRF.forward`` (MONAI 1.x,
monai/networks/blocks/crf.py, written here from reading it), whose filter ``PHLFilter`` (the permutohedral
lattice of MONAI's compiled extension, normalised by its homogeneous coordinate) is supplied two ways:

- the op's own lattice filter normalised after filtering (``dense_crf_pairwise_energy`` with a Potts weight -1
  and NORMALIZE_AFTER): the equations (softmax of logits, the weights, update_factor, the compatibility matrix
  and its transpose) then agree to float rounding;
- brute-force dense Gaussian filtering ``sum_j exp(-|f_i - f_j|^2 / 2) q_j / sum_j exp(...)`` on tiny volumes,
  the filter both lattices approximate: the labels agree on almost every voxel.

The agreement with MONAI's own compiled CRF on a realistic volume is measured outside CI (docs/crf3d.md).
"""
import numpy as np
import pytest
import torch

from deeplab_fast.data import synthetic_volume
from deeplab_fast.nn import DenseCRF3d
from deeplab_fast.ops import NORMALIZE_AFTER, dense_crf_3d, dense_crf_pairwise_energy

from helpers import seeded


# ----------------------------------------------------------------------------------------------------------
# The transcription of MONAI's CRF.forward.


def _coordinates(reference: torch.Tensor) -> torch.Tensor:
    """MONAI's _create_coordinate_tensor: the index grids of the spatial axes, [B, dims, *spatial]."""
    axes = [torch.arange(reference.size(i)) for i in range(2, reference.dim())]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij")).to(reference.dtype)
    return torch.stack(reference.size(0) * [coords], dim=0)


def monai_crf(logits, reference, phl_filter, iterations=5, bilateral_weight=1.0, gaussian_weight=1.0,
              bilateral_spatial_sigma=5.0, bilateral_color_sigma=0.5, gaussian_spatial_sigma=5.0,
              update_factor=3.0, compatibility_matrix=None):
    spatial = _coordinates(reference)
    bilateral_features = torch.cat([spatial / bilateral_spatial_sigma, reference / bilateral_color_sigma], dim=1)
    gaussian_features = spatial / gaussian_spatial_sigma
    output = torch.softmax(logits, dim=1)
    for _ in range(iterations):
        bilateral_output = phl_filter(output, bilateral_features)
        gaussian_output = phl_filter(output, gaussian_features)
        combined = bilateral_weight * bilateral_output + gaussian_weight * gaussian_output
        if compatibility_matrix is not None:
            flat = combined.flatten(start_dim=2).permute(0, 2, 1)
            flat = torch.matmul(flat, compatibility_matrix)
            combined = flat.permute(0, 2, 1).reshape(combined.shape)
        output = torch.softmax(logits + update_factor * combined, dim=1)
    return output


def brute_force_filter(x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Exact normalised Gaussian filtering: out_i = sum_j k_ij x_j / sum_j k_ij, k_ij = exp(-|f_i - f_j|^2 / 2)."""
    xf, ff = x.flatten(2).double(), features.flatten(2).double()
    k = torch.exp(-0.5 * ((ff[:, :, :, None] - ff[:, :, None, :]) ** 2).sum(1))  # [B, N, N]
    out = torch.einsum("bij,blj->bli", k, xf) / k.sum(2)[:, None, :]
    return out.to(x.dtype).reshape(x.shape)


def lattice_filter(x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The op's permutohedral filter, normalised after filtering (K x / K 1)."""
    b, l = x.shape[:2]
    out = dense_crf_pairwise_energy(x.reshape(b, l, -1).contiguous(), [features.reshape(b, features.shape[1], -1)],
                                    [-1.0], [NORMALIZE_AFTER])
    return out.reshape(x.shape)


def test_lattice_filter_approximates_the_gaussian():
    """The lattice filter (ours, as MONAI's) approximates the exact normalised Gaussian filter."""
    g = seeded(0)
    x = torch.softmax(torch.randn(1, 3, 6, 7, 8, generator=g) * 2, 1)
    feats = torch.cat([_coordinates(x) / 2.0, torch.rand(1, 1, 6, 7, 8, generator=g) * 2], 1)
    diff = (lattice_filter(x, feats) - brute_force_filter(x, feats)).abs().max().item()
    assert 0 < diff < 0.1, diff


def small_problem(shape=(6, 9, 8), labels=3, channels=1, seed=1):
    """Logits and a float reference as MONAI's users pass them (reference scaled to about [0, 1])."""
    v = synthetic_volume(shape, labels, channels, seed=seed)
    logits = torch.from_numpy(np.log(np.clip(v.probabilities, 1e-5, 1)))[None]
    reference = torch.from_numpy(v.image.astype(np.float32) / 255.0)[None]
    return logits.contiguous(), reference.contiguous()


MONAI_CASES = {
    "defaults": dict(),
    "weights": dict(iterations=3, bilateral_weight=0.7, gaussian_weight=1.6, bilateral_spatial_sigma=3.0,
                    bilateral_color_sigma=0.2, gaussian_spatial_sigma=2.0, update_factor=1.5),
    "symmetric matrix": dict(compatibility_matrix=torch.tensor([[1.0, -0.4, 0.2], [-0.4, 1.0, 0.3],
                                                                [0.2, 0.3, 0.8]])),
    "non-symmetric matrix": dict(iterations=4, compatibility_matrix=torch.tensor([[1.0, -0.6, 0.1], [0.2, 0.9, -0.5],
                                                                                  [0.4, 0.0, 1.2]])),
}


@pytest.mark.parametrize("case", list(MONAI_CASES))
def test_monai_mode_equals_the_transcription_on_the_lattice(case):
    logits, reference = small_problem()
    kw = MONAI_CASES[case]
    ours = DenseCRF3d.monai(**kw)(logits, reference)
    ref = monai_crf(logits, reference, lattice_filter, **kw)
    assert ours.shape == logits.shape and ours.dtype == torch.float32
    diff = (ours - ref).abs().max().item()
    assert diff < 2e-5, diff
    assert torch.equal(ours.argmax(1), ref.argmax(1))


@pytest.mark.parametrize("case", list(MONAI_CASES))
def test_monai_mode_against_brute_force_filtering(case):
    """Against MONAI's model with the exact Gaussian filter: the lattice's approximation moves Q a little; the
    labels agree on at least 99% of the voxels (measured: 100% on three cases, 99.8% on one, Q within 0.03; the CRF
    changes 28-37% of the initial labels here)."""
    logits, reference = small_problem(shape=(5, 10, 9), seed=2)
    kw = MONAI_CASES[case]
    ours = DenseCRF3d.monai(**kw)(logits, reference)
    ref = monai_crf(logits, reference, brute_force_filter, **kw)
    agree = (ours.argmax(1) == ref.argmax(1)).double().mean().item()
    assert agree >= 0.99, agree
    assert (ours - ref).abs().max().item() < 0.05
    assert (ours.argmax(1) != logits.argmax(1)).double().mean() > 0.2  # the CRF did something


def test_monai_loop_and_op_agree_for_symmetric_matrices():
    """The fallback loop (non-symmetric M) and the op path compute the same model: forced onto a symmetric M they
    agree to float rounding (this pins the matrix's transpose and sign in both)."""
    logits, reference = small_problem(seed=3)
    layer = DenseCRF3d.monai(compatibility_matrix=torch.tensor([[1.0, 0.3, -0.2], [0.3, 0.5, 0.1],
                                                                [-0.2, 0.1, 1.1]]))
    with torch.no_grad():
        model = layer._model(3, logits.device)
        loop = layer._monai_loop(logits, reference, layer.spacing, model.pop("matrix"), model)
    assert (layer(logits, reference) - loop).abs().max().item() < 2e-5


def test_monai_mode_attributes_and_repr():
    m = torch.eye(2)
    layer = DenseCRF3d.monai(4, 0.5, 2.0, 6.0, 0.3, 4.0, 2.5, m)  # MONAI's positional order
    assert (layer.iterations, layer.bilateral_weight, layer.gaussian_weight, layer.bilateral_spatial_sigma,
            layer.bilateral_color_sigma, layer.gaussian_spatial_sigma, layer.update_factor) == \
        (4, 0.5, 2.0, 6.0, 0.3, 4.0, 2.5)
    assert layer.compatibility_matrix is m and layer.mode == "monai" and not list(layer.parameters())
    assert "mode='monai'" in repr(layer) and "compatibility_matrix=matrix[2, 2]" in repr(layer)


def test_monai_mode_has_a_gradient_when_requested():
    """MONAI's filter has no backward; the op's mode has the exact one (symmetric or no matrix)."""
    logits, reference = small_problem(shape=(4, 6, 5), seed=4)
    logits = logits.double().requires_grad_()
    f = lambda x: dense_crf_3d(-x, reference, gaussian_sigma=5.0, bilateral_sigma=5.0,  # noqa: E731
                               intensity_sigma=0.5, gaussian_compat=3.0, bilateral_compat=3.0, iterations=2,
                               normalization=NORMALIZE_AFTER)
    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-6)
    layer = DenseCRF3d.monai(iterations=2)
    with torch.no_grad():
        assert (layer(logits.float(), reference) - f(logits).float()).abs().max() < 1e-5


def test_monai_mode_errors():
    logits, reference = small_problem(shape=(3, 4, 5), seed=5)
    with pytest.raises(ValueError, match="compatibility_matrix must be a float tensor"):
        DenseCRF3d.monai(compatibility_matrix=torch.ones(3, 2))
    with pytest.raises(ValueError, match="compatibility_matrix must be finite"):
        DenseCRF3d.monai(compatibility_matrix=torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match="update_factor must be a finite number"):
        DenseCRF3d.monai(update_factor=float("inf"))
    with pytest.raises(ValueError, match="DenseCRF3d.monai: bilateral_spatial_sigma must be a finite number > 0"):
        DenseCRF3d.monai(bilateral_spatial_sigma=0.0)
    with pytest.raises(ValueError, match="bilateral_color_sigma must be a number or a sequence"):
        DenseCRF3d.monai(bilateral_color_sigma="0.5")
    with pytest.raises(ValueError, match=r"compatibility_matrix is \(2, 2\) but the logits have 3 classes"):
        DenseCRF3d.monai(compatibility_matrix=torch.eye(2))(logits, reference)
    asym = DenseCRF3d.monai(compatibility_matrix=torch.tensor([[1.0, 0.5, 0], [0, 1, 0], [0, 0, 1.0]]))
    model = asym._model(3, logits.device)
    with pytest.raises(NotImplementedError, match="non-symmetric compatibility_matrix has no gradient"):
        asym._monai_loop(logits.requires_grad_(), reference, 1.0, model.pop("matrix"), model)


def test_monai_attributes_changed_after_construction_take_effect():
    """As with MONAI's module, whose forward reads its attributes."""
    logits, reference = small_problem(shape=(4, 6, 5), seed=10)
    layer = DenseCRF3d.monai()
    layer.update_factor, layer.gaussian_spatial_sigma, layer.iterations = 1.0, 2.0, 3
    fresh = DenseCRF3d.monai(iterations=3, gaussian_spatial_sigma=2.0, update_factor=1.0)
    assert torch.equal(layer(logits, reference), fresh(logits, reference))
    assert not torch.equal(layer(logits, reference), DenseCRF3d.monai()(logits, reference))


# ----------------------------------------------------------------------------------------------------------
# The native mode.


def test_native_mode_is_dense_crf_3d_of_the_log_softmax():
    logits, reference = small_problem(seed=6)
    reference = (reference * 255).round().to(torch.uint8)
    layer = DenseCRF3d(iterations=4, gaussian_sigma=(2.0, 3.0, 3.0), spacing=(2.5, 1.0, 1.0), intensity_sigma=4.0)
    out = layer(logits, reference)
    ref = dense_crf_3d(-torch.log_softmax(logits, 1), reference, iterations=4, gaussian_sigma=(2.0, 3.0, 3.0),
                       spacing=(2.5, 1.0, 1.0), intensity_sigma=4.0)
    assert torch.equal(out, ref)
    assert torch.equal(layer(logits, reference, spacing=1.0),
                       dense_crf_3d(-torch.log_softmax(logits, 1), reference, iterations=4,
                                    gaussian_sigma=(2.0, 3.0, 3.0), intensity_sigma=4.0))
    assert not out.requires_grad and not list(layer.parameters())
    assert repr(layer).startswith("DenseCRF3d(iterations=4, gaussian_sigma=(2.0, 3.0, 3.0)")


@pytest.mark.parametrize("compat", ["potts", "matrix"])
def test_trainable(compat):
    logits, reference = small_problem(shape=(4, 6, 6), seed=7)
    layer = DenseCRF3d(iterations=3, trainable=True, compat=compat, num_classes=3)
    names = sorted(n for n, _ in layer.named_parameters())
    assert names == ["bilateral_compat", "gaussian_compat"]
    frozen = DenseCRF3d(iterations=3)
    with torch.no_grad():
        assert torch.allclose(layer(logits, reference), frozen(logits, reference), atol=1e-6)
    logits = logits.requires_grad_()
    loss = -torch.log(layer(logits, reference)[:, 1] + 1e-6).mean()
    loss.backward()
    assert logits.grad.abs().max() > 0
    for p in layer.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0
    if compat == "matrix":
        assert torch.allclose(layer.gaussian_compat.grad, layer.gaussian_compat.grad.t())
    assert set(layer.state_dict()) == {"gaussian_compat", "bilateral_compat"}


def test_trainable_under_torch_compile():
    logits, reference = small_problem(shape=(4, 6, 6), seed=8)
    layer = DenseCRF3d(iterations=2, trainable="bilateral_compat")
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(logits.requires_grad_(), reference)
    out[:, 0].sum().backward()
    assert layer.bilateral_compat.grad is not None
    assert torch.equal(out.detach(), layer(logits, reference).detach())


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(trainable="gaussian_sigma"), NotImplementedError, "learning gaussian_sigma"),
    (dict(trainable="spacing"), NotImplementedError, "learning spacing"),
    (dict(trainable="nonsense"), ValueError, "trainable names must be among"),
    (dict(compat="matrix"), ValueError, "needs trainable=True"),
    (dict(trainable=True, compat="matrix"), ValueError, "needs num_classes"),
    (dict(compat="full"), ValueError, "compat must be one of"),
    (dict(gaussian_sigma=(1.0, 2.0)), ValueError, "gaussian_sigma must be a number or a sequence of 3"),
    (dict(intensity_sigma=-1.0), ValueError, "intensity_sigma must be a finite number > 0"),
    (dict(intensity_sigma="3"), ValueError, "intensity_sigma must be a number or a sequence"),
    (dict(spacing=(1.0, 0.0, 1.0)), ValueError, r"spacing\[1\]"),
    (dict(iterations=-2), ValueError, "iterations"),
    (dict(normalization=5), ValueError, "normalization"),
    (dict(trainable=True, gaussian_compat=float("nan")), ValueError, "initial gaussian_compat"),
])
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DenseCRF3d(**kwargs)


def test_forward_errors():
    logits, reference = small_problem(shape=(3, 4, 5), seed=9)
    layer = DenseCRF3d()
    with pytest.raises(ValueError, match="expects tensors"):
        layer(logits.numpy(), reference)
    with pytest.raises(ValueError, match="expects 5-D logits"):
        layer(logits[0], reference)
    with pytest.raises(ValueError, match="logits must be floating point"):
        layer(logits.long(), reference)
    with pytest.raises(ValueError, match="same batch size and volume shape"):
        layer(logits[..., :4], reference)
    with pytest.raises(ValueError, match="intensity_sigma must be a number or a sequence of 1"):
        DenseCRF3d(intensity_sigma=(1.0, 2.0))(logits, reference)
    with pytest.raises(ValueError, match="the layer's compatibility matrices 4"):
        DenseCRF3d(trainable=True, compat="matrix", num_classes=4)(logits, reference)
