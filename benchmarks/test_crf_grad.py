"""Dense CRF training cost: forward + backward against forward alone, ours vs a ConvCRF-style peer (issue 15).

CPU cases. Input: a real 512x512 photo (scikit-image's ``astronaut``), 21 labels, a DeepLab-like unary (smooth
logits at 1/8 resolution, upsampled, as test_crf_fps.py makes it), 10 mean-field iterations, the default kernels
(Gaussian sxy 3, Potts 3; bilateral sxy 80, srgb 13, Potts 10), lattice / kernel construction included in every
call. The unary and both compatibilities require grad; the compatibilities are Potts scalars (0-d tensors) or,
in the ``matrix`` rows, [L, L] matrices (the Potts matrix -w I plus a random symmetric perturbation of 10% of w).
The backward is the vector-Jacobian product with a fixed random upstream gradient (``torch.autograd.grad``).
Threads: 1 and 2 (``torch.set_num_threads``). Rows, per compatibility kind and thread count:

- deeplab_fast forward (no grad) and the ConvCRF-style peer's forward (no grad);
- deeplab_fast forward + backward, default (the forward keeps every iteration's marginals);
- deeplab_fast forward + backward with ``checkpoint=True`` (the backward recomputes the iterations);
- the peer's forward + backward (plain autograd).

The peer (:func:`convcrf`) is written from Teichmann & Cipolla, "Convolutional CRFs for Semantic Segmentation"
(BMVC 2019), with the reference code's default configuration: the Gaussian kernels truncated to a k x k window,
**k = 11**, message passing on a grid **downsampled 4x** (ConvCRF's ``blur = 4``: the marginals and the features
are average-pooled to 128x128, the messages upsampled back bilinearly), both kernels merged into one when the
compatibilities are Potts (ConvCRF's ``merge``), the same mean-field update and iterations as ours. Differences
from the reference code, for a like-for-like comparison: the kernels are normalised symmetrically
(``1/sqrt(K 1)`` on both sides, as pydensecrf's NORMALIZE_SYMMETRIC, so that the compatibilities mean what they
mean for ours; ConvCRF's default is no normalisation with learnt weights), and the windows are evaluated with
shifted slices (one fused multiply-add per window offset), which on the CPU was faster and lighter than
ConvCRF's ``F.unfold`` (im2col) formulation (:func:`convcrf` ``mode="unfold"``, which materialises
L x k^2 x N values per iteration and keeps each for the backward; not timed here). Without the 4x downsampling
a k = 11 window would reach 5 pixels, 0.06 bilateral standard deviations: the truncation is the model's
approximation, not ours (the peer's marginals differ from ours; the rows record by how much).

Timing: wall clock, pytest-benchmark, after warm-up calls (ours 2, the peer 1), nine calls per row (the peer's
forward + backward five). ``backward / forward`` = (forward + backward median - forward median) / forward
median, with the forward timed without grad; target (issue 15): <= 2 for ours (the default, history-keeping
backward; ``checkpoint=True`` recomputes the forward inside its backward, so its ratio is reported untargeted). Since the rows are timed one
after another, a change in the machine's load between them skews that ratio; each forward + backward row
therefore also times interleaved pairs (a forward without grad, then a forward + backward; five pairs for ours,
three for the peer) and records the same ratio from their medians as ``paired_backward_over_forward``. Each CPU
row also records the machine's 1-minute load average when it finished (``load_average_1min``; about 1 or 2 is
this run alone on 2 cores).

Peak memory (CPU): each row is run once more in a fresh Python process that imports the same modules, builds the
same input, makes one call of the same implementation on a 16x16 input (so that lazy initialisation, thread
pools and the like are not counted), then records its resident set size, resets the kernel's high-water mark
(``echo 5 > /proc/self/clear_refs``), makes the call and reads ``VmHWM`` from ``/proc/self/status``: the peak
is the high-water mark minus the resident size before the call (the call's own working memory: the output, the
autograd graph or history, the gradients, everything freed on the way). For forward + backward rows it also
records the resident size after the forward (before the backward) minus before: the memory held between
forward and backward. Where ``clear_refs`` cannot be written, the peak is ``ru_maxrss`` of the process minus
``ru_maxrss`` of a baseline process that did everything but the call (``memory_method`` in the JSON says
which).

GPU cases (``-k cuda``; they skip without CUDA): the same rows on the GPU, inputs already there, timed with CUDA
events after warm-up calls; peak memory is ``torch.cuda.max_memory_allocated`` during one call minus
``torch.cuda.memory_allocated`` before it. Ours has no CUDA backward yet: its forward + backward rows skip when
``dense_crf_features_backward`` has no CUDA kernel, saying so.

Headline run (``pytest benchmarks/``): the Potts rows at 2 threads; ``--full`` adds the matrix rows, 1 thread and
the correctness checks below.

Correctness (the smoke run, ``--benchmark-disable``, as CI runs it, and ``--full``): the gradients of ours (unary, Potts,
diagonal and matrix compatibilities, default and ``checkpoint=True``) pass ``torch.autograd.gradcheck`` in float64
on a 16x16 crop of the photo; the float32 gradients equal the float64 ones to 1e-4 relative; every row checks
that its gradients are finite and that ours with ``checkpoint=True`` gives the default's gradients. With
``--benchmark-disable`` the rows shrink to a 64x64 crop and one call each, and the memory probe runs for one
row only.

Run: ``pytest benchmarks/test_crf_grad.py --full`` (about 10 min on 2 cores; the headline rows about 1.5 min).
"""
from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import deeplab_fast  # noqa: F401
from deeplab_fast.ops import dense_crf

