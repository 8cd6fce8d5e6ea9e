"""The folder modes of ``deeplab-fast segment`` and ``crf`` under torchrun (deeplab_fast/cli/_torchrun.py: Shard,
torchrun_shard; deeplab_fast/train/distributed.py).

Two processes on the CPU (gloo) must write the same files, byte for byte, as one process; each input is handled by
one process; the summary comes from rank 0; a failure in any process makes every process exit nonzero, and a failed
check stops them all before anything is written. The two-process runs start the package as torchrun does (``python
-m torch.distributed.run``), or, where each process's exit status is checked, as two processes with torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import deeplab_fast
from deeplab_fast import models
from deeplab_fast.cli import _common, _torchrun, main
from deeplab_fast.cli._common import CLIError, StoppedWithAnotherProcess
from deeplab_fast.cli._torchrun import Shard
from deeplab_fast.cli.segment import _batches

NUM_CLASSES = 5
SIZES = [(41, 53), (41, 53), (37, 29), (41, 53), (30, 30)]  # mixed sizes: batches of one size across a shard
V1 = ("--model", "deeplab_v1_largefov", "--width-divisor", "8", "--device", "cpu", "--batch", "2")


def run(*argv) -> int:
    return main([str(a) for a in argv])


def _env(**extra) -> dict:
    env = dict(os.environ, **extra)
    package_root = str(Path(deeplab_fast.__file__).resolve().parents[1])  # the package this test imports
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(extra)
    return env


def torchrun(*argv, cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m deeplab_fast ARGV``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "deeplab_fast", *map(str, argv)]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def two_processes(*argv, cwd: Path) -> list:
    """``python -m deeplab_fast ARGV`` as ranks 0 and 1 of a torchrun job: [(exit status, stdout, stderr)]."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "deeplab_fast", *map(str, argv)], cwd=cwd, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1"))
             for r in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append((p.returncode, out, err))
    return results


def files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def differing(a: dict, b: dict) -> list:
    """The file names whose contents differ, or that only one side has."""
    return sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))


@pytest.fixture(scope="module")
def segment_inputs(tmp_path_factory):
    """(folder of 5 photos, a narrow v1 checkpoint, the outputs of one process)."""
    root = tmp_path_factory.mktemp("segment")
    folder = root / "photos"
    folder.mkdir()
    g = np.random.default_rng(0)
    for k, (h, w) in enumerate(SIZES):
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(yy * 5 + k * 40) % 256, (xx * 4) % 256, ((yy + xx) * 3) % 256], -1)
        img = np.clip(img + g.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"im{k}.png")
    torch.manual_seed(3)
    model = models.get_model("deeplab_v1_largefov", num_classes=NUM_CLASSES, width_divisor=8)
    checkpoint = root / "v1.pth"
    torch.save(model.state_dict(), checkpoint)
    assert run("segment", folder, "--weights", checkpoint, "--out", root / "one", *V1) == 0
    one = files(root / "one")
    assert sorted(one) == sorted(f"im{k}{s}.png" for k in range(len(SIZES)) for s in ("", "_overlay"))
    return folder, checkpoint, one


