"""Bad files and extreme options give one clean error line, never a traceback or a warning (issue 14, items 5-7):
checkpoints that are not checkpoints (text, truncated, mutated, a pickle that would run code, a plain state dict
given to --resume), 16-bit images, standard deviations that underflow float32; and the files the commands write
get a normal mode."""
from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deeplab_fast import models
from deeplab_fast.cli import main
from deeplab_fast.data import make_synthetic_voc

TINY = {"width_divisor": 8}
MODEL = "deeplab_v1_largefov"


def _valid_checkpoint() -> bytes:
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(models.get_model(MODEL, num_classes=3, **TINY).state_dict(), buf)
    return buf.getvalue()


# A pickle whose loading would call os.getcwd() (harmless, but code all the same): weights_only refuses it.
_MALICIOUS = b"\x80\x02cos\ngetcwd\nq\x00)Rq\x01."


def _bad_files(folder: Path) -> dict:
    good = _valid_checkpoint()
    files = {
        "text.pth": b"e" * 101 + b" this is a text file, not a checkpoint\n",
        "empty.pth": b"",
        "truncated.pth": good[: len(good) // 3],
        "malicious.pth": _MALICIOUS,
        "zeros.pth": bytes(4096),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    torch.save({"epoch": 3}, folder / "meta.pth")
    paths["meta.pth"] = folder / "meta.pth"
    return paths


def _one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err and "Warning" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"deeplab-fast {command}: error: "), err
    return lines[0]


def test_load_checkpoint_fuzz(tmp_path):
    """Random and mutated files: always a CheckpointError (a ValueError) naming the file, within a few seconds."""
    good = _valid_checkpoint()
    rng = random.Random(0)
    path = tmp_path / "fuzz.pth"
    deadline = time.monotonic() + 4.0
    cases = 0
    while cases < 400 and time.monotonic() < deadline:
        kind = cases % 4
        if kind == 0:  # random bytes
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
        elif kind == 1:  # truncated
            data = good[: rng.randint(0, len(good) - 1)]
        elif kind == 2:  # a few bytes flipped
            data = bytearray(good)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.getrandbits(8)
            data = bytes(data)
        else:  # a run of bytes overwritten in the first 2 kB (headers, the pickle)
            data = bytearray(good)
            at = rng.randrange(min(2048, len(data)))
            data[at:at + 16] = bytes(rng.getrandbits(8) for _ in range(16))
            data = bytes(data)
        path.write_bytes(data)
        try:
            sd = models.load_checkpoint(path)
        except models.CheckpointError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)
        else:  # a mutation the format tolerates (e.g. in tensor bytes): still a state dict
            assert all(isinstance(v, torch.Tensor) for v in sd.values())
        cases += 1
    assert cases >= 40


def test_load_checkpoint_named_cases(tmp_path):
    for name, path in _bad_files(tmp_path).items():
        with pytest.raises(ValueError, match=str(path).replace(".", r"\.")) as info:
            models.load_checkpoint(path)
        assert isinstance(info.value, models.CheckpointError), name
        assert ("weights-only" in str(info.value)) or ("not a state dict" in str(info.value)), name


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_synthetic_voc(tmp_path_factory.mktemp("data") / "VOC2012", num_train=4, num_val=2, size=(32, 40),
                              num_classes=3, seed=0)