from conftest import (FULL, RESULTS, ProbeError, cuda_timed, gpu_description, needs_cuda, probe_process, record,
                      require_cuda_kernels, set_target)

skdata = pytest.importorskip("skimage.data")

ITERATIONS, LABELS = 10, 21
KERNELS = dict(gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=80.0, bilateral_srgb=13.0, bilateral_compat=10.0)
SIZE, SMOKE_SIZE = 512, 64  # the full run's photo; the smoke run's centre crop of it
PEER_WINDOW, PEER_BLUR = 11, 4  # ConvCRF's default filter_size and blur
PEER = f"ConvCRF-style k={PEER_WINDOW} blur={PEER_BLUR}"
OURS, OURS_CKPT = "deeplab_fast", "deeplab_fast checkpoint"
COMPATS = ("potts", pytest.param("matrix", marks=FULL))  # the headline run: Potts, 2 threads
THREADS = (pytest.param(1, marks=FULL), 2)
ROUNDS = {OURS: 9, OURS_CKPT: 9, PEER: 9}
ROUNDS_PEER_BACKWARD = 5
PAIRS = {OURS: 5, OURS_CKPT: 5, PEER: 3}  # interleaved forward / forward + backward pairs (see paired_ratio)
WARMUP = {OURS: 2, OURS_CKPT: 2, PEER: 1}
GPU_ROUNDS, GPU_WARMUP = 20, 3
TARGET_BACKWARD_OVER_FORWARD = 2.0


# ----------------------------------------------------------------------------------------------------------
# The peer: a minimal ConvCRF (Teichmann & Cipolla, BMVC 2019) in plain PyTorch


def _pool(t: torch.Tensor, blur: int) -> torch.Tensor:
    return F.avg_pool2d(t, blur, ceil_mode=True, count_include_pad=False) if blur > 1 else t


def _window_kernel(feats: torch.Tensor, k: int) -> torch.Tensor:
    """The Gaussian exp(-|f_i - f_j|^2 / 2) between each pixel i and its k x k window j: [B, k*k, h, w], taps
    outside the image zero, the centre tap (j = i) 1, as ConvCRF's convolutional filters."""
    B, C, h, w = feats.shape
    s = k // 2
    nb = F.unfold(feats, k, padding=s).view(B, C, k * k, h * w)
    K = torch.exp(-0.5 * (nb - feats.reshape(B, C, 1, h * w)).square().sum(1))
    inside = F.unfold(feats.new_ones(1, 1, h, w), k, padding=s)  # [1, k*k, h*w]
    return (K * inside).view(B, k * k, h, w)


