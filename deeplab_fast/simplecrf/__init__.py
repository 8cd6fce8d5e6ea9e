"""A drop-in replacement for SimpleCRF's dense CRF modules (SimpleCRF 0.2.1.1, Guotai Wang, HiLab), running on
deeplab_fast's dense CRF ops. Scripts move over by changing only their import::

    from deeplab_fast.simplecrf import denseCRF, denseCRF3D   # was: import denseCRF, denseCRF3D

    labels = denseCRF.densecrf(I, P, (w1, alpha, beta, w2, gamma, it))   # 2-D: I [H, W, 3] uint8, P [H, W, L]
    labels = denseCRF3D.densecrf3d(I, P, param)                          # 3-D: I [D, H, W, C] uint8, P [D, H, W, L]

Same arguments, shapes, dtypes and return type (``int8`` labels, ``numpy.ndarray``). SimpleCRF wraps Krähenbühl's
densecrf (2-D) and Kamnitsas' dense3dCrf (3-D, DeepMedic's; Kamnitsas et al., MedIA 2017); the models here are
the same, computed by :func:`deeplab_fast.ops.dense_crf_features` / :func:`deeplab_fast.ops.dense_crf_3d`, which
are bit-exact with Krähenbühl's code (pydensecrf2).

Differences from SimpleCRF:

* **3-D geometry.** SimpleCRF's 3-D wrapper builds its lattice as ``DenseCRF3D(shape[0], shape[1], shape[2])``
  while it reads the C-ordered [D, H, W] arrays, so voxel ``(z, y, x)`` (storage index n) gets the position
  ``(n % D, (n // D) % H, n // (D * H))`` instead of ``(x, y, z)``: the positions are scrambled unless D == W.
  Its ``PosRStd`` then applies to the last axis (W), ``PosCStd`` to H and ``PosZStd`` to the first (D). By default
  ``densecrf3d`` uses the correct positions (``PosRStd`` along W, ``PosCStd`` along H, ``PosZStd`` along D); pass
  ``simplecrf_order=True`` to reproduce SimpleCRF's positions (and its feature order) and match an existing
  pipeline label for label.
* **Modalities.** SimpleCRF's 3-D bilateral term takes 1 to 5 modalities and silently drops the term for more;
  here 1 to 13 channels are used (with ``simplecrf_order=True`` more than 5 reproduce SimpleCRF, with a warning).
* **Errors.** Bad arguments raise ``ValueError`` naming the argument or the ``param`` key (SimpleCRF prints to
  stderr and returns NULL, crashes on a missing key, or reads out of bounds on mismatched shapes); NaN or
  negative probabilities and voxels whose every probability is 0 are refused. Probability and image arrays of
  other real dtypes are converted (SimpleCRF refuses those that numpy cannot cast safely to float32 / uint8).
* **Parallel, quiet.** The inference uses ``torch.get_num_threads()`` threads (SimpleCRF: one); nothing is
  printed (SimpleCRF prints its parameters).
* **The unary** is ``-log(p)`` evaluated in float64 and rounded to float32; SimpleCRF calls the C library's
  single-precision ``logf``, which differs by one unit in the last place on about 1% of the values; a voxel near
  a tie could take the other label. Measured against SimpleCRF 0.2.1.1 itself (docs/crf3d.md): with
  ``simplecrf_order=True`` the labels were SimpleCRF's on all of 2.9 million voxels (and a 2-D image's pixels).
"""
from . import denseCRF, denseCRF3D

__all__ = ["denseCRF", "denseCRF3D"]
