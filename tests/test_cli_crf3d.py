"""``deeplab-fast crf3d``: the volumetric dense CRF on NIfTI and .npy volumes. A NIfTI round trip keeps the image's
affine and header (spacing from its zooms) and gives the labels of dense_crf_3d; bad files and arguments give one
error line naming the argument; outputs are written atomically (a failed run leaves an existing OUT alone)."""
from __future__ import annotations

import gzip
import importlib
import re
import sys

import numpy as np
import pytest
import torch

from deeplab_fast.cli import main
from deeplab_fast.data import synthetic_volume
from deeplab_fast.ops import dense_crf_3d

nib = pytest.importorskip("nibabel", reason="NIfTI needs nibabel (a test extra)")

SHAPE = (14, 18, 10)  # X, Y, Z as stored
ZOOMS = (0.9, 0.8, 2.5)


def _affine() -> np.ndarray:
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(ZOOMS)
    aff[:3, 3] = (-60.0, 12.5, 30.0)
    return aff


def _write_case(folder, labels=3, channels=1, seed=0):
    """An MR-like image (int16 with a scale factor, as scanners write them) and its probabilities [X, Y, Z, L]."""
    v = synthetic_volume(SHAPE, labels, channels, seed=seed)
    paths = []
    for k in range(channels):
        img = nib.Nifti1Image(v.image[k].astype(np.int16) * 2, _affine())
        hdr = img.header
        hdr.set_xyzt_units("mm", "sec")
        hdr["descrip"] = b"synthetic T1"
        img.set_qform(_affine(), code=1)
        img.set_sform(_affine(), code=2)
        hdr.set_slope_inter(0.5, 0.0)  # stored as 2 * value, scaled back by 0.5 on reading
        paths.append(folder / f"t{k}.nii.gz")
        nib.save(img, str(paths[-1]))
    prob = folder / "prob.nii.gz"
    nib.save(nib.Nifti1Image(np.moveaxis(v.probabilities, 0, -1).astype(np.float32), _affine()), str(prob))
    return v, paths, prob


def _expected_labels(v, channels, **kw):
    unary = -torch.log(torch.from_numpy(v.probabilities).clamp(min=1e-5))
    q = dense_crf_3d(unary[None], torch.from_numpy(v.image.astype(np.float32))[None], spacing=ZOOMS, **kw)
    return q[0].argmax(0).numpy()


def _run(argv, capsys):
    code = main(["crf3d", *map(str, argv), "--no-progress", "--threads", "1"])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("deeplab-fast crf3d: error: "), err
    return lines[0]


def test_nifti_round_trip_keeps_affine_and_header(tmp_path, capsys):
    v, images, prob = _write_case(tmp_path)
    out, pout = tmp_path / "seg.nii.gz", tmp_path / "refined.nii"
    code, stdout, err = _run([*images, prob, out, "--prob-out", pout], capsys)
    assert code == 0, err
    assert "spacing 0.9x0.8x2.5" in stdout and "3 labels" in stdout
    src, seg, refined = nib.load(str(images[0])), nib.load(str(out)), nib.load(str(pout))
    assert np.array_equal(seg.affine, src.affine) and np.array_equal(refined.affine, src.affine)
    for key in src.header:
        if key in ("datatype", "bitpix", "dim", "scl_slope", "scl_inter", "cal_min", "cal_max", "vox_offset"):
            continue
        if key == "pixdim":  # the spatial zooms are kept; a 4-D output has its own 4th
            np.testing.assert_array_equal(seg.header[key][:4], src.header[key][:4])
            continue
        np.testing.assert_array_equal(np.asarray(seg.header[key]), np.asarray(src.header[key]), err_msg=key)
    assert seg.header.get_zooms() == src.header.get_zooms()
    assert seg.get_data_dtype() == np.uint8 and seg.shape == SHAPE
    assert seg.header["descrip"] == b"synthetic T1" and int(seg.header["sform_code"]) == 2
    labels = np.asarray(seg.dataobj)
    np.testing.assert_array_equal(labels, _expected_labels(v, 1))
    assert (labels == v.truth).mean() > (v.probabilities.argmax(0) == v.truth).mean()
    q = refined.get_fdata(dtype=np.float32)
    assert q.shape == SHAPE + (3,) and refined.get_data_dtype() == np.float32
    np.testing.assert_allclose(q.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(q.argmax(-1), labels)


def test_options_and_two_modalities(tmp_path, capsys):
    v, images, prob = _write_case(tmp_path, labels=2, channels=2, seed=1)
    out = tmp_path / "seg.nii"
    code, _, err = _run([*images, prob, out, "--iterations", "3", "--gaussian-sigma", "2,3,4", "--bilateral-sigma",
                         "6", "--intensity-sigma", "4,9", "--gaussian-compat", "2", "--bilateral-compat", "6",
                         "--spacing", "1,1,2"], capsys)
    assert code == 0, err
    unary = -torch.log(torch.from_numpy(v.probabilities).clamp(min=1e-5))
    q = dense_crf_3d(unary[None], torch.from_numpy(v.image.astype(np.float32))[None], spacing=(1, 1, 2),
                     gaussian_sigma=(2, 3, 4), bilateral_sigma=6, intensity_sigma=(4, 9), gaussian_compat=2,
                     bilateral_compat=6, iterations=3)
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), q[0].argmax(0).numpy())