def test_segment_under_torchrun_writes_the_files_of_one_process(segment_inputs, tmp_path):
    folder, checkpoint, one = segment_inputs
    proc = torchrun("segment", folder, "--weights", checkpoint, "--out", tmp_path / "two", *V1, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not differing(files(tmp_path / "two"), one), (proc.stdout, proc.stderr)
    lines = proc.stdout.splitlines()
    for k, (h, w) in enumerate(SIZES):  # each image segmented once, by one of the processes
        assert sum(line.startswith(f"im{k}.png: {w}x{h}") for line in lines) == 1, proc.stdout
    summaries = [line for line in lines if "image(s) on" in line]
    assert len(summaries) == 1 and summaries[0].startswith("5 image(s) on 2 processes (cpu)"), proc.stdout


def _crf_pairs(root: Path) -> tuple:
    """Five crops of the bundled photo (pydensecrf's example) and its annotation, each with 2 labels + unknown."""
    assets = resources.files("deeplab_fast.assets")
    with resources.as_file(assets / "example.png") as p:
        photo = np.asarray(Image.open(p).convert("RGB"))
    with resources.as_file(assets / "example_anno.png") as p:
        anno = np.asarray(Image.open(p).convert("RGB"))
    images, annos = root / "images", root / "annos"
    images.mkdir()
    annos.mkdir()
    for k, (y, x) in enumerate([(0, 0), (60, 100), (120, 200), (100, 0), (140, 220)]):
        Image.fromarray(photo[y:y + 80, x:x + 100]).save(images / f"crop{k}.png")
        Image.fromarray(anno[y:y + 80, x:x + 100]).save(annos / f"crop{k}.png")
    return images, annos


def test_crf_folder_mode_under_torchrun_writes_the_files_of_one_process(tmp_path, capsys):
    images, annos = _crf_pairs(tmp_path)
    assert run("crf", images, annos, tmp_path / "one", "--overlay", tmp_path / "one_overlay") == 0
    assert "refined 5 of 5 images" in capsys.readouterr().out
    proc = torchrun("crf", images, annos, tmp_path / "two", "--overlay", tmp_path / "two_overlay", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for kind in ("", "_overlay"):
        one, two = files(tmp_path / f"one{kind}"), files(tmp_path / f"two{kind}")
        assert len(one) == 5 and not differing(two, one), (proc.stdout, proc.stderr)
    summaries = [line for line in proc.stdout.splitlines() if line.startswith("refined")]
    assert summaries == [f"refined 5 of 5 images into {str(tmp_path / 'two')!r}"], proc.stdout
    assert "2 processes" in proc.stdout


def test_a_failing_image_fails_every_process_and_the_others_are_written(segment_inputs, tmp_path):
    folder, checkpoint, one = segment_inputs
    inputs = tmp_path / "photos"
    shutil.copytree(folder, inputs)
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")  # sorted first: rank 0's shard
    results = two_processes("segment", inputs, "--weights", checkpoint, "--out", tmp_path / "out", *V1,
                            cwd=tmp_path)
    assert [code for code, _, _ in results] == [1, 1], results
    assert not differing(files(tmp_path / "out"), one), results  # the others, as one process writes them
    (_, out0, err0), (_, out1, err1) = results
    errors = [line for line in (err0 + err1).splitlines() if "error" in line]
    assert len(errors) == 1 and "broken.png" in errors[0] and errors[0] in err0, results
    assert "5 image(s) on 2 processes (cpu)" in out0 and "1 failed: broken.png" in out0
    assert "image(s) on" not in out1 and "Traceback" not in err0 + err1


def test_a_failed_check_stops_every_process_before_anything_is_written(tmp_path):
    images, annos = _crf_pairs(tmp_path)
    (tmp_path / "out.png").write_bytes(b"")
    results = two_processes("crf", images, annos, tmp_path / "out.png", cwd=tmp_path)  # OUT must be a folder
    assert [code for code, _, _ in results] == [2, 2], results
    errors = [line for _, _, err in results for line in err.splitlines()]
    assert errors == [f"deeplab-fast crf: error: OUT {str(tmp_path / 'out.png')!r} is a file, but in folder mode "
                      "OUT must be a folder"], results
    assert "error" in results[0][2]  # printed by rank 0


# ---------------------------------------------------------------------------------------------------------
# The pieces, in one process


def test_shards_are_disjoint_and_cover_the_inputs():
    items = list(range(11))
    shards = [Shard(r, 3).take(items) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert Shard().take(items) == items


@pytest.mark.parametrize("rank", [0, 1])
def test_a_check_failing_in_one_process_stops_them_all(monkeypatch, rank):
    """Rank 1 fails its checks while rank 0 passes them (a file that changed in between): rank 1 raises its error
    and rank 0 stops with its exit status, silently."""
    monkeypatch.setattr(_torchrun.distributed, "all_gather", lambda code: [0, 2])

    def setup():
        if rank == 1:
            raise CLIError("IMAGE 'x.png': no such file or folder")
        return "ready"

    with pytest.raises(StoppedWithAnotherProcess if rank == 0 else CLIError) as info:
        Shard(rank, 2).agreed(setup)
    assert info.value.code == 2
    assert _common.report_error("segment", StoppedWithAnotherProcess(2)) == 2
    monkeypatch.setattr(_torchrun.distributed, "all_gather", lambda code: [0, 0])
    assert Shard(rank, 2).agreed(lambda: "ready") == "ready"


def test_segment_batches_are_decided_from_the_headers(tmp_path):
    """The network calls do not depend on the shard: runs of up to --batch images of one size, in order; a file
    whose header is unreadable joins the current call without counting."""
    for name, (h, w) in [("a", (4, 5)), ("b", (4, 5)), ("c", (4, 5)), ("d", (6, 5)), ("f", (4, 5))]:
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "e.png").write_bytes(b"not an image")
    paths = [tmp_path / f"{n}.png" for n in "abcdef"]
    names = [[p.stem for p in b] for b in _batches(paths, 2)]
    assert names == [["a", "b"], ["c"], ["d", "e"], ["f"]]
    assert [[p.stem for p in b] for b in _batches(paths, 1)] == [["a"], ["b"], ["c"], ["d", "e"], ["f"]]