def _normalise_symmetric(K: torch.Tensor, k: int) -> torch.Tensor:
    """n_i K_ij n_j with n = 1 / sqrt(K 1): pydensecrf's NORMALIZE_SYMMETRIC on the truncated kernel."""
    B, _, h, w = K.shape
    n = (K.sum(1, keepdim=True) + 1e-20).rsqrt()  # [B, 1, h, w]
    n_nb = F.unfold(n, k, padding=k // 2).view(B, k * k, h, w)
    return K * n * n_nb


def _message(q: torch.Tensor, K: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    """sum_j K[:, j] q(window offset j): q [B, L, h, w], K [B, k*k, h, w] -> [B, L, h, w]."""
    B, L, h, w = q.shape
    if mode == "unfold":  # ConvCRF's im2col formulation
        u = F.unfold(q, k, padding=k // 2).view(B, L, k * k, h * w)
        return (u * K.view(B, 1, k * k, h * w)).sum(2).view(B, L, h, w)
    s = k // 2
    qp = F.pad(q, (s, s, s, s))
    out = K[:, :1] * qp[:, :, :h, :w]
    for j in range(1, k * k):  # in place: autograd keeps the taps and the shifted views, not out
        dy, dx = divmod(j, k)
        out.addcmul_(K[:, j:j + 1], qp[:, :, dy:dy + h, dx:dx + w])
    return out


def convcrf(unary: torch.Tensor, image: torch.Tensor, *, iterations: int = ITERATIONS, gaussian_sxy: float = 3.0,
            gaussian_compat=3.0, bilateral_sxy: float = 80.0, bilateral_srgb: float = 13.0, bilateral_compat=10.0,
            window: int = PEER_WINDOW, blur: int = PEER_BLUR, mode: str = "slices") -> torch.Tensor:
    """ConvCRF mean-field: the dense CRF's Gaussian kernels truncated to a window x window neighbourhood of a
    grid downsampled ``blur`` times. Arguments and result as :func:`deeplab_fast.ops.dense_crf` (unary energies
    [B, L, H, W], uint8 image [B, 3, H, W], compatibilities: 0-d Potts weights w, meaning the matrix -w I, or
    [L, L] matrices, symmetrised; the energy is unary + sum_t compat_t (K_t Q), Q = softmax(-energy))."""
    B, L, H, W = unary.shape
    dt = unary.dtype
    with torch.no_grad():  # the kernels depend on the image alone
        y, x = torch.meshgrid(torch.arange(H, device=unary.device, dtype=dt),
                              torch.arange(W, device=unary.device, dtype=dt), indexing="ij")
        pos = _pool(torch.stack([x, y])[None].expand(B, 2, H, W), blur)
        rgb = _pool(image.to(dt), blur)
        kernels = [_normalise_symmetric(_window_kernel(f, window), window)
                   for f in (pos / gaussian_sxy, torch.cat([pos / bilateral_sxy, rgb / bilateral_srgb], 1))]
    compats = [torch.as_tensor(c, dtype=dt, device=unary.device) for c in (gaussian_compat, bilateral_compat)]
    if all(c.dim() == 0 for c in compats):  # merged: one energy kernel, sum_t -w_t K_t
        terms = [(-(compats[0] * kernels[0] + compats[1] * kernels[1]), None)]
    else:
        terms = [(K, 0.5 * (c + c.T) if c.dim() == 2 else (-c if c.dim() == 0 else c))
                 for K, c in zip(kernels, compats)]
    neg_unary = -unary
    q = torch.softmax(neg_unary, 1)
    for _ in range(iterations):
        qb = _pool(q, blur)
        energy = None
        for K, c in terms:
            m = _message(qb, K, window, mode)
            if c is not None:
                m = torch.einsum("lm,bmhw->blhw", c, m) if c.dim() == 2 else (
                    c.view(1, -1, 1, 1) * m if c.dim() == 1 else c * m)
            energy = m if energy is None else energy + m
        if blur > 1:
            energy = F.interpolate(energy, size=(energy.shape[2] * blur, energy.shape[3] * blur), mode="bilinear",
                                   align_corners=False)[:, :, :H, :W]
        q = torch.softmax(neg_unary - energy, 1)
    return q


# ----------------------------------------------------------------------------------------------------------
# Inputs


def _photo(size: int) -> np.ndarray:
    img = np.ascontiguousarray(skdata.astronaut())  # 512x512x3 uint8, a real photo
    if size != img.shape[0]:
        y = (img.shape[0] - size) // 2
        img = np.ascontiguousarray(img[y:y + size, y:y + size])
    return img


def _compat(kind: str, weight: float, labels: int, seed: int) -> torch.Tensor:
    if kind == "potts":
        return torch.tensor(weight)
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(labels, labels, generator=g) * 2 - 1
    r = 0.5 * (r + r.T)
    r.fill_diagonal_(0)
    return -weight * torch.eye(labels) + 0.1 * weight * r


def make_problem(size: int, kind: str, device: str = "cpu", labels: int = LABELS) -> dict:
    """The photo (or its centre crop), a DeepLab-like unary as test_crf_fps.py makes it, the compatibilities
    (``kind``: potts or matrix) and a fixed upstream gradient, on ``device``."""
    img = _photo(size)
    H, W, _ = img.shape
    g = torch.Generator().manual_seed(0)
    low = torch.randn(1, labels, max(1, H // 8), max(1, W // 8), generator=g) * 3
    logits = F.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)
    unary = (-torch.log_softmax(logits, 1)).contiguous()
    image = torch.from_numpy(img).permute(2, 0, 1)[None].contiguous()
    grad_q = torch.randn(unary.shape, generator=g)
    p = dict(unary=unary, image=image, grad_q=grad_q,
             gaussian_compat=_compat(kind, KERNELS["gaussian_compat"], labels, 1),
             bilateral_compat=_compat(kind, KERNELS["bilateral_compat"], labels, 2))
    p = {k: v.to(device) for k, v in p.items()}
    p.update(H=H, W=W, kind=kind, labels=labels, device=device)
    return p


def call(impl: str, p: dict, backward: bool):
    """One call of a row: the forward (no grad), or the forward and the vector-Jacobian product with grad_q.
    Returns (Q, grads (unary, gaussian compat, bilateral compat) or None). ``probe(after_forward)``, if given in
    p, runs between forward and backward."""
    kwargs = dict(iterations=ITERATIONS, gaussian_sxy=KERNELS["gaussian_sxy"], bilateral_sxy=KERNELS["bilateral_sxy"],
                  bilateral_srgb=KERNELS["bilateral_srgb"])
    fn = convcrf if impl == PEER else dense_crf
    if impl == OURS_CKPT:
        kwargs["checkpoint"] = True
    if not backward:
        with torch.no_grad():
            return fn(p["unary"], p["image"], gaussian_compat=p["gaussian_compat"],
                      bilateral_compat=p["bilateral_compat"], **kwargs), None
    leaves = [p[k].detach().requires_grad_() for k in ("unary", "gaussian_compat", "bilateral_compat")]
    q = fn(leaves[0], p["image"], gaussian_compat=leaves[1], bilateral_compat=leaves[2], **kwargs)
    if "probe" in p:
        p["probe"]()
    grads = torch.autograd.grad(q, leaves, grad_outputs=p["grad_q"])
    return q.detach(), grads


def check_call(impl: str, p: dict, q: torch.Tensor, grads) -> dict:
    """The checks every row makes on its result; returns what it found."""
    assert torch.isfinite(q).all(), f"{impl}: non-finite marginals"
    assert torch.allclose(q.sum(1), torch.ones_like(q[:, 0]), atol=1e-4), f"{impl}: marginals do not sum to 1"
    found = {}
    if grads is not None:
        for name, g in zip(("unary", "gaussian_compat", "bilateral_compat"), grads):
            assert g is not None and torch.isfinite(g).all(), f"{impl}: non-finite gradient for {name}"
            found[f"grad_{name}_abs_max"] = float(g.abs().max())
    return found


# ----------------------------------------------------------------------------------------------------------
# Peak memory on the CPU: one call in a fresh process


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _probe_main(spec: dict) -> dict:
    """Runs in a fresh process (``python test_crf_grad.py --probe SPEC``): builds the input, warms the
    implementation up on 16x16, then makes the row's call once and measures its memory."""
    torch.set_num_threads(spec["threads"])
    p = make_problem(spec["size"], spec["kind"])
    call(spec["impl"], make_problem(16, spec["kind"]), spec["backward"])  # lazy initialisation, not counted
    gc.collect()
    if spec.get("baseline"):  # everything but the call
        return dict(ru_maxrss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    before_kb = _status_kb("VmRSS")
    reset = _reset_peak()
    after_forward = {}
    p["probe"] = lambda: after_forward.setdefault("kb", _status_kb("VmRSS"))
    t0 = time.perf_counter()
    q, grads = call(spec["impl"], p, spec["backward"])
    seconds = time.perf_counter() - t0
    out = dict(before_kb=before_kb, seconds=seconds, hwm_reset=reset,
               hwm_kb=_status_kb("VmHWM"), ru_maxrss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    if "kb" in after_forward:
        out["after_forward_kb"] = after_forward["kb"]
    check_call(spec["impl"], p, q, grads)
    return out


def _run_probe(spec: dict) -> dict:
    """The probe's JSON; raises ProbeError when the fresh process fails (on a loaded machine: killed for memory,
    or slower than the timeout)."""
    here = str(Path(__file__).parent)  # conftest's folder, on the path even under PYTHONSAFEPATH (as in CI)
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]),
               PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    return probe_process([sys.executable, __file__, "--probe", json.dumps(spec)], env=env, cwd=here, timeout=900)


def measure_memory(impl: str, kind: str, threads: int, backward: bool, size: int, smoke: bool = False) -> dict:
    """Peak memory of one call of a row, in MiB, from a fresh process (see the module docstring). A probe that
    fails is a figure not measured (``memory_error``), not a failed benchmark, except in the smoke run, which
    checks the probe itself."""
    spec = dict(impl=impl, kind=kind, threads=threads, backward=backward, size=size)
    try:
        r = _run_probe(spec)
        base = None if r["hwm_reset"] else _run_probe(dict(spec, baseline=True))
    except ProbeError as e:
        if smoke:
            raise
        return dict(peak_mb=None, memory_error=str(e))
    mib = 1024.0
    if base is None:
        out = dict(peak_mb=(r["hwm_kb"] - r["before_kb"]) / mib,
                   memory_method="VmHWM after a reset (clear_refs 5) minus VmRSS before the call, fresh process")
    else:
        out = dict(peak_mb=(r["ru_maxrss_kb"] - base["ru_maxrss_kb"]) / mib,
                   memory_method="ru_maxrss of a fresh process minus that of a baseline process without the call")
    if "after_forward_kb" in r:
        out["held_after_forward_mb"] = (r["after_forward_kb"] - r["before_kb"]) / mib
    out["probe_call_s"] = r["seconds"]
    return out


# ----------------------------------------------------------------------------------------------------------
# Correctness: float64 gradcheck of ours on a small crop (also in the smoke run)


def _crop_problem(dtype, labels: int = 4, size: int = 16) -> dict:
    img = np.ascontiguousarray(skdata.astronaut()[200:200 + size, 220:220 + size])  # the face's edge
    g = torch.Generator().manual_seed(3)
    logits = F.interpolate(torch.randn(1, labels, 4, 4, generator=g, dtype=torch.float64) * 2, size=(size, size),
                           mode="bilinear", align_corners=False)
    unary = (-torch.log_softmax(logits, 1)).to(dtype)
    image = torch.from_numpy(img).permute(2, 0, 1)[None].contiguous()
    r = torch.rand(labels, labels, generator=g, dtype=torch.float64)
    # Weights that leave the marginals unsaturated after 10 iterations (max Q about 0.92 on average): with the
    # benchmark's 3 and 10 on this crop Q is one-hot to 1e-5, the gradients shrink to 1e-4 and what is left of
    # them is float32 rounding, which would make the float32 vs float64 comparison meaningless.
    return dict(unary=unary, image=image,
                compat={"potts": (torch.tensor(1.0, dtype=dtype), torch.tensor(3.0, dtype=dtype)),
                        "diag+matrix": ((-1.0 - 0.3 * torch.rand(labels, generator=g, dtype=torch.float64)).to(dtype),
                                        (-3.0 * torch.eye(labels, dtype=torch.float64) + 0.6 * (r + r.T)).to(dtype))})


def _ours_fn(image, checkpoint: bool, iterations: int = 5):
    def fn(unary, gc_, bc_):
        return dense_crf(unary, image, iterations=iterations, gaussian_sxy=3.0, gaussian_compat=gc_,
                         bilateral_sxy=20.0, bilateral_srgb=13.0, bilateral_compat=bc_, checkpoint=checkpoint)
    return fn


@FULL
@pytest.mark.parametrize("checkpoint", [False, True], ids=["history", "checkpoint"])
@pytest.mark.parametrize("compat", ["potts", "diag+matrix"])
def test_grad_float64_gradcheck(compat, checkpoint):
    p = _crop_problem(torch.float64)
    inputs = [p["unary"].requires_grad_(), *(c.requires_grad_() for c in p["compat"][compat])]
    assert torch.autograd.gradcheck(_ours_fn(p["image"], checkpoint), inputs, eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=True)


@FULL
@pytest.mark.parametrize("compat", ["potts", "diag+matrix"])
def test_grad_float32_matches_float64(compat):
    """The float32 gradients (the benchmarked path), default and checkpointed, against float64's."""
    grads = {}
    for dtype in (torch.float64, torch.float32):
        p = _crop_problem(dtype)
        g = torch.Generator().manual_seed(5)
        grad_q = torch.randn(p["unary"].shape, generator=g, dtype=torch.float64).to(dtype)
        for checkpoint in (False, True):
            leaves = [p["unary"].clone().requires_grad_(), *(c.clone().requires_grad_() for c in p["compat"][compat])]
            q = _ours_fn(p["image"], checkpoint, iterations=ITERATIONS)(*leaves)
            grads[dtype, checkpoint] = [t.double() for t in torch.autograd.grad(q, leaves, grad_q.to(dtype))]
    for a, b in zip(grads[torch.float64, False], grads[torch.float64, True]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for checkpoint in (False, True):
        for name, a, b in zip(("unary", "gaussian_compat", "bilateral_compat"), grads[torch.float32, checkpoint],
                              grads[torch.float64, False]):
            scale = float(b.abs().max())
            assert scale >= 1e-2, f"{compat}: d{name} is too small to compare ({scale:.3g})"
            err = float((a - b).abs().max()) / scale
            assert err <= 1e-4, (f"{compat}, checkpoint={checkpoint}: d{name} float32 vs float64 relative error "
                                 f"{err:.3g}")


@FULL
def test_peer_matches_itself_unfold_vs_slices():
    """The peer's two formulations of the windowed message agree, and its float64 gradient is finite."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add synchronisation
    try:
        _peer_self_check()
    finally:
        torch.set_num_threads(before)


def _peer_self_check():
    for kind in ("potts", "matrix"):
        p = make_problem(SMOKE_SIZE, kind)
        q = {m: convcrf(p["unary"], p["image"], gaussian_compat=p["gaussian_compat"],
                        bilateral_compat=p["bilateral_compat"], mode=m) for m in ("slices", "unfold")}
        torch.testing.assert_close(q["slices"], q["unfold"], rtol=1e-4, atol=1e-5)
    leaves = [p[k].double().requires_grad_() for k in ("unary", "gaussian_compat", "bilateral_compat")]
    q = convcrf(leaves[0], p["image"], gaussian_compat=leaves[1], bilateral_compat=leaves[2])
    grads = torch.autograd.grad(q, leaves, p["grad_q"].double())
    assert all(torch.isfinite(g).all() for g in grads)


@FULL
def test_peer_agrees_with_ours_without_truncation():
    """Where its window covers the kernel (the Gaussian term alone, sxy 3, a 21 x 21 window at full resolution:
    +-3.3 standard deviations), the peer computes the dense CRF that ours computes: its kernel, normalisation
    and compatibility conventions are ours. (With the benchmark's bilateral term, sxy 80, it cannot: see the
    rows' argmax_agreement_vs_ours.)"""
    p = make_problem(SMOKE_SIZE, "potts")
    kw = dict(iterations=ITERATIONS, gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=80.0, bilateral_srgb=13.0,
              bilateral_compat=0.0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours = dense_crf(p["unary"], p["image"], **kw)
        peer = convcrf(p["unary"], p["image"], window=21, blur=1, **kw)
    finally:
        torch.set_num_threads(before)
    agree = float((ours.argmax(1) == peer.argmax(1)).float().mean())
    mean_dq = float((ours - peer).abs().mean())
    assert agree >= 0.98 and mean_dq <= 2e-3, f"peer vs ours: argmax agreement {agree:.4f}, mean |dQ| {mean_dq:.3g}"


# ----------------------------------------------------------------------------------------------------------
# CPU rows

_problems: dict = {}


def cpu_problem(size: int, kind: str) -> dict:
    if (size, kind) not in _problems:
        _problems.clear()
        _problems[size, kind] = make_problem(size, kind)
    return _problems[size, kind]


_ckpt_reference: dict = {}


def group_name(size: int, kind: str, backward: bool, threads: int | None, backend: str = "cpu") -> str:
    where = f"{threads}thr" if backend == "cpu" else "cuda"
    return f"crf {size}x{size} L={LABELS} {kind} {'fwd+bwd' if backward else 'fwd'} {where}"


def paired_ratio(impl: str, p: dict) -> dict:
    """backward / forward from interleaved calls (forward without grad, then forward + backward, PAIRS times):
    a figure that load drifting between the rows cannot skew, beside the one from the rows' medians."""
    forward, both = [], []
    for _ in range(PAIRS[impl]):
        t0 = time.perf_counter()
        call(PEER if impl == PEER else OURS, p, False)
        t1 = time.perf_counter()
        call(impl, p, True)
        both.append(time.perf_counter() - t1)
        forward.append(t1 - t0)
    f, fb = statistics.median(forward), statistics.median(both)
    return dict(paired_rounds=PAIRS[impl], paired_forward_median_ms=1e3 * f, paired_fwd_bwd_median_ms=1e3 * fb,
                paired_backward_over_forward=(fb - f) / f)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", [PEER, OURS, OURS_CKPT])
@pytest.mark.parametrize("kind", COMPATS)
def test_cpu(benchmark, kind, impl, backward, threads):
    if impl == OURS_CKPT and not backward:
        pytest.skip("checkpoint only changes the backward: the forward row is deeplab_fast's")
    smoke = benchmark.disabled
    size = SMOKE_SIZE if smoke else SIZE
    p = cpu_problem(size, kind)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rounds = ROUNDS_PEER_BACKWARD if (impl == PEER and backward) else ROUNDS[impl]
        q, grads = benchmark.pedantic(call, args=(impl, p, backward), rounds=rounds, warmup_rounds=WARMUP[impl])
        paired = paired_ratio(impl, p) if (backward and not smoke) else {}
    finally:
        torch.set_num_threads(before)
    info = check_call(impl, p, q, grads)
    info.update(paired)
    if impl in (OURS, OURS_CKPT) and backward:  # checkpointing must not change the gradients
        key = (size, kind, threads)
        if key in _ckpt_reference:
            for a, b in zip(grads, _ckpt_reference.pop(key)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            info["checkpoint_grads_equal_default"] = True
        else:
            _ckpt_reference[key] = grads
    if impl == PEER:  # how far the truncated, downsampled model is from the dense one (not asserted)
        with torch.no_grad():
            ours = call(OURS, p, False)[0]
        info.update(max_abs_dq_vs_ours=float((q - ours).abs().max()),
                    argmax_agreement_vs_ours=float((q.argmax(1) == ours.argmax(1)).float().mean()))
    if not smoke or (kind == "potts" and impl == OURS and backward and threads == 1):
        info.update(measure_memory(impl, kind, threads, backward, size, smoke=smoke))
    info["load_average_1min"] = os.getloadavg()[0]  # this shared machine's load when the row finished
    record(benchmark, group_name(size, kind, backward, threads), f"{impl} ({threads} thr)", threads=threads,
           size=f"{size}x{size}", labels=LABELS, iterations=ITERATIONS, compat=kind, backward=backward,
           timed_rounds=rounds, peer_window=PEER_WINDOW, peer_blur=PEER_BLUR,
           measured="forward + backward (VJP of Q)" if backward else "forward, no grad", **info)


# ----------------------------------------------------------------------------------------------------------
# GPU rows (skip without CUDA)


def _cuda_backward_missing() -> bool:
    return not torch._C._dispatch_has_kernel_for_dispatch_key("deeplab_fast::dense_crf_features_backward", "CUDA")


@needs_cuda
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", [PEER, OURS, OURS_CKPT])
@pytest.mark.parametrize("kind", COMPATS)
def test_cuda(benchmark, kind, impl, backward):
    if impl == OURS_CKPT and not backward:
        pytest.skip("checkpoint only changes the backward: the forward row is deeplab_fast's")
    if impl != PEER:
        require_cuda_kernels("dense_crf_features")
        if backward and _cuda_backward_missing():
            pytest.skip("deeplab_fast has no CUDA backward for the dense CRF yet (dense_crf_features_backward has no "
                        "CUDA kernel)")
    smoke = benchmark.disabled
    size = SMOKE_SIZE if smoke else SIZE
    p = make_problem(size, kind, device="cuda")
    q, grads = call(impl, p, backward)  # first call, checked
    check_call(impl, p, q, grads)
    del q, grads
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call(impl, p, backward)
    torch.cuda.synchronize()
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    rounds = 1 if smoke else GPU_ROUNDS
    (q, grads), times = cuda_timed(benchmark, lambda: call(impl, p, backward), rounds=rounds,
                                   warmup_rounds=GPU_WARMUP)
    info = check_call(impl, p, q, grads)
    record(benchmark, group_name(size, kind, backward, None, "cuda"), impl, threads=None, device=gpu_description(),
           backend="cuda", times_s=times, size=f"{size}x{size}", labels=LABELS, iterations=ITERATIONS, compat=kind,
           backward=backward, peak_mb=peak_mb,
           memory_method="torch.cuda.max_memory_allocated during one call minus memory_allocated before it", **info)


# ----------------------------------------------------------------------------------------------------------
# The summary: backward / forward per implementation, the target, peak memory (runs after the rows above)


def _mb(value) -> str:
    return "   n/a   " if value is None else f"{value:7.1f} MB"


def test_summary(capsys):
    lines, found = [], []
    for group, impls in list(RESULTS.items()):
        if not group.startswith("crf ") or " fwd+bwd " not in group:
            continue
        fwd_group = group.replace(" fwd+bwd ", " fwd ")
        for impl, row in impls.items():
            base_impl = impl.replace(OURS_CKPT, OURS)
            fwd = RESULTS.get(fwd_group, {}).get(base_impl)
            if not (fwd and fwd["median_s"] and row["median_s"]):
                continue
            ratio = (row["median_s"] - fwd["median_s"]) / fwd["median_s"]
            # the default path; checkpoint=True recomputes the forward in its backward: reported, not targeted
            ours = impl.startswith(OURS) and not impl.startswith(OURS_CKPT)
            met = ratio <= TARGET_BACKWARD_OVER_FORWARD if ours else None
            row["extra"].update(backward_over_forward=ratio, forward_median_ms=1e3 * fwd["median_s"],
                                target_backward_over_forward=TARGET_BACKWARD_OVER_FORWARD if ours else None,
                                meets_target=met)
            if ours:
                set_target(row, f"bwd/fwd {ratio:.2f} <= {TARGET_BACKWARD_OVER_FORWARD:g}", met)
            found.append(met)
            lines.append(f"  {group:36s} {impl:34s} fwd {1e3 * fwd['median_s']:8.1f} ms  fwd+bwd "
                         f"{1e3 * row['median_s']:8.1f} ms  bwd/fwd {ratio:5.2f} (paired "
                         f"{row['extra'].get('paired_backward_over_forward', float('nan')):5.2f})"
                         f"{'' if met is None else ('  met' if met else '  MISSED')}  peak "
                         f"{_mb(row['extra'].get('peak_mb'))} (fwd {_mb(fwd['extra'].get('peak_mb'))}), held after "
                         f"fwd {_mb(row['extra'].get('held_after_forward_mb'))}")
    with capsys.disabled():
        print()
        if not lines:
            print("crf grad: no forward + backward row timed (--benchmark-disable, or -k left them out)")
            return
        print(f"crf grad: backward / forward = (fwd+bwd - fwd) / fwd, medians; target for ours <= "
              f"{TARGET_BACKWARD_OVER_FORWARD:g}")
        for line in lines:
            print(line)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        print(json.dumps(_probe_main(json.loads(sys.argv[2]))))
    else:
        sys.exit(f"usage: {sys.argv[0]} --probe SPEC (run the benchmarks with pytest)")