def test_cli_bad_checkpoints_exit_1(tmp_path, voc, capsys):
    """segment --weights, eval --weights, train --init and train --resume: one clean line naming the file, exit
    1, for each bad file; and a plain state dict given to --resume."""
    Image.fromarray(np.zeros((17, 19, 3), np.uint8)).save(tmp_path / "im.png")
    bad = _bad_files(tmp_path)
    rng = random.Random(1)
    good = _valid_checkpoint()
    for k in range(3):  # a few mutated files too
        data = bytearray(good)
        at = rng.randrange(1024)
        data[at:at + 32] = bytes(rng.getrandbits(8) for _ in range(32))
        bad[f"mutated{k}.pth"] = tmp_path / f"mutated{k}.pth"
        bad[f"mutated{k}.pth"].write_bytes(bytes(data))
    train = ["train", "--model", MODEL, "--data", str(voc), "--out", str(tmp_path / "run"), "--num-classes", "3",
             "--steps", "1", "--batch-size", "2", "--crop-size", "32", "--width-divisor", "8", "--workers", "0",
             "--no-progress", "--device", "cpu"]
    commands = {
        "segment": lambda f: ["segment", str(tmp_path / "im.png"), "--model", MODEL, "--weights", f, "--out",
                              str(tmp_path / "o"), "--device", "cpu"],
        "eval": lambda f: ["eval", "--model", MODEL, "--weights", f, "--data", str(voc), "--device", "cpu",
                           "--width-divisor", "8", "--workers", "0", "--no-progress"],
        "train --init": lambda f: train + ["--init", f],
        "train --resume": lambda f: train + ["--resume", f],
    }
    for name, path in bad.items():
        for command, argv in commands.items():
            if name == "meta.pth" and command != "train --resume":
                continue  # loads, but is no state dict: the same CheckpointError path, checked below
            code = main(argv(str(path)))
            err = capsys.readouterr().err
            line = _one_error_line(err, command.split()[0])
            assert code == 1, (command, name, err)
            assert str(path) in line, (command, name, line)

    plain = tmp_path / "plain.pth"
    torch.save(models.get_model(MODEL, num_classes=3, **TINY).state_dict(), plain)
    code = main(train + ["--resume", str(plain)])
    line = _one_error_line(capsys.readouterr().err, "train")
    assert code == 1 and "not a 'deeplab-fast train' checkpoint" in line and "--init" in line