def test_npy_volumes_and_a_foreground_probability(tmp_path, capsys):
    v = synthetic_volume(SHAPE, 2, 1, seed=2)
    np.save(tmp_path / "img.npy", v.image[0])
    np.save(tmp_path / "fg.npy", v.probabilities[1])  # [X, Y, Z]: the foreground probability
    out = tmp_path / "seg.npy"
    code, _, err = _run([tmp_path / "img.npy", tmp_path / "fg.npy", out, "--spacing", "0.9,0.8,2.5"], capsys)
    assert code == 0, err
    labels = np.load(out)
    p = torch.from_numpy(np.stack([1 - v.probabilities[1], v.probabilities[1]]))
    q = dense_crf_3d(-torch.log(p.clamp(min=1e-5))[None], torch.from_numpy(v.image.astype(np.float32))[None],
                     spacing=ZOOMS)
    np.testing.assert_array_equal(labels, q[0].argmax(0).numpy())
    # .npy in, NIfTI out: an affine from the spacing
    code, _, err = _run([tmp_path / "img.npy", tmp_path / "fg.npy", tmp_path / "seg.nii.gz", "--spacing", "2,1,1"],
                        capsys)
    assert code == 0, err
    assert np.allclose(nib.load(str(tmp_path / "seg.nii.gz")).affine, np.diag([2.0, 1.0, 1.0, 1.0]))


def test_intensity_range_and_the_units_warning(tmp_path, capsys):
    v = synthetic_volume(SHAPE, 2, 1, seed=3)
    hu = v.image[0].astype(np.float32) * 8 - 1000  # CT-like values
    np.save(tmp_path / "ct.npy", hu)
    np.save(tmp_path / "p.npy", np.moveaxis(v.probabilities, 0, -1))
    code, _, err = _run([tmp_path / "ct.npy", tmp_path / "p.npy", tmp_path / "a.npy"], capsys)
    assert code == 0 and "warning: IMAGE intensities range from" in err
    code, _, err = _run([tmp_path / "ct.npy", tmp_path / "p.npy", tmp_path / "b.npy", "--intensity-range", "-1000",
                         "1040"], capsys)
    assert code == 0 and "warning" not in err, err
    # -1000..1040 mapped to 0..255 is the 8-bit image back (8 HU per level), up to float rounding
    unary = -torch.log(torch.from_numpy(v.probabilities).clamp(min=1e-5))
    q = dense_crf_3d(unary[None], torch.from_numpy(v.image.astype(np.float32))[None])
    assert (np.load(tmp_path / "b.npy") == q[0].argmax(0).numpy()).mean() > 0.999


