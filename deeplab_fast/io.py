"""File input and output, one copy for the library and the command line: reading photos and annotations, and
writing images, palette PNGs and checkpoints atomically.

- ``load_photo(path)``: [H, W, 3] uint8 RGB. 16-bit greyscale images (PNG / TIFF, Pillow modes ``I;16*`` and
  ``I`` with values in 0..65535) are scaled to 8 bits by value (``round(v / 257)``), not clipped; images
  whose values cannot be read as 8 or 16 bits per channel (32-bit integers beyond 65535, floating point) raise
  ValueError.
- ``load_annotation(path)``: [H, W, 3] uint8 RGB for colour (and 8-bit) annotations, fully transparent pixels
  black; [H, W] uint16 for 16-bit greyscale annotations, whose labels are the values themselves.
- ``atomic_write(path)``: a context manager giving a binary file that replaces ``path`` only when the block
  completes (a temporary file beside it, then ``os.replace``), with a normal new file's permissions
  (``0o666 & ~umask``), so an interrupted run never leaves a truncated file behind.
- ``save_image``, ``save_palette_png``, ``save_checkpoint``: writes through ``atomic_write``.
- ``load_volume(path)`` / ``save_volume(arr, path, like=...)``: NIfTI (``.nii``, ``.nii.gz``, through nibabel,
  imported when first needed) and NumPy ``.npy`` volumes; a NIfTI volume keeps its affine and header (voxel
  spacing from the header's zooms), and ``save_volume`` writes them back with the new data (atomically).

Errors: a missing file raises FileNotFoundError; an unreadable or unsupported image, ValueError; a failed write,
OSError or ValueError. Every message names the file (and ``what``, the role the caller gives it).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

__all__ = ["IMAGE_EXTS", "ANNO_EXTS", "LOSSY_EXTS", "VOLUME_EXTS", "open_image", "load_photo", "load_annotation",
           "list_images", "same_file", "atomic_write", "save_image", "save_palette_png", "save_checkpoint", "Volume",
           "volume_format", "load_volume", "save_volume"]

# File extensions (lower case) taken as images, and as annotations in order of preference when one stem has
# several (lossless formats first).
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
ANNO_EXTS = (".png", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".webp", ".jpg", ".jpeg")
LOSSY_EXTS = (".jpg", ".jpeg", ".webp")
# Volume files: NIfTI-1/2 (nibabel) and NumPy arrays.
VOLUME_EXTS = (".nii", ".nii.gz", ".npy")

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def open_image(path, what: str = "image"):
    """The image at ``path`` as a loaded ``PIL.Image`` detached from the file. FileNotFoundError for a missing
    file; ValueError for a folder, or a file Pillow cannot read (corrupt, truncated, a decompression bomb)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r}: no such file")
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a folder, expected an image file")
    try:
        with Image.open(path) as opened:
            opened.load()
            return opened.copy()  # detached from the file, which the with block closes
    except UnidentifiedImageError:
        raise ValueError(f"{what} {str(path)!r}: not an image Pillow can read") from None
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{what} {str(path)!r}: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated / corrupt files, unreadable files
        raise ValueError(f"{what} {str(path)!r}: cannot read it ({exc})") from None


def _grey_values(image, path, what: str) -> np.ndarray | None:
    """[H, W] uint16 values of a 16-bit greyscale image (modes I;16*, or I within 0..65535); None for the other
    modes. ValueError for integer images beyond 16 bits and floating-point images."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        values = np.asarray(image, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{what} {str(path)!r}: a {image.mode} image with values from {values.min()} to "
                             f"{values.max()}; only 8- and 16-bit images are supported")
        return values.astype(np.uint16)
    if image.mode == "F":
        raise ValueError(f"{what} {str(path)!r}: a floating-point (mode F) image; only 8- and 16-bit images "
                         "are supported")
    return None


def load_photo(path, what: str = "IMAGE") -> np.ndarray:
    """The photo as a C-contiguous [H, W, 3] uint8 RGB array: alpha dropped, grey replicated, 16-bit grey scaled
    to 8 bits by value."""
    image = open_image(path, what)
    grey = _grey_values(image, path, what)
    if grey is not None:
        eight = ((grey.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)
        return np.ascontiguousarray(np.repeat(eight[..., None], 3, axis=-1))
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def load_annotation(path, what: str = "ANNO") -> np.ndarray:
    """The annotation as [H, W, 3] uint8 RGB (fully transparent pixels black, i.e. unknown), or, for a 16-bit
    greyscale file, as its [H, W] uint16 values (0 is unknown there)."""
    image = open_image(path, what)
    grey = _grey_values(image, path, what)
    if grey is not None:
        return np.ascontiguousarray(grey)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint8)
        rgb = np.array(rgba[..., :3])
        rgb[rgba[..., 3] == 0] = 0
        return rgb
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def list_images(folder, exts: Sequence[str] = IMAGE_EXTS) -> list[Path]:
    """The files of ``folder`` (not its subfolders, not hidden) whose extension is in ``exts``, sorted."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts)


