"""Reliability of the dense CRF ops (issue 14): no silent garbage, no hang under fork, clean errors.

- Meta (or misplaced) tensors in any argument are refused, by the real kernels and by the fake ones, which also
  run the shape checks.
- The pydensecrf drop-in and the ops work in fork, forkserver and spawn pools after the parent used them, and in
  DataLoader workers (GNU OpenMP's threads do not survive fork: deeplab_fast runs single-threaded there).
- Compatibilities near float32's limit give finite marginals (the overflowing pixels are recomputed in double).
- Standard deviations too small for float32 or the lattice, huge integers and bad environment switches are errors
  that name the argument; Ctrl-C stops a long call promptly; outputs are ordinary, resizable tensors.
The CLI's side (checkpoint files, 16-bit PNGs, option ranges) is in test_cli_errors.py.
"""
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import deeplab_fast.densecrf as dcrf
from deeplab_fast.nn import DenseCRF
from deeplab_fast.ops import dense_crf, dense_crf_features, dense_crf_pairwise_energy

from helpers import cpu_and_cuda, seeded


def inputs(B=1, L=3, H=12, W=10, seed=0):
    g = seeded(seed)
    unary = -torch.log_softmax(torch.randn(B, L, H, W, generator=g), 1)
    image = torch.randint(0, 256, (B, 3, H, W), generator=g, dtype=torch.uint8)
    return unary, image


# ----------------------------------------------------------------------------------------------------------
# 1. Meta tensors and devices


@pytest.mark.parametrize("which", ["unary", "image", "gaussian_compat", "bilateral_compat"])
def test_a_meta_argument_is_refused(which):
    unary, image = inputs()
    args = dict(unary=unary, image=image, gaussian_compat=torch.tensor(3.0), bilateral_compat=torch.tensor(10.0))
    args[which] = args[which].to("meta")
    with pytest.raises(ValueError, match=rf"{which}.* is on meta|is on meta.*{which}|unary is on"):
        dense_crf(args.pop("unary"), args.pop("image"), **args)


def test_the_layer_refuses_a_meta_image():
    unary, image = inputs()
    with pytest.raises(ValueError, match="image is on meta"):
        DenseCRF()(unary, image.to("meta"))


@pytest.mark.parametrize("which", ["features", "compat", "q_init"])
def test_generic_op_refuses_meta_arguments(which):
    B, L, N = 1, 3, 40
    args = dict(unary=torch.randn(B, L, N), features=[torch.randn(B, 2, N)], compat=[torch.tensor(1.0)],
                q_init=torch.softmax(torch.randn(B, L, N), 1))
    if which == "q_init":
        args["q_init"] = args["q_init"].to("meta")
    else:
        args[which] = [args[which][0].to("meta")]
    with pytest.raises(ValueError, match=rf"{which}(\[0\])? is on meta"):
        dense_crf_features(args["unary"], args["features"], args["compat"], q_init=args["q_init"])
    q = torch.softmax(torch.randn(B, L, N), 1)
    with pytest.raises(ValueError, match=r"features\[0\] is on meta"):
        dense_crf_pairwise_energy(q, [torch.randn(B, 2, N, device="meta")], [1.0])
    with pytest.raises(ValueError, match=r"compat\[0\] is on meta"):
        dense_crf_pairwise_energy(q, [torch.randn(B, 2, N)], [torch.tensor(1.0, device="meta")])


@pytest.mark.parametrize("bad,match", [
    (lambda u, i: (u, i[:, :2]), "3 channels"),
    (lambda u, i: (u[:0], i[:0]), "empty batch"),
    (lambda u, i: (u, i[:, :, :5]), "image size"),
    (lambda u, i: (u.half(), i), "float32"),
])
def test_all_meta_calls_run_the_shape_checks(bad, match):
    unary, image = bad(*inputs())
    with pytest.raises(ValueError, match=match):
        dense_crf(unary.to("meta"), image.to("meta"))


def test_all_meta_call_gives_shapes_only():
    unary, image = inputs(B=2, L=4)
    q = dense_crf(unary.to("meta"), image.to("meta"))
    assert q.device.type == "meta" and q.shape == unary.shape
    B, L, N = 2, 4, 30
    q, history = torch.ops.deeplab_fast.dense_crf_features_with_history(
        torch.empty(B, L, N, device="meta"), [torch.empty(B, 5, N, device="meta")], [torch.tensor(1.0)], [3], 3, None)
    assert history.shape == (B, 3, N, 4)  # the CPU label stride of 4 labels


# ----------------------------------------------------------------------------------------------------------
# 2. Fork, forkserver, spawn, DataLoader workers

