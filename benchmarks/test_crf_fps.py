"""Dense CRF throughput: deeplab_fast (C++ op, 1 and 2 threads) vs pydensecrf2, side by side.

Input: a real 512x512 photo (scikit-image's ``astronaut``), 21 labels, a DeepLab-like unary (smooth logits at
1/8 resolution, upsampled), 10 mean-field iterations, lattice construction included; the default
(pydensecrf) kernels and DeepLab-v2's VOC kernels. Every case first checks that its marginals equal
pydensecrf2's (bit for bit; the test bar is 1e-4). Target (issue 2): >= 4x pydensecrf2 with 2 threads on a
2-core machine, and faster with 1 thread.

Nine timed calls each, in one process, after warm-up calls (ours 2, pydensecrf2 1); the table shows the median
and the best of the nine, and the ratio of each. A
demanding user refines many images, and our working memory is recycled from call to call.
"""
import numpy as np
import pytest
import torch

import deeplab_fast  # noqa: F401
from deeplab_fast.ops import dense_crf

from conftest import record

dcrf = pytest.importorskip("pydensecrf.densecrf")
skdata = pytest.importorskip("skimage.data")

KERNELS = {
    "default": dict(gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=80.0, bilateral_srgb=13.0,
                    bilateral_compat=10.0),
    "deeplab_v2": dict(gaussian_sxy=1.0, gaussian_compat=3.0, bilateral_sxy=67.0, bilateral_srgb=3.0,
                       bilateral_compat=4.0),
}
ITERATIONS, LABELS = 10, 21


@pytest.fixture(scope="module")
def problem():
    img = np.ascontiguousarray(skdata.astronaut())  # 512x512x3 uint8, a real photo
    H, W, _ = img.shape
    g = torch.Generator().manual_seed(0)
    low = torch.randn(1, LABELS, H // 8, W // 8, generator=g) * 3
    logits = torch.nn.functional.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)
    unary = (-torch.log_softmax(logits, 1)).contiguous()
    image = torch.from_numpy(img).permute(2, 0, 1)[None].contiguous()
    return dict(img=img, unary=unary, image=image, unary_np=unary[0].reshape(LABELS, -1).numpy().copy())


def run_pydensecrf(p, k):
    H, W, _ = p["img"].shape
    d = dcrf.DenseCRF2D(W, H, LABELS)
    d.setUnaryEnergy(p["unary_np"])
    d.addPairwiseGaussian(sxy=k["gaussian_sxy"], compat=k["gaussian_compat"])
    d.addPairwiseBilateral(sxy=k["bilateral_sxy"], srgb=k["bilateral_srgb"], rgbim=p["img"],
                           compat=k["bilateral_compat"])
    return np.array(d.inference(ITERATIONS))


_reference = {}


def reference(p, kernels):
    if kernels not in _reference:
        _reference[kernels] = run_pydensecrf(p, KERNELS[kernels])
    return _reference[kernels]


@pytest.mark.parametrize("kernels", list(KERNELS))
def test_pydensecrf2(benchmark, problem, kernels):
    q = benchmark.pedantic(run_pydensecrf, args=(problem, KERNELS[kernels]), rounds=9, warmup_rounds=1)
    np.testing.assert_array_equal(q, reference(problem, kernels))
    record(benchmark, f"crf 512x512 L=21 it=10 {kernels}", "pydensecrf2 1.1", threads=1)


@pytest.mark.parametrize("threads", [2, 1])
@pytest.mark.parametrize("kernels", list(KERNELS))
def test_deeplab_fast(benchmark, problem, kernels, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q = benchmark.pedantic(lambda: dense_crf(problem["unary"], problem["image"], iterations=ITERATIONS,
                                                 **KERNELS[kernels]), rounds=9, warmup_rounds=2)
    finally:
        torch.set_num_threads(before)
    q = q[0].reshape(LABELS, -1).numpy()
    ref = reference(problem, kernels)
    assert np.abs(q - ref).max() <= 1e-4 and (q.argmax(0) == ref.argmax(0)).mean() >= 0.9999
    record(benchmark, f"crf 512x512 L=21 it=10 {kernels}", f"deeplab_fast ({threads} thr)", threads=threads)