def test_bad_files_and_arguments(tmp_path, capsys):
    v, images, prob = _write_case(tmp_path, labels=2)
    img = images[0]
    (tmp_path / "garbage.nii.gz").write_bytes(b"not a nifti file at all" * 40)
    (tmp_path / "truncated.nii.gz").write_bytes(img.read_bytes()[:300])
    (tmp_path / "plain.nii.gz").write_bytes(gzip.compress(b"\0" * 500))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "text.npy").write_text("hello")
    np.save(tmp_path / "logits.npy", np.full(SHAPE + (2,), 5.0, np.float32))
    np.save(tmp_path / "small.npy", np.zeros((4, 4, 4, 2), np.float32))
    np.save(tmp_path / "flat.npy", np.zeros((14, 18), np.float32))
    (tmp_path / "scan.png").write_bytes(b"x")
    cases = [
        ([tmp_path / "missing.nii.gz", prob], "IMAGE .*missing.nii.gz.*: no such file"),
        ([tmp_path / "garbage.nii.gz", prob], "IMAGE .*garbage.nii.gz.*not a NIfTI volume nibabel can read"),
        ([tmp_path / "truncated.nii.gz", prob], "IMAGE .*truncated.nii.gz.*not a NIfTI volume"),
        ([tmp_path / "plain.nii.gz", prob], "IMAGE .*plain.nii.gz.*not a NIfTI volume"),
        ([tmp_path / "objects.npy", prob], "IMAGE .*objects.npy.*not a NumPy .npy array"),
        ([tmp_path / "text.npy", prob], "IMAGE .*text.npy.*not a NumPy .npy array"),
        ([tmp_path / "scan.png", prob], "IMAGE .*scan.png.*unknown volume format"),
        ([tmp_path, prob], "IMAGE .* is a folder"),
        ([tmp_path / "flat.npy", prob], "IMAGE .*flat.npy.*expected a 3-D volume"),
        ([img, tmp_path / "logits.npy"], "PROB .*logits.npy.*values from 5 to 5; expected probabilities"),
        ([img, tmp_path / "small.npy"], r"PROB .*small.npy.* has the volume shape \(4, 4, 4\)"),
        ([img, tmp_path / "garbage.nii.gz"], "PROB .*garbage.nii.gz.*not a NIfTI volume"),
    ]
    for inputs, match in cases:
        code, _, err = _run([*inputs, tmp_path / "out.nii.gz"], capsys)
        assert code == 2, (inputs, err)
        assert re.search(match, _one_error_line(err)), (match, err)
    for extra, match in [
        ([tmp_path / "out.png"], "OUT .*out.png.*unknown volume format"),
        ([tmp_path / "no" / "out.nii"], "folder .* does not exist"),
        ([img], "is the same file as the input"),
        ([tmp_path / "o.nii", "--prob-out", tmp_path / "o.nii"], "--prob-out .* is the same file as OUT"),
        ([tmp_path / "o.nii", "--gaussian-sigma", "1,2"], "--gaussian-sigma: give one value or three"),
        ([tmp_path / "o.nii", "--intensity-sigma", "1,2,3"], "--intensity-sigma: give one value or one per channel"),
        ([tmp_path / "o.nii", "--intensity-range", "5", "1"], "--intensity-range 5 1: MIN must be below MAX"),
        ([tmp_path / "o.nii", "--bilateral-sigma", "1e-9"], "bilateral_sigma along axis D is too small"),
    ]:
        code, _, err = _run([img, prob, *extra], capsys)
        assert code == 2, (extra, err)
        assert re.search(match, _one_error_line(err)), (match, err)
    code, _, err = _run([img, prob, tmp_path / "o.nii", "--spacing", "1,2"], capsys)  # argparse's own message
    assert code == 2 and "argument --spacing: expected three comma-separated sizes" in err


def test_memory_error_exits_1_and_keeps_an_existing_out(tmp_path, capsys, monkeypatch):
    v, images, prob = _write_case(tmp_path, labels=2)
    out = tmp_path / "seg.nii.gz"
    out.write_bytes(b"previous result")
    monkeypatch.setattr(importlib.import_module("deeplab_fast.ops.dense_crf_3d"), "_available_bytes",
                        lambda device: 1000)
    code, _, err = _run([*images, prob, out], capsys)
    assert code == 1 and "need about" in _one_error_line(err) and "GB are available" in err
    assert out.read_bytes() == b"previous result"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".seg")]  # no temporary left


def test_without_nibabel(tmp_path, capsys, monkeypatch):
    v, images, prob = _write_case(tmp_path, labels=2)
    monkeypatch.setitem(sys.modules, "nibabel", None)  # import nibabel raises ImportError
    code, _, err = _run([*images, prob, tmp_path / "o.nii.gz"], capsys)
    assert code == 1 and "NIfTI files need nibabel" in _one_error_line(err)