POOL_SCRIPT = textwrap.dedent("""
    import multiprocessing as mp, sys
    import numpy as np, torch
    import deeplab_fast.densecrf as dcrf
    from deeplab_fast.ops import dense_crf

    def crf(seed):
        r = np.random.default_rng(seed)
        U = r.uniform(0.1, 3, (4, 60 * 50)).astype(np.float32)
        img = r.integers(0, 255, (50, 60, 3), dtype=np.uint8)
        d = dcrf.DenseCRF2D(60, 50, 4)
        d.setUnaryEnergy(U)
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=img, compat=10)
        q = np.array(d.inference(5))
        t = dense_crf(torch.from_numpy(U).view(1, 4, 50, 60), torch.from_numpy(img).permute(2, 0, 1)[None].contiguous())
        big = torch.rand(3_000_000).sum()  # an ATen parallel reduction too
        return q.astype(np.float64).sum().round(3), float(t.sum()), float(big) > 0

    if __name__ == "__main__":
        want = crf(7)  # the parent uses the drop-in, the op and torch's threads first
        with mp.get_context(sys.argv[1]).Pool(2) as pool:
            got = pool.map(crf, [7, 7, 7])
        assert all(g == want for g in got), (got, want)
        print("ok", sys.argv[1])
""")


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_process_pools_finish(tmp_path, method):
    script = tmp_path / "pool.py"
    script.write_text(POOL_SCRIPT)
    r = subprocess.run([sys.executable, str(script), method], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and f"ok {method}" in r.stdout, r.stdout + r.stderr


class CrfDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        unary, image = inputs(seed=i)
        return dense_crf(unary, image, iterations=3)[0]


def test_dataloader_workers_finish():
    dense_crf(*inputs())  # the parent's threads exist before the workers fork
    loader = torch.utils.data.DataLoader(CrfDataset(), batch_size=2, num_workers=2,
                                         multiprocessing_context="fork")
    got = torch.cat(list(loader))
    want = torch.cat([CrfDataset()[i][None] for i in range(4)])
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------------------------
# 4. Huge compatibilities


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("compat", [3e38, -3e38, "mixed"])
def test_huge_compatibilities_give_finite_marginals(device, compat):
    unary, image = inputs(L=4, H=20, W=24)
    unary, image = unary.to(device), image.to(device)
    if compat == "mixed":  # +3e38 and -3e38 in one matrix: inf - inf in float32
        m = torch.full((4, 4), 3e38)
        m.fill_diagonal_(-3e38)
        kwargs = dict(gaussian_compat=m.to(device), bilateral_compat=3e38)
    else:
        kwargs = dict(gaussian_compat=compat, bilateral_compat=compat)
    q = dense_crf(unary, image, iterations=5, **kwargs)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones_like(q[:, 0]))
    # It saturates as the same call in float64 does (no overflow there): the same labels.
    if device == "cpu":
        q64 = dense_crf(unary.double(), image, iterations=5,
                        **{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})
        assert (q.argmax(1) == q64.argmax(1)).float().mean() > 0.99


def test_ordinary_compatibilities_stay_bit_exact_after_the_overflow_guard():
    """The guard only touches pixels whose messages overflowed: a normal call equals the float32 reference."""
    pytest.importorskip("pydensecrf.densecrf")
    import pydensecrf.densecrf as ref

    unary, image = inputs(L=5, H=30, W=40)
    d = ref.DenseCRF2D(40, 30, 5)
    d.setUnaryEnergy(unary[0].reshape(5, -1).numpy().copy())
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=image[0].permute(1, 2, 0).numpy().copy(), compat=10)
    want = np.array(d.inference(5)).reshape(5, 30, 40)
    assert np.array_equal(dense_crf(unary, image, iterations=5)[0].numpy(), want)


# ----------------------------------------------------------------------------------------------------------
# 7, 9. Ranges


@pytest.mark.parametrize("name,value,match", [
    ("gaussian_sxy", 1e-300, "gaussian_sxy must be representable in float32"),
    ("bilateral_sxy", 1e-30, "bilateral_sxy must be at least"),
    ("bilateral_srgb", 1e-7, "bilateral_srgb must be at least"),
    ("gaussian_sxy", 1e39, "gaussian_sxy must be representable in float32"),
])
def test_standard_deviations_out_of_float32_or_lattice_range(name, value, match):
    with pytest.raises(ValueError, match=match):
        dense_crf(*inputs(), **{name: value})


@pytest.mark.parametrize("kwargs,match", [
    (dict(iterations=2**63), r"iterations must be in \[0, 2147483647\]"),
    (dict(iterations=2**31), r"iterations must be in \[0, 2147483647\]"),
    (dict(iterations=True), "iterations must be an int"),
])
def test_huge_integers_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dense_crf(*inputs(), **kwargs)


@pytest.mark.parametrize("normalization,match", [
    (["x"], r"normalization\[0\] must be an int"),
    ([2**63], r"normalization\[0\] must be in \[0, 3\]"),
    ([1.0], r"normalization\[0\] must be an int"),
])
def test_bad_normalizations_are_named(normalization, match):
    with pytest.raises(ValueError, match=match):
        dense_crf_features(torch.randn(1, 3, 20), [torch.randn(1, 2, 20)], [1.0], normalization)