def test_16_bit_photo_is_scaled_not_clipped(tmp_path, capsys):
    h, w = 24, 32
    grey16 = (np.arange(h * w).reshape(h, w) * (65535 // (h * w - 1))).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "photo16.png")
    assert Image.open(tmp_path / "photo16.png").mode.startswith("I")
    from deeplab_fast.io import load_photo

    photo = load_photo(tmp_path / "photo16.png")
    assert photo.dtype == np.uint8 and photo.shape == (h, w, 3)
    np.testing.assert_array_equal(photo[..., 0], np.round(grey16 / 257.0).astype(np.uint8))
    assert (photo == 255).mean() < 0.01  # clipping made 99.6% of such a photo white

    anno = np.zeros((h, w, 3), np.uint8)
    anno[:, : w // 2] = (255, 0, 0)
    anno[:, w // 2:] = (0, 255, 0)
    Image.fromarray(anno).save(tmp_path / "anno.png")
    assert main(["crf", str(tmp_path / "photo16.png"), str(tmp_path / "anno.png"), str(tmp_path / "out.png")]) == 0
    capsys.readouterr()


def test_16_bit_annotation_is_decoded_by_value(tmp_path, capsys):
    h, w = 24, 32
    photo = np.zeros((h, w, 3), np.uint8)
    photo[:, w // 2:] = 200
    Image.fromarray(photo).save(tmp_path / "photo.png")
    anno = np.zeros((h, w), np.uint16)
    anno[:, :6] = 1000
    anno[:, -6:] = 2000  # the middle is unknown (0)
    Image.fromarray(anno).save(tmp_path / "anno16.png")
    out = tmp_path / "out.png"
    code = main(["crf", str(tmp_path / "photo.png"), str(tmp_path / "anno16.png"), str(out), "--overlay",
                 str(tmp_path / "overlay.png")])
    text = capsys.readouterr()
    assert code == 0, text.err
    assert "2 labels + unknown" in text.out
    result = np.asarray(Image.open(out))
    assert result.shape == (h, w) and set(np.unique(result)) == {1000, 2000}
    assert (result[:, : w // 2] == 1000).all() and (result[:, w // 2:] == 2000).all()  # split at the photo's edge
    assert np.asarray(Image.open(tmp_path / "overlay.png")).shape == (h, 3 * w + 8, 3)

    Image.fromarray(np.where(anno > 0, 1000, 0).astype(np.uint16)).save(tmp_path / "one16.png")
    assert main(["crf", str(tmp_path / "photo.png"), str(tmp_path / "one16.png"), str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err, "crf")
    assert "needs at least 2 label values (0 means unknown), found a single label value 1000" in line


@pytest.mark.parametrize("option,value", [("--gaussian-sxy", "1e-300"), ("--bilateral-sxy", "1e-300"),
                                          ("--bilateral-srgb", "1e-300"), ("--bilateral-srgb", "1e-45"),
                                          ("--gaussian-sxy", "1e300")])
def test_std_devs_outside_float32_are_clean_errors(tmp_path, capsys, option, value):
    Image.fromarray(np.zeros((8, 9, 3), np.uint8)).save(tmp_path / "im.png")
    Image.fromarray(np.tile(np.array([[255, 0, 0], [0, 255, 0]], np.uint8), (4, 9, 1))[:8, :9]).save(
        tmp_path / "anno.png")
    code = main(["crf", str(tmp_path / "im.png"), str(tmp_path / "anno.png"), str(tmp_path / "out.png"), option,
                 value])
    err = capsys.readouterr().err  # argparse's usage, then one error line
    assert "Traceback" not in err and "Warning" not in err, err
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith(f"deeplab-fast crf: error: argument {option}: ") and "usable range" in line


@pytest.mark.parametrize("option", ["--gaussian-sxy", "--bilateral-sxy", "--bilateral-srgb"])
def test_std_devs_too_small_for_the_image(tmp_path, capsys, recwarn, option):
    Image.fromarray(np.full((40, 50, 3), 100, np.uint8)).save(tmp_path / "im.png")
    anno = np.zeros((40, 50, 3), np.uint8)
    anno[:, :25] = (255, 0, 0)
    anno[:, 25:] = (0, 0, 255)
    Image.fromarray(anno).save(tmp_path / "anno.png")
    code = main(["crf", str(tmp_path / "im.png"), str(tmp_path / "anno.png"), str(tmp_path / "out.png"), option,
                 "1e-6"])
    line = _one_error_line(capsys.readouterr().err, "crf")
    assert code == 2 and f"{option} 1e-06 cannot be used" in line and "usable range is" in line
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    usable = float(line.split("usable range is ")[1].split(" to")[0])
    # The reported minimum works (a little above it, as printed with 3 digits).
    assert main(["crf", str(tmp_path / "im.png"), str(tmp_path / "anno.png"), str(tmp_path / "out.png"), option,
                 f"{usable * 1.01:.6g}"]) == 0
    capsys.readouterr()


def test_written_files_get_a_normal_mode(tmp_path, capsys):
    """Palette PNGs, overlays and CRF results: 0666 & ~umask (mkstemp's 0600 is not left behind)."""
    from deeplab_fast.data import voc_palette
    from deeplab_fast.io import save_image, save_palette_png

    old = os.umask(0o022)
    try:
        save_palette_png(np.zeros((4, 5), np.uint8), voc_palette(), tmp_path / "labels.png")
        save_image(np.zeros((4, 5, 3), np.uint8), tmp_path / "rgb.png")
    finally:
        os.umask(old)
    for name in ("labels.png", "rgb.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert Image.open(tmp_path / "labels.png").mode == "P"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


# ----------------------------------------------------------------------------------------------------------
# Resource failures, divergence and --threads: one line each (issue 22, findings 2, 7, 10)


def _crf_inputs(folder: Path, h: int = 12, w: int = 14):
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(folder / "im.png")
    anno = np.zeros((h, w, 3), np.uint8)
    anno[:, : w // 2] = (255, 0, 0)
    anno[:, w // 2:] = (0, 255, 0)
    Image.fromarray(anno).save(folder / "anno.png")
    return folder / "im.png", folder / "anno.png"


def _vm_peak_kb(code: str, env) -> int:
    probe = subprocess.run([sys.executable, "-c", code + "\nprint(open('/proc/self/status').read())"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert probe.returncode == 0, probe.stderr
    return int(next(line.split()[1] for line in probe.stdout.splitlines() if line.startswith("VmPeak:")))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="an address-space limit (RLIMIT_AS), /proc")
def test_out_of_memory_is_one_line_naming_the_input(tmp_path):
    """crf on a 9000x9000 PNG (a few hundred kB: one colour) under a memory limit a little above what the command
    needs to start: one line naming the image and what to try, exit 1, no traceback."""
    import resource

    big = tmp_path / "big.png"
    Image.new("RGB", (9000, 9000), (90, 90, 90)).save(big)
    anno = np.zeros((9000, 9000, 3), np.uint8)
    anno[:, :4500] = (255, 0, 0)
    Image.fromarray(anno).save(tmp_path / "anno.png")
    del anno
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="1")
    limit = (_vm_peak_kb("import deeplab_fast.cli", env) + 150_000) * 1024  # 150 MB above the start-up peak

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    r = subprocess.run([sys.executable, "-m", "deeplab_fast", "crf", str(big), str(tmp_path / "anno.png"),
                        str(tmp_path / "out.png"), "--threads", "1"], capture_output=True, text=True, env=env,
                       preexec_fn=cap, timeout=300)
    line = _one_error_line(r.stderr, "crf")
    assert r.returncode == 1, r.stderr
    assert "out of memory" in line and str(big) in line and "try" in line


@pytest.mark.parametrize("command", ["crf", "segment", "train", "eval", "bench"])
def test_every_command_reports_memory_errors_in_one_line(tmp_path, voc, capsys, monkeypatch, command):
    """Every command's failures go through one handler: a MemoryError (here raised where each command does its
    main work) is one line with exit 1, naming the input where there is one."""
    import deeplab_fast.cli.crf as crf_cli
    import deeplab_fast.cli.segment as segment_cli
    import deeplab_fast.cli.train as train_cli

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 7.5 GiB")

    image, anno = _crf_inputs(tmp_path)
    weights = tmp_path / "w.pth"
    weights.write_bytes(_valid_checkpoint())
    argv = {
        "crf": (crf_cli, "refine_annotation", ["crf", str(image), str(anno), str(tmp_path / "out.png")]),
        "segment": (segment_cli, "logits_of", ["segment", str(image), "--model", MODEL, "--width-divisor", "8",
                                               "--weights", str(weights), "--out", str(tmp_path / "o"),
                                               "--device", "cpu"]),
        "train": (train_cli, "train", ["train", "--model", MODEL, "--data", str(voc), "--out", str(tmp_path / "r"),
                                       "--num-classes", "3", "--steps", "1", "--batch-size", "2", "--crop-size",
                                       "32", "--width-divisor", "8", "--workers", "0", "--no-progress",
                                       "--device", "cpu"]),
        "eval": (train_cli, "evaluate", ["eval", "--model", MODEL, "--weights", str(weights), "--data", str(voc),
                                         "--device", "cpu", "--width-divisor", "8", "--workers", "0",
                                         "--no-progress"]),
        "bench": (segment_cli, "bench_rows", ["bench", "--models", MODEL, "--size", "33", "--batch", "1",
                                              "--device", "cpu"]),
    }
    module, name, args = argv[command]
    monkeypatch.setattr(module, name, no_memory)
    code = main(args)
    line = _one_error_line(capsys.readouterr().err, command)
    assert code == 1 and "out of memory (MemoryError: Unable to allocate 7.5 GiB)" in line
    if command in ("crf", "segment"):
        assert str(image) in line


def test_a_diverging_training_run_is_one_line(tmp_path, voc, capsys):
    code = main(["train", "--model", MODEL, "--data", str(voc), "--out", str(tmp_path / "run"), "--num-classes",
                 "3", "--steps", "20", "--batch-size", "2", "--crop-size", "32", "--width-divisor", "8",
                 "--workers", "0", "--no-progress", "--device", "cpu", "--lr", "1e12", "--ckpt-every", "1"])
    line = _one_error_line(capsys.readouterr().err, "train")
    assert code == 1 and "the run diverged" in line and "at step" in line and "learning rate" in line


def test_threads_are_bounded_by_the_machine(tmp_path):
    """--threads far above the cores: a clear usage error (torch's thread pool could not start so many, and
    crashed at exit); the bound is 4 x the cores."""
    image, anno = _crf_inputs(tmp_path)
    r = subprocess.run([sys.executable, "-m", "deeplab_fast", "crf", str(image), str(anno), str(tmp_path / "o.png"),
                        "--threads", "100000"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    cores = os.cpu_count()
    assert last.startswith("deeplab-fast crf: error: argument --threads: ") and f"at most {4 * cores}" in last
    assert "Traceback" not in r.stderr
    assert main(["crf", str(image), str(anno), str(tmp_path / "o.png"), "--threads", str(4 * cores)]) == 0
