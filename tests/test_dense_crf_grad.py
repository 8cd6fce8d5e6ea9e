"""The gradient of the dense CRF (issue: a trainable dense CRF, CRF-as-RNN), on the CPU and on CUDA.

- Against the reference, Krähenbühl's own ``DenseCRF::gradient`` (densecrf 2.2 from the pydensecrf2 sdist, built by
  tests/krahenbuhl_reference.py), on real photos: dL/dunary and dL/dcompat for matrix, diagonal and Potts
  compatibilities, within 1e-3 of the largest entry; our forward is bit-exact with his.
- ``torch.autograd.gradcheck`` in float64 (the CPU's float64 path) on tiny inputs: every normalisation, q_init,
  0 to 3 iterations, the image op and the generic op, with and without checkpointing.
- The history the forward keeps is the marginals each iteration starts from; checkpointing gives the same
  gradients bit for bit; the backward is deterministic and independent of the thread count; a batch equals its
  images one by one.
- torch.compile(fullgraph=True) with a backward; the errors (opcheck with gradients: tests/test_dense_crf.py,
  on the samples of tests/samples.py).
CUDA cases skip without a GPU; on a GPU they compare with the CPU op.
"""
import numpy as np
import pytest
import torch

from deeplab_fast.ops import dense_crf, dense_crf_features
from deeplab_fast.ops.dense_crf import label_stride

import krahenbuhl_reference as kr
from helpers import cpu_and_cuda, needs_cuda, seeded

ASSETS = __import__("deeplab_fast").__path__[0] + "/assets"