def test_op_level_iteration_bound():
    unary, image = inputs()
    with pytest.raises(ValueError, match=r"iterations must be in \[0, 2147483647\]"):
        torch.ops.deeplab_fast.dense_crf(unary, image, 2**40, 3.0, torch.tensor(3.0), 80.0, 13.0, torch.tensor(10.0))


# ----------------------------------------------------------------------------------------------------------
# 8. Environment switches


@pytest.mark.parametrize("name,value,match", [
    ("DEEPLAB_FAST_CPU_CACHE_MB", "-1", "DEEPLAB_FAST_CPU_CACHE_MB must be a whole number"),
    ("DEEPLAB_FAST_CPU_CACHE_MB", "abc", "DEEPLAB_FAST_CPU_CACHE_MB must be a whole number"),
    ("DEEPLAB_FAST_PROFILE", "yes", "DEEPLAB_FAST_PROFILE must be 0 or 1"),
    ("DEEPLAB_FAST_CUDA_GRAPH", "2", "DEEPLAB_FAST_CUDA_GRAPH must be 0 or 1"),
    ("DEEPLAB_FAST_TAP_SKIPPING", "maybe", "DEEPLAB_FAST_TAP_SKIPPING must be 0, off, 1, on or auto"),
    ("DEEPLAB_FAST_THREADS_WAIT", "busy", "DEEPLAB_FAST_THREADS_WAIT must be spin or passive"),
    ("DEEPLAB_FAST_NO_MEMORY_CHECK", "yes", "DEEPLAB_FAST_NO_MEMORY_CHECK must be 0 or 1"),
])
def test_bad_environment_switches_fail_at_import(name, value, match):
    env = dict(os.environ, **{name: value})
    r = subprocess.run([sys.executable, "-c", "import deeplab_fast"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0
    assert f"ValueError: {name}" in r.stderr and match.split(" must")[1].split(" (")[0] in r.stderr, r.stderr


def test_unknown_switch_warns():
    env = dict(os.environ, DEEPLAB_FAST_PROFLIE="1")
    r = subprocess.run([sys.executable, "-c", "import deeplab_fast"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "unknown deeplab_fast environment variable(s) DEEPLAB_FAST_PROFLIE" in r.stderr


def test_the_python_switch_is_known():
    """DEEPLAB_FAST_NO_MEMORY_CHECK (read by dense_crf_3d in Python) is a switch, not an unknown variable."""
    env = dict(os.environ, DEEPLAB_FAST_NO_MEMORY_CHECK="1")
    r = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", "import deeplab_fast"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_valid_switches_are_reported():
    from deeplab_fast import _env

    assert _env.settings()["DEEPLAB_FAST_POISON"] == "1"  # tests/conftest.py sets it


# ----------------------------------------------------------------------------------------------------------
# 10. Ctrl-C


def test_ctrl_c_stops_a_long_call_promptly(tmp_path):
    script = tmp_path / "interrupt.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys, threading, time, torch
        from deeplab_fast.ops import dense_crf
        u = torch.rand(1, 21, 256, 256)
        img = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8)
        dense_crf(u, img, iterations=1)
        start = time.time()
        threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        try:
            dense_crf(u, img, iterations=100000)  # hours
        except KeyboardInterrupt:
            print(f"interrupted {time.time() - start:.2f}")
            sys.exit(0)
        print("finished")
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "interrupted" in r.stdout, r.stdout + r.stderr
    assert float(r.stdout.split()[-1]) < 10.0


# ----------------------------------------------------------------------------------------------------------
# 11. Outputs are ordinary tensors


def test_outputs_are_resizable():
    unary, image = inputs()
    q = dense_crf(unary, image)
    q.resize_(7, 11)
    assert q.shape == (7, 11)
    f = dense_crf_features(torch.randn(1, 3, 20), [torch.randn(1, 2, 20)], [1.0])
    f.resize_(1000)  # grows: new storage from the same allocator
    f[:] = 1.0
    assert f.sum() == 1000
    e = dense_crf_pairwise_energy(torch.softmax(torch.randn(1, 3, 20), 1), [torch.randn(1, 2, 20)], [1.0])
    e.resize_(0)
    gaussian, bilateral = torch.ops.deeplab_fast.dense_crf_image_features(image, 3.0, 80.0, 13.0)
    bilateral.resize_(2, 2)


def test_outputs_survive_the_cache_being_emptied():
    unary, image = inputs(L=21, H=64, W=64)
    q = dense_crf(unary, image)
    keep = q.clone()
    torch.ops.deeplab_fast.empty_cache()
    dense_crf(unary.flip(-1), image)
    assert torch.equal(q, keep)
