"""A small run of the CUDA dense CRF ops for compute-sanitizer (a script, not collected by pytest).

    compute-sanitizer --tool memcheck  --error-exitcode 1 python tests/cuda/sanitize_dense_crf.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tests/cuda/sanitize_dense_crf.py
    (initcheck and synccheck work too; .ci/gpu_checks.sh runs them)

It runs the dense CRF samples of tests/samples.py on CUDA: dense_crf (both kernel sets, a batch of 2, 1x1 and 1x97
images, 2048 labels, diagonal and matrix compatibilities), dense_crf_features (2, 5 and 16 dimensions, every
normalisation, Potts / vector / matrix compat, q_init) and dense_crf_pairwise_energy, with the CUDA graph and
without (--graph), compares each result with the CPU op (max |diff| <= 1e-4 of the result's scale, finite) and
prints OK. Exit status: 0 OK, 1 a mismatch, 2 no CUDA or no CUDA kernels.

Environment: DEEPLAB_FAST_POISON defaults to 1 here (outputs start as NaN, so an element no kernel wrote fails
the finiteness check); set it to 0 for initcheck to see unwritten outputs itself. With
PYTORCH_NO_CUDA_MEMORY_CACHING=1 every torch allocation is its own cudaMalloc, so memcheck also catches accesses
past the end of a buffer that would otherwise land inside a larger cached block.
"""
import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("DEEPLAB_FAST_POISON", "1")  # read once, at the first op call
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: samples.py

import torch  # noqa: E402

import deeplab_fast  # noqa: E402,F401  (loads the ops)
from samples import INPUTS, reference  # noqa: E402

OPS = ("dense_crf", "dense_crf_features", "dense_crf_pairwise_energy")
failures = []


def compare(name: str, got: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    got = got.cpu()
    finite = bool(torch.isfinite(got).all())
    diff = (got.double() - expected.double()).abs().max().item() if finite else float("nan")
    ok = finite and diff <= tol * max(1.0, expected.abs().max().item())
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max |diff| {diff:.3g}{'' if finite else ' (non-finite output)'}",
          flush=True)
    if not ok:
        failures.append(name)


def run(graph: str) -> None:
    os.environ["DEEPLAB_FAST_CUDA_GRAPH"] = "1" if graph == "on" else "0"  # read per call
    for op in OPS:
        for sample in INPUTS[op]("cuda"):
            got = getattr(torch.ops.deeplab_fast, op)(*sample.args)
            compare(f"graph {graph}: {op} {sample.name}", got, reference(op, sample), sample.tol)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graph", choices=["on", "off", "both"], default="both",
                        help="CUDA-graph capture of the iteration loop (DEEPLAB_FAST_CUDA_GRAPH)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: CUDA is not available", file=sys.stderr)
        return 2
    if not torch._C._dispatch_has_kernel_for_dispatch_key("deeplab_fast::dense_crf_features", "CUDA"):
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