def photo_problem(L: int, seed: int, size=None):
    """A real photo (the bundled pydensecrf example, optionally resized), its DenseCRF2D features, and a unary from
    a coarse, noisy segmentation: Tensor unary [1, L, H, W], image [1, 3, H, W] uint8."""
    from PIL import Image

    img = Image.open(f"{ASSETS}/example.png").convert("RGB")
    if size is not None:
        img = img.resize(size, Image.BILINEAR)
    rgb = np.asarray(img)
    h, w, _ = rgb.shape
    g = seeded(seed)
    # Coarse logits: a few smooth random fields at 1/8 resolution, upsampled, plus pixel noise.
    low = torch.randn(1, L, max(1, h // 8), max(1, w // 8), generator=g) * 2.5
    logits = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    logits = logits + 0.5 * torch.randn(1, L, h, w, generator=g)
    unary = -torch.log_softmax(logits, 1)
    image = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].contiguous()
    return unary.contiguous(), image


def image_features(image, gaussian_sxy=3.0, bilateral_sxy=80.0, bilateral_srgb=13.0):
    return torch.ops.deeplab_fast.dense_crf_image_features(image, gaussian_sxy, bilateral_sxy, bilateral_srgb)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ----------------------------------------------------------------------------------------------------------
# Krähenbühl's DenseCRF::gradient


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("case", ["matrix", "diagonal+potts", "normalizations"])
def test_gradients_equal_krahenbuhl_on_a_photo(case, device):
    kr.require_reference()
    L, iterations = 5, 5
    unary, image = photo_problem(L, seed=1)
    gaussian, bilateral = image_features(image)
    _, _, H, W = unary.shape
    N = H * W
    g = seeded(2)
    if case == "matrix":  # CRF-as-RNN's learned compatibilities: near -w I, off-diagonal terms
        compat = [-3.0 * torch.eye(L) + 0.5 * torch.randn(L, L, generator=g),
                  -10.0 * torch.eye(L) + torch.randn(L, L, generator=g)]
        norms = [3, 3]
    elif case == "diagonal+potts":
        compat = [-(1.0 + torch.rand(L, generator=g) * 4), torch.tensor(10.0)]
        norms = [3, 3]
    else:
        compat = [torch.tensor(3.0), -5.0 * torch.eye(L) + 0.5 * torch.randn(L, L, generator=g)]
        norms = [1, 2]
    feats = [gaussian, bilateral]
    grad_out = torch.randn(1, L, N, generator=g)

    ref = kr.krahenbuhl_gradient(
        unary.reshape(L, N).numpy(),
        [{"features": f[0].numpy(), "compat": (c.item() if c.dim() == 0 else c.numpy()), "normalization": n}
         for f, c, n in zip(feats, compat, norms)],
        iterations, grad_out[0].numpy())

    u = unary.reshape(1, L, N).to(device).requires_grad_(True)
    cs = [c.to(device).requires_grad_(True) for c in compat]
    q = dense_crf_features(u, [f.to(device) for f in feats], cs, norms, iterations=iterations)
    (q * grad_out.to(device)).sum().backward()

    if device == "cpu" and all(c.dim() < 2 for c in compat):  # Potts and diagonal: his forward, bit for bit
        assert np.array_equal(q.detach()[0].numpy(), ref["q"])
    else:  # a matrix product sums in Eigen's GEMM order there; the parity bar of the forward
        assert np.abs(q.detach()[0].cpu().numpy() - ref["q"]).max() < 1e-4
    assert rel_err(u.grad[0].cpu(), ref["unary_grad"]) < 1e-3
    for k, c in enumerate(cs):
        assert c.grad.shape == c.shape
        assert rel_err(c.grad.cpu(), ref["compat_grad"][k]) < 1e-3, k
        if c.dim() == 2:
            torch.testing.assert_close(c.grad, c.grad.t(), rtol=0, atol=0)  # the op symmetrises the matrix


def test_gradients_equal_krahenbuhl_21_labels_deeplab_kernels():
    """21 labels (VOC), DeepLab-v2's CRF kernels, matrix compatibilities for both terms, on a resized photo."""
    kr.require_reference()
    L, iterations = 21, 10
    unary, image = photo_problem(L, seed=3, size=(160, 120))
    gaussian, bilateral = image_features(image, 1.0, 67.0, 3.0)
    N = unary.shape[2] * unary.shape[3]
    g = seeded(4)
    compat = [-3.0 * torch.eye(L) + 0.3 * torch.randn(L, L, generator=g),
              -4.0 * torch.eye(L) + 0.3 * torch.randn(L, L, generator=g)]
    grad_out = torch.randn(1, L, N, generator=g)
    ref = kr.krahenbuhl_gradient(unary.reshape(L, N).numpy(),
                                 [{"features": f[0].numpy(), "compat": c.numpy()} for f, c in
                                  zip((gaussian, bilateral), compat)], iterations, grad_out[0].numpy())
    u = unary.reshape(1, L, N).clone().requires_grad_(True)
    cs = [c.clone().requires_grad_(True) for c in compat]
    q = dense_crf_features(u, [gaussian, bilateral], cs, iterations=iterations)
    (q * grad_out).sum().backward()
    assert np.abs(q.detach()[0].numpy() - ref["q"]).max() < 1e-4
    assert rel_err(u.grad[0], ref["unary_grad"]) < 1e-3
    for k in range(2):
        assert rel_err(cs[k].grad, ref["compat_grad"][k]) < 1e-3


# ----------------------------------------------------------------------------------------------------------
# gradcheck in float64


def tiny(B=2, L=3, H=3, W=4, seed=0):
    g = seeded(seed)
    unary = -torch.log_softmax(torch.randn(B, L, H, W, generator=g, dtype=torch.float64), 1)
    image = torch.randint(0, 256, (B, 3, H, W), generator=g, dtype=torch.uint8)
    return unary.requires_grad_(True), image


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("iterations", [0, 1, 3])
def test_gradcheck_image_op(iterations, checkpoint):
    unary, image = tiny()
    L = unary.shape[1]
    g = seeded(1)
    potts = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    matrix = torch.randn(L, L, generator=g, dtype=torch.float64).requires_grad_(True)

    def f(u, w, m):
        return dense_crf(u, image, iterations=iterations, gaussian_compat=w, bilateral_compat=m, bilateral_sxy=5.0,
                         checkpoint=checkpoint)

    assert torch.autograd.gradcheck(f, (unary, potts, matrix))


@pytest.mark.parametrize("norms", [(0, 1), (2, 3), (3, 0)])
def test_gradcheck_features_op(norms):
    B, L, N = 2, 3, 12
    g = seeded(5)
    unary = torch.randn(B, L, N, generator=g, dtype=torch.float64).requires_grad_(True)
    feats = [torch.randn(B, 2, N, generator=g, dtype=torch.float64), torch.randn(B, 3, N, generator=g)]
    q_init = torch.softmax(torch.randn(B, L, N, generator=g, dtype=torch.float64), 1).requires_grad_(True)
    matrix = torch.randn(L, L, generator=g, dtype=torch.float64).requires_grad_(True)
    diagonal = torch.randn(L, generator=g, dtype=torch.float64).requires_grad_(True)

    def f(u, qi, m, d):
        return dense_crf_features(u, feats, [m, d], list(norms), iterations=3, q_init=qi)

    assert torch.autograd.gradcheck(f, (unary, q_init, matrix, diagonal))


def test_gradcheck_q_init_without_iterations():
    unary, _ = tiny()
    u = unary.reshape(2, 3, 12).detach().requires_grad_(True)
    q_init = torch.softmax(torch.randn(2, 3, 12, dtype=torch.float64), 1).requires_grad_(True)
    feats = [torch.randn(2, 2, 12)]
    assert torch.autograd.gradcheck(lambda u, q: dense_crf_features(u, feats, [1.0], iterations=0, q_init=q),
                                     (u, q_init))


def test_float64_forward_agrees_with_float32():
    unary, image = photo_problem(4, seed=6, size=(64, 48))
    q32 = dense_crf(unary, image, iterations=5)
    q64 = dense_crf(unary.double(), image, iterations=5)
    assert q64.dtype == torch.float64
    torch.testing.assert_close(q64.float(), q32, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# History, checkpointing, determinism, batching


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_history_holds_the_marginals_each_iteration_starts_from(device):
    unary, image = photo_problem(5, seed=7, size=(48, 40))
    unary, image = unary.to(device), image.to(device)
    B, L, H, W = unary.shape
    gaussian, bilateral = image_features(image)
    args = (unary.reshape(B, L, H * W), [gaussian, bilateral], [torch.tensor(3.0), torch.tensor(10.0)], [3, 3])
    q, history = torch.ops.deeplab_fast.dense_crf_features_with_history(*args, 4, None)
    S = label_stride(L, device)
    assert history.shape == (B, 4, H * W, S)
    assert torch.equal(q, torch.ops.deeplab_fast.dense_crf_features(*args, 4, None))
    for t in range(4):
        q_t = torch.ops.deeplab_fast.dense_crf_features(*args, t, None)
        assert torch.equal(history[:, t, :, :L], q_t.transpose(1, 2)), t
        assert (history[:, t, :, L:] == 0).all()


def grads(device, checkpoint=False, batch=2, threads=None, L=5):
    unary, image = photo_problem(L, seed=8, size=(56, 40))
    unary = unary.expand(batch, -1, -1, -1).clone()
    unary[1:] = unary[1:].flip(-1)
    image = image.expand(batch, -1, -1, -1).clone()
    unary, image = unary.to(device).requires_grad_(True), image.to(device)
    g = seeded(9)
    compat = [(-3.0 * torch.eye(L) + 0.2 * torch.randn(L, L, generator=g)).to(device).requires_grad_(True),
              torch.tensor(10.0, device=device, requires_grad=True)]
    grad_out = torch.randn(unary.shape, generator=g).to(device)
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        q = dense_crf(unary, image, gaussian_compat=compat[0], bilateral_compat=compat[1], iterations=5,
                      checkpoint=checkpoint)
        (q * grad_out).sum().backward()
    finally:
        torch.set_num_threads(old)
    return unary.grad, compat[0].grad, compat[1].grad


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_checkpointing_gives_the_same_gradients_bit_for_bit(device):
    for a, b in zip(grads(device), grads(device, checkpoint=True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_backward_is_deterministic(device):
    for a, b in zip(grads(device), grads(device)):
        assert torch.equal(a, b)


def test_backward_is_independent_of_the_thread_count():
    for a, b in zip(grads("cpu", threads=1), grads("cpu", threads=2)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_batch_equals_single_images(device):
    """Each image's unary gradient equals its single call's bit for bit; the compat gradients are their sum."""
    batched = grads(device, batch=3)
    unary, image = photo_problem(5, seed=8, size=(56, 40))
    L = 5
    g = seeded(9)  # as grads(): the matrix, then the output gradient
    compat0 = -3.0 * torch.eye(L) + 0.2 * torch.randn(L, L, generator=g)
    grad_out = torch.randn((3, L, 40, 56), generator=g)
    total0, total1 = torch.zeros(L, L, dtype=torch.float64), 0.0
    for b in range(3):
        u = (unary.flip(-1) if b > 0 else unary).to(device).clone().requires_grad_(True)
        c0 = compat0.clone().to(device).requires_grad_(True)
        c1 = torch.tensor(10.0, device=device, requires_grad=True)
        q = dense_crf(u, image.to(device), gaussian_compat=c0, bilateral_compat=c1, iterations=5)
        (q * grad_out[b:b + 1].to(device)).sum().backward()
        assert torch.equal(u.grad[0], batched[0][b]), b
        total0 += c0.grad.double().cpu()
        total1 += c1.grad.item()
    torch.testing.assert_close(batched[1].double().cpu(), total0, rtol=1e-5, atol=1e-5)
    assert abs(batched[2].item() - total1) <= 1e-5 * abs(total1) + 1e-6


@needs_cuda
def test_cuda_gradients_match_the_cpu():
    cpu, cuda = grads("cpu"), grads("cuda")
    for a, b in zip(cpu, cuda):
        assert rel_err(b.cpu(), a) < 1e-3


# ----------------------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_compile_fullgraph_with_backward(device):
    unary, image = photo_problem(4, seed=11, size=(40, 32))
    unary, image = unary.to(device), image.to(device)
    weight = torch.tensor(3.0, device=device)

    def step(u, w):
        q = dense_crf(u, image, iterations=3, gaussian_compat=w, bilateral_compat=w * 3)
        return (q * torch.arange(q.shape[1], device=q.device).view(1, -1, 1, 1)).sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        u, w = unary.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = fn(u, w)
        loss.backward()
        results.append((loss.detach(), u.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# Errors


def test_feature_gradients_raise_naming_the_argument():
    B, L, N = 1, 3, 20
    feats = [torch.randn(B, 2, N, requires_grad=True)]
    q = dense_crf_features(torch.randn(B, L, N, requires_grad=True), feats, [1.0])
    with pytest.raises(NotImplementedError, match=r"features\[0\]"):
        q.sum().backward()


def test_integer_image_is_fine_and_unary_only_gradient():
    unary, image = photo_problem(3, seed=12, size=(24, 16))
    unary.requires_grad_(True)
    dense_crf(unary, image, iterations=2).sum().backward()
    assert unary.grad is not None and torch.isfinite(unary.grad).all()


def test_backward_op_checks_its_arguments():
    B, L, N = 1, 3, 20
    unary = torch.randn(B, L, N)
    feats = [torch.randn(B, 2, N)]
    q, history = torch.ops.deeplab_fast.dense_crf_features_with_history(unary, feats, [torch.tensor(1.0)], [3], 2,
                                                                         None)
    op = torch.ops.deeplab_fast.dense_crf_features_backward
    with pytest.raises(ValueError, match="history must be"):
        op(torch.ones_like(q), q, history[:, :1], unary, feats, [torch.tensor(1.0)], [3], 2, None, [True])
    with pytest.raises(ValueError, match="grad_q must match"):
        op(torch.ones(B, L, N + 1), q, history, unary, feats, [torch.tensor(1.0)], [3], 2, None, [True])
    with pytest.raises(ValueError, match="compat_grad needs one flag per term"):
        op(torch.ones_like(q), q, history, unary, feats, [torch.tensor(1.0)], [3], 2, None, [True, False])


def test_second_derivatives_are_refused_clearly():
    unary, image = tiny()
    q = dense_crf(unary, image, iterations=1)
    (g,) = torch.autograd.grad(q[:, 0].sum(), unary, create_graph=True)
    with pytest.raises(NotImplementedError, match="second derivatives"):
        g.sum().backward()
