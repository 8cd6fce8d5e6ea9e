"""``deeplab-fast segment`` and ``deeplab-fast bench`` (deeplab_fast/cli/segment.py), on small inputs.

The checkpoints are state dicts saved from deeplab_fast.models with seeded random weights; the expected labels
are computed independently by running the same model on the same preprocessed input.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deeplab_fast import models
from deeplab_fast.cli import main
from deeplab_fast.data import colorize, voc_palette
from deeplab_fast.models import preprocess

NUM_CLASSES = 5


def run(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def v3_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = models.get_model("deeplab_v3_resnet50", num_classes=NUM_CLASSES).eval()
    path = tmp_path_factory.mktemp("ckpt") / "v3.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    g = np.random.default_rng(0)
    for k, (h, w) in enumerate([(41, 53), (41, 53), (37, 29)]):
        # Smooth colour fields, not noise: something a CRF can work on.
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(yy * 5 + k * 40) % 256, (xx * 4) % 256, ((yy + xx) * 3) % 256], -1).astype(np.uint8)
        img = np.clip(img.astype(int) + g.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"im{k}.png")
    return folder


def expected_labels(checkpoint: Path, image_path: Path, name="deeplab_v3_resnet50") -> np.ndarray:
    model = models.get_model(name, num_classes=NUM_CLASSES)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    rgb = np.asarray(Image.open(image_path).convert("RGB"))
    with torch.no_grad():
        out = model.eval()(preprocess(rgb[None], name))
    out = out["out"] if isinstance(out, dict) else out
    return out.argmax(1)[0].numpy()


def test_voc_palette():
    p = voc_palette()
    assert p.shape == (256, 3) and p.dtype == np.uint8
    # The VOC devkit's first colours: background, aeroplane, bicycle, bird, boat.
    assert p[:5].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    assert p[255].tolist() == [224, 224, 192]
    assert colorize(np.array([[1, 2]])).tolist() == [[[128, 0, 0], [0, 128, 0]]]


def test_segment_folder_writes_labels_and_overlays(v3_checkpoint, photos, tmp_path, capsys):
    out = tmp_path / "out"
    rc = run("segment", photos, "--model", "deeplab_v3_resnet50", "--weights", v3_checkpoint, "--out", out,
             "--device", "cpu", "--batch", "2")
    assert rc == 0
    text = capsys.readouterr().out
    for k in range(3):
        labels_png = Image.open(out / f"im{k}.png")
        assert labels_png.mode == "P"
        labels = np.asarray(labels_png)
        ref = expected_labels(v3_checkpoint, photos / f"im{k}.png")
        assert labels.shape == ref.shape
        assert np.array_equal(labels, ref), f"im{k}: {np.mean(labels != ref):.4f} of the pixels differ"
        assert len(np.unique(labels)) >= 1 and labels.max() < NUM_CLASSES
        overlay = np.asarray(Image.open(out / f"im{k}_overlay.png").convert("RGB"))
        photo = np.asarray(Image.open(photos / f"im{k}.png").convert("RGB"))
        blend = np.round(0.5 * photo.astype(np.float32) + 0.5 * colorize(labels).astype(np.float32))
        assert np.abs(overlay.astype(int) - blend.astype(int)).max() <= 1
        assert f"im{k}.png:" in text and "network" in text
    assert "3 image(s) on cpu" in text


def test_segment_with_crf_reports_crf_time(v3_checkpoint, photos, tmp_path, capsys):
    out = tmp_path / "crf"
    assert run("segment", photos / "im2.png", "--model", "deeplab_v3_resnet50", "--weights", v3_checkpoint,
               "--out", out, "--device", "cpu", "--crf", "deeplab_v2_voc") == 0
    text = capsys.readouterr().out
    assert "CRF" in text
    labels = np.asarray(Image.open(out / "im2.png"))
    assert labels.shape == (37, 29) and labels.max() < NUM_CLASSES


def test_segment_without_weights_explains(photos, capsys):
    assert run("segment", photos / "im0.png") == 2
    err = capsys.readouterr().err
    assert "--weights is required" in err and "torchvision" in err and "kazuto1011" in err


def test_segment_missing_weights_file(photos, tmp_path, capsys):
    missing = tmp_path / "nope.pth"
    assert run("segment", photos / "im0.png", "--weights", missing, "--out", tmp_path / "o") == 2
    assert str(missing) in capsys.readouterr().err


def test_segment_wrong_architecture(photos, tmp_path, capsys):
    torch.manual_seed(0)
    v1 = models.get_model("deeplab_v1_largefov", num_classes=NUM_CLASSES)
    path = tmp_path / "v1.pth"
    torch.save(v1.state_dict(), path)
    assert run("segment", photos / "im0.png", "--model", "deeplab_v3_resnet50", "--weights", path,
               "--out", tmp_path / "o", "--device", "cpu") == 2
    err = capsys.readouterr().err
    assert "does not fit --model deeplab_v3_resnet50" in err


def test_segment_bad_arguments(v3_checkpoint, photos, tmp_path, capsys):
    assert run("segment", photos / "im0.png", "--weights", v3_checkpoint, "--model", "resnet9000") == 2
    assert "--model: invalid choice: 'resnet9000'" in capsys.readouterr().err
    assert run("segment", photos / "im0.png", "--weights", v3_checkpoint, "--crf", "nope") == 2
    assert "--crf: invalid choice: 'nope'" in capsys.readouterr().err
    assert run("segment", tmp_path / "missing.png", "--weights", v3_checkpoint) == 2
    assert "no such file" in capsys.readouterr().err


def test_segment_grey_image_is_made_rgb(v3_checkpoint, tmp_path):
    grey = tmp_path / "grey.png"
    Image.fromarray((np.arange(31 * 27).reshape(31, 27) % 256).astype(np.uint8), mode="L").save(grey)
    assert run("segment", grey, "--model", "deeplab_v3_resnet50", "--weights", v3_checkpoint,
               "--out", tmp_path / "o", "--device", "cpu") == 0
    assert np.asarray(Image.open(tmp_path / "o" / "grey.png")).shape == (31, 27)


def test_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert run("bench", "--models", "deeplab_v1_largefov", "deeplab_v2_resnet101", "--size", "33", "--batch", "1",
               "--repeat", "1", "--device", "cpu", "--json", out) == 0
    text = capsys.readouterr().out
    assert "device:" in text
    rows = json.loads(out.read_text())
    assert "device" in rows and rows["rows"]
    impls = {(r["model"], r["impl"]) for r in rows["rows"]}
    assert ("deeplab_v1_largefov", "deeplab_fast (optimize)") in impls
    assert ("deeplab_v1_largefov", "plain torch (same architecture)") in impls
    assert ("deeplab_v2_resnet101", "deeplab_fast + dense CRF") in impls
    assert all(r["images_per_s"] > 0 for r in rows["rows"])


def test_bench_cpu_defaults_batch_1_three_calls(tmp_path, capsys):
    """On the CPU, bench defaults to batch 1 and 3 timed calls (about a minute per model at 513 on 2 cores)."""
    out = tmp_path / "bench.json"
    assert run("bench", "--models", "deeplab_v1_largefov", "--size", "33", "--device", "cpu", "--json", out) == 0
    text = capsys.readouterr().out
    assert "batch 1, 3 timed calls per row after a warm-up (--batch 1 16 adds the batch-16 rows)" in text
    doc = json.loads(out.read_text())
    assert doc["batches"] == [1] and doc["repeat"] == 3
    assert {r["batch"] for r in doc["rows"]} == {1}


def test_bench_counts_calls_for_the_progress_bar():
    from deeplab_fast.benchmark import bench_forms, bench_rows

    calls = []
    rows = bench_rows("deeplab_v2_resnet101", 33, 1, torch.device("cpu"), torch.float32, repeat=2, crf=True,
                      on_call=lambda: calls.append(1))
    forms = bench_forms("deeplab_v2_resnet101", crf=True)
    assert [r["impl"] for r in rows] == forms and len(calls) == len(forms) * (2 + 1)


def test_bench_torchvision_column(tmp_path, capsys, monkeypatch):
    """torchvision's DeepLabV3 is measured where it loads; where it does not, its row says why (never silently
    missing)."""
    out = tmp_path / "bench.json"
    assert run("bench", "--models", "deeplab_v3_resnet50", "--size", "33", "--repeat", "1", "--device", "cpu",
               "--json", out) == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["torchvision"]["images_per_s"] > 0
    capsys.readouterr()
    import deeplab_fast.benchmark as bench

    monkeypatch.setattr(bench, "load_torchvision", lambda python_only=False: (None, "not installed (install it)"))
    assert run("bench", "--models", "deeplab_v3_resnet50", "--size", "33", "--repeat", "1", "--device", "cpu",
               "--json", out) == 0
    text = capsys.readouterr().out
    assert "torchvision: not installed (install it)" in text
    assert "torchvision                        not measured: torchvision not installed (install it)" in text
    doc = json.loads(out.read_text())
    skipped = [r for r in doc["rows"] if r["impl"] == "torchvision"]
    assert doc["torchvision"] == "not installed (install it)"
    assert skipped and skipped[0]["median_s"] is None and "not installed" in skipped[0]["skipped"]


def test_bench_bad_arguments(capsys):
    assert run("bench", "--models", "nope", "--device", "cpu") == 2
    assert "--models: invalid choice: 'nope'" in capsys.readouterr().err
    assert run("bench", "--dtype", "bf16", "--device", "cpu", "--models", "deeplab_v1_largefov") == 2
    assert "bf16" in capsys.readouterr().err
