"""A small run of the CUDA dense CRF ops for compute-sanitizer (a script, not collected by pytest).

    compute-sanitizer --tool memcheck  --error-exitcode 1 python tests/cuda/sanitize_dense_crf.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tests/cuda/sanitize_dense_crf.py
    (initcheck and synccheck work too; .ci/gpu_checks.sh runs them)

It runs dense_crf (1x21x37x29 with both kernel sets, a batch of 2, 1x1 and 1x97 images, 2048 labels),
dense_crf_features (2, 5 and 16 dimensions, every normalisation, Potts / vector / matrix compat, q_init) and
dense_crf_pairwise_energy on CUDA, with the CUDA graph and without (--graph), compares each result with the
CPU op (max |dQ| <= 1e-4, finite) and prints OK. Exit status: 0 OK, 1 a mismatch, 2 no CUDA or no CUDA kernels.

Environment: DEEPLAB_FAST_POISON defaults to 1 here (outputs start as NaN, so an element no kernel wrote fails
the finiteness check); set it to 0 for initcheck to see unwritten outputs itself. With
PYTORCH_NO_CUDA_MEMORY_CACHING=1 every torch allocation is its own cudaMalloc, so memcheck also catches accesses
past the end of a buffer that would otherwise land inside a larger cached block.
"""
import argparse
import os
import sys

os.environ.setdefault("DEEPLAB_FAST_POISON", "1")  # read once, at the first op call

import torch  # noqa: E402

import deeplab_fast  # noqa: E402,F401  (loads the ops)
from deeplab_fast.ops import dense_crf, dense_crf_features, dense_crf_pairwise_energy  # noqa: E402

DEFAULT = dict(gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=80.0, bilateral_srgb=13.0, bilateral_compat=10.0)
DEEPLAB_V2 = dict(gaussian_sxy=1.0, gaussian_compat=3.0, bilateral_sxy=67.0, bilateral_srgb=3.0, bilateral_compat=4.0)

failures = []


def compare(name: str, got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    got = got.cpu()
    finite = bool(torch.isfinite(got).all())
    diff = (got.double() - expected.double()).abs().max().item() if finite else float("nan")
    ok = finite and diff <= tol
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max |diff| {diff:.3g}{'' if finite else ' (non-finite output)'}",
          flush=True)
    if not ok:
        failures.append(name)


def image_inputs(gen, B, L, H, W):
    low = torch.randn(B, L, max(1, H // 8), max(1, W // 8), generator=gen) * 3
    logits = torch.nn.functional.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)
    unary = -torch.log_softmax(logits, 1)
    image = torch.randint(0, 256, (B, 3, H, W), generator=gen, dtype=torch.uint8)
    return unary.contiguous(), image


def run(graph: str) -> None:
    os.environ["DEEPLAB_FAST_CUDA_GRAPH"] = "1" if graph == "on" else "0"  # read per call
    gen = torch.Generator().manual_seed(0)
    for B, L, H, W, iterations, name in [(1, 21, 37, 29, 3, "default"), (1, 21, 37, 29, 3, "deeplab_v2"),
                                          (2, 5, 23, 31, 2, "default"), (1, 2, 1, 1, 2, "default"),
                                          (1, 3, 1, 97, 2, "deeplab_v2"), (1, 2048, 5, 7, 1, "default")]:
        kernels = DEFAULT if name == "default" else DEEPLAB_V2
        unary, image = image_inputs(gen, B, L, H, W)
        got = dense_crf(unary.cuda(), image.cuda(), iterations=iterations, **kernels)
        compare(f"graph {graph}: dense_crf {B}x{L}x{H}x{W} it={iterations} {name}", got,
                dense_crf(unary, image, iterations=iterations, **kernels))
    B, L, N = 2, 4, 300
    unary = torch.randn(B, L, N, generator=gen) * 2
    q_init = torch.softmax(torch.randn(B, L, N, generator=gen), 1)
    compats = [2.5, -torch.rand(L, generator=gen) * 4, torch.rand(L, L, generator=gen) * 3]
    for n, D in enumerate([2, 5, 16]):
        feats = [torch.randn(B, D, N, generator=gen) * 3, torch.randn(B, 3, N, generator=gen) * 2]
        compat = [compats[n % 3], compats[(n + 1) % 3]]
        normalization = [n % 4, (n + 3) % 4]
        q0 = q_init if n == 1 else None
        got = dense_crf_features(unary.cuda(), [f.cuda() for f in feats], compat, normalization, iterations=3,
                                 q_init=None if q0 is None else q0.cuda())
        compare(f"graph {graph}: dense_crf_features D={D},3 normalization={normalization}", got,
                dense_crf_features(unary, feats, compat, normalization, iterations=3, q_init=q0))
    feats = [torch.randn(B, 3, N, generator=gen) * 3]
    expected = dense_crf_pairwise_energy(q_init, feats, [compats[2]], [3])
    compare(f"graph {graph}: dense_crf_pairwise_energy D=3",
            dense_crf_pairwise_energy(q_init.cuda(), [feats[0].cuda()], [compats[2]], [3]), expected,
            tol=1e-4 * max(1.0, expected.abs().max().item()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graph", choices=["on", "off", "both"], default="both",
                        help="CUDA-graph capture of the iteration loop (DEEPLAB_FAST_CUDA_GRAPH)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: CUDA is not available", file=sys.stderr)
        return 2
    if not torch._C._dispatch_has_kernel_for_dispatch_key("deeplab_fast::dense_crf", "CUDA"):
        print("error: deeplab_fast was built without CUDA kernels", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"PYTORCH_NO_CUDA_MEMORY_CACHING={os.environ.get('PYTORCH_NO_CUDA_MEMORY_CACHING', '')!r}", flush=True)
    for graph in (["on", "off"] if args.graph == "both" else [args.graph]):
        run(graph)
    torch.cuda.synchronize()
    if failures:
        print(f"FAILED: {len(failures)} case(s): {', '.join(failures)}")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
