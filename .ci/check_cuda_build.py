"""Checks that the installed deeplab_fast is the CUDA build: `python .ci/check_cuda_build.py [--triton]`.

- torch is a CUDA build (torch.version.cuda is not None);
- deeplab_fast and deeplab_fast._C import;
- every op of the deeplab_fast namespace that has a CPU kernel has a CUDA kernel too (the dispatcher's
  registrations, so ops added later are covered; no GPU needed), and there is at least one such op;
- with --triton: the Triton ASPP kernels import (deeplab_fast.triton.aspp_kernels, and deeplab_fast.ops.aspp
  sees triton).
Prints what it found; exit status 0 when all hold, 1 otherwise.
"""
import argparse
import importlib
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triton", action="store_true", help="also import the Triton ASPP kernels")
    args = parser.parse_args()
    errors = []

    import torch

    print(f"torch {torch.__version__} from {torch.__file__}; CUDA {torch.version.cuda}; "
          f"GPU available: {torch.cuda.is_available()}")
    if torch.version.cuda is None:
        errors.append("torch is not a CUDA build (torch.version.cuda is None)")

    import deeplab_fast
    import deeplab_fast._C as ext

    print(f"deeplab_fast from {deeplab_fast.__file__}; _C from {ext.__file__}")
    cpu_ops = sorted(op for op in torch._C._dispatch_get_registrations_for_dispatch_key("CPU")
                     if op.startswith("deeplab_fast::"))
    if not cpu_ops:
        errors.append("no deeplab_fast op has a CPU kernel: the extension registered nothing")
    missing = [op for op in cpu_ops if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
    for op in cpu_ops:
        print(f"  {op}: CPU and {'NO ' if op in missing else ''}CUDA kernel")
    if missing:
        errors.append(f"ops without a CUDA kernel: {', '.join(missing)} (a CPU-only build?)")

    if args.triton:
        try:
            kernels = importlib.import_module("deeplab_fast.triton.aspp_kernels")
            aspp_ops = importlib.import_module("deeplab_fast.ops.aspp")
            import triton

            print(f"triton {triton.__version__}; {kernels.__name__} imports; deeplab_fast.ops.aspp.HAVE_TRITON = "
                  f"{getattr(aspp_ops, 'HAVE_TRITON', None)}")
            if getattr(aspp_ops, "HAVE_TRITON", None) is False:
                errors.append("deeplab_fast.ops.aspp does not see triton")
        except Exception as e:  # noqa: BLE001
            errors.append(f"the Triton ASPP module does not import: {type(e).__name__}: {e}")

    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    print("CUDA build check: " + ("OK" if not errors else f"FAILED ({len(errors)} error(s))"))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