def same_file(a, b) -> bool:
    """Whether ``a`` and ``b`` both exist and are the same file or folder."""
    try:
        return Path(a).exists() and Path(b).exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path) -> Iterator:
    """``with atomic_write(path) as f: f.write(...)``: ``f`` is a temporary file beside ``path``, renamed over it
    when the block completes and removed when it raises. The file gets a new file's usual mode
    (``0o666 & ~umask``; ``mkstemp`` would leave it 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        tmp = None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _image_format(path: Path) -> str:
    from PIL import Image

    Image.init()
    return Image.registered_extensions().get(path.suffix.lower(), "PNG")


def save_image(arr: np.ndarray, path, what: str = "image") -> None:
    """Writes ``arr`` ([H, W, 3] uint8 RGB, [H, W] uint8 grey or [H, W] uint16 16-bit grey) atomically, in the
    format of ``path``'s extension (PNG when unknown). OSError / ValueError, naming the file, on failure."""
    from PIL import Image

    path = Path(path)
    try:
        image = Image.fromarray(arr)
        with atomic_write(path) as f:
            image.save(f, format=_image_format(path))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise OSError(f"cannot write {what} {str(path)!r}: {exc}") from None


def save_palette_png(labels: np.ndarray, palette: np.ndarray, path, what: str = "labels") -> None:
    """Writes [H, W] labels (0..255) as a palette ('P' mode) PNG with ``palette`` ([256, 3] uint8), atomically."""
    from PIL import Image

    path = Path(path)
    image = Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="P")
    image.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    try:
        with atomic_write(path) as f:
            image.save(f, format="PNG")
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot write {what} {str(path)!r}: {exc}") from None


def save_checkpoint(obj, path) -> None:
    """``torch.save(obj)`` to ``path``, atomically."""
    import torch

    with atomic_write(path) as f:
        torch.save(obj, f)


# ---------------------------------------------------------------------------------------------------------
# Volumes


class Volume(NamedTuple):
    """A volume read by :func:`load_volume`: ``data`` (the array, float32 for NIfTI files: scaling applied),
    ``spacing`` (the voxel size along the first three axes in the file's units, mm for NIfTI; None for .npy) and
    ``nifti`` (the nibabel image, for its affine and header; None for .npy)."""

    data: np.ndarray
    spacing: tuple | None
    nifti: Any


def volume_format(path) -> str | None:
    """"nifti", "npy" or None, from the file name (``.nii``, ``.nii.gz``, ``.npy``, any case)."""
    name = Path(path).name.lower()
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return "nifti"
    if name.endswith(".npy"):
        return "npy"
    return None


def _nibabel(path, what: str):
    try:
        import nibabel
    except ImportError:
        raise ImportError(f"{what} {str(path)!r}: NIfTI files need nibabel (pip install nibabel, or the package's "
                          "[test] extra); .npy volumes do not") from None
    return nibabel


def load_volume(path, what: str = "volume") -> Volume:
    """Reads a NIfTI (``.nii``, ``.nii.gz``) or NumPy (``.npy``) volume.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a folder, an unknown extension, a file that is not a readable volume (corrupt, truncated, a
            pickled object array), a NIfTI file without data.
        ImportError: a NIfTI file without nibabel installed.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r}: no such file")
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a folder, expected a volume file ({', '.join(VOLUME_EXTS)})")
    kind = volume_format(path)
    if kind is None:
        raise ValueError(f"{what} {str(path)!r}: unknown volume format; use {', '.join(VOLUME_EXTS)}")
    if kind == "npy":
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise ValueError(f"{what} {str(path)!r}: not a NumPy .npy array ({exc})") from None
        if data.dtype.kind not in "biuf":
            raise ValueError(f"{what} {str(path)!r}: a {data.dtype} array; expected numbers")
        return Volume(data, None, None)
    nibabel = _nibabel(path, what)
    try:
        image = nibabel.load(str(path))
        data = image.get_fdata(dtype=np.float32)
    except Exception as exc:  # nibabel raises many types on corrupt files (ImageFileError, EOFError, zlib errors)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{what} {str(path)!r}: not a NIfTI volume nibabel can read ({first})") from None
    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    return Volume(data, spacing, image)


def save_volume(arr: np.ndarray, path, what: str = "volume", like: Volume | None = None,
                spacing: Sequence[float] | None = None) -> None:
    """Writes ``arr`` to ``path`` (``.nii``, ``.nii.gz`` or ``.npy``), atomically. A NIfTI file takes the affine
    and header of ``like`` when it is a NIfTI volume (its data type, shape and scaling set for ``arr``), else an
    affine from ``spacing`` (default 1). OSError / ValueError naming the file on failure."""
    path = Path(path)
    kind = volume_format(path)
    if kind is None:
        raise ValueError(f"{what} {str(path)!r}: unknown volume format; use {', '.join(VOLUME_EXTS)}")
    try:
        if kind == "npy":
            with atomic_write(path) as f:
                np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
            return
        nibabel = _nibabel(path, what)
        if like is not None and like.nifti is not None:
            header = like.nifti.header.copy()
            header.set_data_dtype(arr.dtype)
            header.set_slope_inter(None, None)
            image = type(like.nifti)(arr, like.nifti.affine, header)
        else:
            zooms = list(spacing) if spacing is not None else [1.0, 1.0, 1.0]
            image = nibabel.Nifti1Image(arr, np.diag(zooms[:3] + [1.0]))
            image.header.set_xyzt_units("mm")
        data = image.to_bytes()
        if path.name.lower().endswith(".gz"):
            import gzip

            data = gzip.compress(data, compresslevel=6)
        with atomic_write(path) as f:
            f.write(data)
    except (OSError, ValueError, TypeError) as exc:
        raise OSError(f"cannot write {what} {str(path)!r}: {exc}") from None
