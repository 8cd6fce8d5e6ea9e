"""Triton kernels (optional: used when triton is installed). See deeplab_fast.ops.aspp."""
