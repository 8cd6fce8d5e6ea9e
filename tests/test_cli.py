"""The ``deeplab-fast`` command-line tool (deeplab_fast/cli/crf.py and the shared parts of deeplab_fast/cli/).

``crf`` must reproduce pydensecrf's examples/inference.py pixel for pixel on the real photos of
../shared/data/densecrf (out1/out2/out3.png; out1-b.png comes from older code and is not reproducible).
"""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deeplab_fast.cli import main

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "densecrf"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir() -> Path:
    if not all((DATA / f"{kind}{k}.png").exists() for kind in ("im", "anno", "out") for k in (1, 2, 3)):
        pytest.skip(f"shared test data (im/anno/out 1-3) not found at {DATA}")
    return DATA


def rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def colours(arr: np.ndarray) -> set:
    return {tuple(c) for c in np.unique(arr.reshape(-1, 3), axis=0)}


def run(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_crf_reproduces_pydensecrf_example(data_dir, tmp_path, capsys, k):
    out = tmp_path / f"out{k}.png"
    assert run("crf", data_dir / f"im{k}.png", data_dir / f"anno{k}.png", out) == 0
    result, expected = rgb(out), rgb(data_dir / f"out{k}.png")
    assert result.shape == expected.shape == rgb(data_dir / f"im{k}.png").shape
    mismatched = int((result != expected).any(axis=-1).sum())
    assert mismatched == 0, f"{mismatched} pixels differ from out{k}.png"
    printed = capsys.readouterr().out
    assert "time:" in printed and " s" in printed


def test_crf_overlay(data_dir, tmp_path):
    out, overlay = tmp_path / "out.png", tmp_path / "overlay.png"
    assert run("crf", data_dir / "im1.png", data_dir / "anno1.png", out, "--overlay", overlay) == 0
    photo = rgb(data_dir / "im1.png")
    ov = rgb(overlay)
    h, w = photo.shape[:2]
    assert ov.shape[0] == h and ov.shape[1] >= 3 * w
    np.testing.assert_array_equal(ov[:, :w], photo)  # the first panel is the photo


def test_crf_without_black_uses_every_colour_as_label(data_dir, tmp_path):
    # anno1-b has no black pixel: both colours are labels (zero_unsure=False), none is "unknown".
    out = tmp_path / "out.png"
    assert run("crf", data_dir / "im1.png", data_dir / "anno1-b.png", out) == 0
    anno_colours = colours(rgb(data_dir / "anno1-b.png"))
    assert (0, 0, 0) not in anno_colours
    assert colours(rgb(out)) == anno_colours


def test_transparent_annotation_pixels_are_unknown(data_dir, tmp_path):
    anno = rgb(data_dir / "anno1.png")
    black = (anno == 0).all(axis=-1)
    rgba = np.dstack([anno, np.where(black, 0, 255).astype(np.uint8)])
    rgba[black, :3] = (200, 10, 10)  # junk colour under full transparency
    Image.fromarray(rgba).save(tmp_path / "anno.png")
    out = tmp_path / "out.png"
    assert run("crf", data_dir / "im1.png", tmp_path / "anno.png", out) == 0
    np.testing.assert_array_equal(rgb(out), rgb(data_dir / "out1.png"))


def test_threads_do_not_change_the_result(data_dir, tmp_path):
    before = torch.get_num_threads()
    a, b = tmp_path / "default.png", tmp_path / "one.png"
    assert run("crf", data_dir / "im2.png", data_dir / "anno2.png", a) == 0
    assert run("crf", data_dir / "im2.png", data_dir / "anno2.png", b, "--threads", "1") == 0
    np.testing.assert_array_equal(rgb(a), rgb(b))
    assert torch.get_num_threads() == before  # main() restores the thread count


def test_folder_mode(data_dir, tmp_path, capsys):
    images, annos, outs = tmp_path / "images", tmp_path / "annos", tmp_path / "out" / "nested"
    images.mkdir()
    annos.mkdir()
    shutil.copy(data_dir / "im1.png", images / "first.png")
    shutil.copy(data_dir / "im2.png", images / "second.png")
    shutil.copy(data_dir / "im3.png", images / "lonely.png")  # no annotation
    shutil.copy(data_dir / "anno1.png", annos / "first.png")
    shutil.copy(data_dir / "anno2.png", annos / "second.png")
    (images / "notes.txt").write_text("not an image")

    assert run("crf", images, annos, outs) == 0
    assert sorted(p.name for p in outs.iterdir()) == ["first.png", "second.png"]
    np.testing.assert_array_equal(rgb(outs / "first.png"), rgb(data_dir / "out1.png"))
    np.testing.assert_array_equal(rgb(outs / "second.png"), rgb(data_dir / "out2.png"))
    captured = capsys.readouterr()
    assert "lonely.png" in captured.err and "no annotation" in captured.err
    assert "refined 2 of 3 images" in captured.out and "time:" in captured.out


def test_folder_mode_reports_a_bad_pair_and_goes_on(data_dir, tmp_path, capsys):
    images, annos, outs = tmp_path / "images", tmp_path / "annos", tmp_path / "out"
    images.mkdir()
    annos.mkdir()
    shutil.copy(data_dir / "im1.png", images / "good.png")
    shutil.copy(data_dir / "im2.png", images / "bad.png")
    shutil.copy(data_dir / "anno1.png", annos / "good.png")
    shutil.copy(data_dir / "anno1.png", annos / "bad.png")  # 320x240 annotation for a 320x213 photo
    assert run("crf", images, annos, outs) == 1
    assert [p.name for p in outs.iterdir()] == ["good.png"]
    err = capsys.readouterr().err
    assert "bad.png" in err and "320x240" in err and "320x213" in err


def test_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run("demo") == 0
    result, overlay = tmp_path / "crf_demo_result.png", tmp_path / "crf_demo_overlay.png"
    assert result.is_file() and overlay.is_file()
    from importlib import resources

    assets = resources.files("deeplab_fast.assets")
    with resources.as_file(assets / "example.png") as p:
        photo = rgb(p)
    with resources.as_file(assets / "example_anno.png") as p:
        anno = rgb(p)
    res = rgb(result)
    assert res.shape == photo.shape
    assert colours(res) <= colours(anno) - {(0, 0, 0)}
    assert len(colours(res)) >= 2
    assert rgb(overlay).shape[0] == photo.shape[0]
    assert "time:" in capsys.readouterr().out


def test_bundled_assets_and_licence():
    from importlib import resources

    assets = resources.files("deeplab_fast.assets")
    licence = (assets / "LICENSE-pydensecrf-example.txt").read_text()
    assert "Lucas Beyer" in licence and "MIT" in licence and "Permission is hereby granted" in licence
    if DATA.is_dir():
        assert (assets / "example.png").read_bytes() == (DATA / "im1.png").read_bytes()
        assert (assets / "example_anno.png").read_bytes() == (DATA / "anno1.png").read_bytes()


def test_python_m_help(tmp_path):
    # Run from an empty folder, so that the installed package is imported, never the source tree.
    for argv in (["--help"], ["crf", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "deeplab_fast", *argv], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        if argv == ["--help"]:
            assert "crf" in proc.stdout and "demo" in proc.stdout
        else:
            assert "--gt-prob" in proc.stdout and "--threads" in proc.stdout


def test_help_and_no_command_return_codes(capsys):
    assert run("--help") == 0
    assert "crf" in capsys.readouterr().out
    assert run() == 2
    assert run("frobnicate") == 2


def _expect_error(capsys, argv, *needles):
    assert run(*argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return err


def test_missing_files(data_dir, tmp_path, capsys):
    out = tmp_path / "out.png"
    _expect_error(capsys, ["crf", tmp_path / "nope.png", data_dir / "anno1.png", out], "IMAGE", "nope.png")
    _expect_error(capsys, ["crf", data_dir / "im1.png", tmp_path / "nope.png", out], "ANNO", "nope.png")
    _expect_error(capsys, ["crf", data_dir / "im1.png", data_dir / "anno1.png", tmp_path / "no" / "out.png"],
                  "OUT", "does not exist")
    assert not out.exists()


def test_size_mismatch(data_dir, tmp_path, capsys):
    out = tmp_path / "out.png"
    _expect_error(capsys, ["crf", data_dir / "im1.png", data_dir / "anno2.png", out],
                  "ANNO", "IMAGE", "320x213", "320x240")
    assert not out.exists()


def test_bad_annotations_and_images(data_dir, tmp_path, capsys):
    out = tmp_path / "out.png"
    one = np.zeros((240, 320, 3), np.uint8)
    one[:50] = (255, 0, 0)
    Image.fromarray(one).save(tmp_path / "one_label.png")
    _expect_error(capsys, ["crf", data_dir / "im1.png", tmp_path / "one_label.png", out], "ANNO", "at least 2")
    noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    _expect_error(capsys, ["crf", data_dir / "im1.png", tmp_path / "noise.png", out], "ANNO", "--max-labels")
    (tmp_path / "text.png").write_text("not an image")
    _expect_error(capsys, ["crf", tmp_path / "text.png", data_dir / "anno1.png", out], "IMAGE", "text.png")
    _expect_error(capsys, ["crf", data_dir / "im1.png", data_dir / "anno1.png", tmp_path / "out.xyz"],
                  "OUT", ".xyz")
    assert not out.exists()


def test_bad_options(data_dir, tmp_path, capsys):
    base = ["crf", data_dir / "im1.png", data_dir / "anno1.png", tmp_path / "out.png"]
    _expect_error(capsys, base + ["--gt-prob", "1.5"], "--gt-prob")
    _expect_error(capsys, base + ["--threads", "0"], "--threads")
    _expect_error(capsys, base + ["--iterations", "-1"], "--iterations")
    _expect_error(capsys, base + ["--bilateral-srgb", "nan"], "--bilateral-srgb")


def test_refuses_to_overwrite_an_input(data_dir, tmp_path, capsys):
    anno = tmp_path / "anno.png"
    shutil.copy(data_dir / "anno1.png", anno)
    before = anno.read_bytes()
    _expect_error(capsys, ["crf", data_dir / "im1.png", anno, anno], "OUT", "input")
    assert anno.read_bytes() == before
