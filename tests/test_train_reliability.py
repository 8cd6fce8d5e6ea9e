"""Training never loses or corrupts progress (issue 22): exact resume with any number of DataLoader workers and
augmentation on, checkpoints only of finite weights (and best.pth by validation mIoU), SIGTERM / SIGINT stop at a
step boundary with a checkpoint, a resumed run's log has each step once, stale temporary files are removed, and
a run killed at random points (SIGKILL) and resumed ends bitwise where an uninterrupted run ends.

A tiny v1 (``width_divisor=8``, dropout on) on 12 synthetic 40x48 images, batch 2 (6 steps per epoch), random
scaling, crops and flips on: each run takes a second or two."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from deeplab_fast.data import make_synthetic_voc
from deeplab_fast.train import load_training_checkpoint, train

MODEL = "deeplab_v1_largefov"
NUM_CLASSES = 4
COMMON = dict(num_classes=NUM_CLASSES, batch_size=2, lr=0.01, crop_size=33, preprocessing="torchvision",
              model_kwargs={"width_divisor": 8}, log_every=1, seed=5, progress=False)


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_synthetic_voc(tmp_path_factory.mktemp("data") / "VOC2012", num_train=12, num_val=4, size=(40, 48),
                              num_classes=NUM_CLASSES, seed=1)


def _log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _state(path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return dict(ckpt["model"], **{f"momentum.{k}": v["momentum_buffer"]
                                  for k, v in ckpt["optimizer"]["state"].items()})


def _assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}: max |d| " \
                       f"{max(float((a[k] - b[k]).abs().max()) for k in differ):.3g}"


# ----------------------------------------------------------------------------------------------------------
# exact resume, any number of workers (finding 3)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 4 workers on a 2-core machine: slower, not wrong
@pytest.mark.parametrize("workers", [0, 2, 4])
def test_resume_is_exact_with_workers_and_augmentation(voc, tmp_path, workers):
    """Stopped mid-epoch (step 4 of 6), resumed, stopped again in the next epoch (step 7), resumed to 9: the
    weights and momentum buffers equal an uninterrupted run's bit for bit, and the losses too."""
    common = dict(COMMON, steps=9, workers=workers)
    straight = train(MODEL, voc, tmp_path / "a", **common)
    assert straight["step"] == 9
    b = tmp_path / "b"
    train(MODEL, voc, b, stop_at=4, **common)
    train(MODEL, voc, b, resume=b / "last.pth", stop_at=7, **common)
    train(MODEL, voc, b, resume=b / "last.pth", **common)
    _assert_bitwise_equal(_state(b / "last.pth"), _state(tmp_path / "a" / "last.pth"))
    assert [e["loss"] for e in _log(b / "log.jsonl")] == [e["loss"] for e in _log(tmp_path / "a" / "log.jsonl")]


# ----------------------------------------------------------------------------------------------------------
# finite checkpoints, best.pth (finding 2)


def test_a_diverging_run_never_saves_non_finite_weights(voc, tmp_path):
    """A learning rate far too high, a checkpoint every step, the loss logged every 10 (the default): the run stops
    at the first non-finite loss with a one-line FloatingPointError naming the step and a hint; last.pth holds the
    last finite state."""
    out = tmp_path / "diverged"
    with pytest.raises(FloatingPointError) as info:
        train(MODEL, voc, out, **dict(COMMON, steps=30, lr=1e12, ckpt_every=1, log_every=10))
    ckpt = load_training_checkpoint(out / "last.pth")
    bad = [k for k, v in ckpt["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, f"last.pth (step {ckpt['step']}) has {len(bad)} non-finite tensors, e.g. {bad[:3]}"
    message = str(info.value)
    assert "\n" not in message and re.search(r"at step \d+.*learning rate", message), message
    stopped = int(re.search(r"at step (\d+)", message).group(1))
    assert ckpt["step"] < stopped and f"step {ckpt['step']}" in message


def test_best_checkpoint_follows_the_validation_miou(voc, tmp_path):
    out = tmp_path / "best"
    result = train(MODEL, voc, out, **dict(COMMON, steps=8, val_every=2, lr=0.02))
    vals = [e for e in _log(out / "log.jsonl") if "val" in e]
    assert [e["step"] for e in vals] == [2, 4, 6, 8]
    best = max(vals, key=lambda e: e["val"]["miou"])
    ckpt = load_training_checkpoint(out / "best.pth")
    assert ckpt["step"] == best["step"] and ckpt["best_miou"] == pytest.approx(best["val"]["miou"])
    assert result["val"]["miou"] == pytest.approx(vals[-1]["val"]["miou"])
    # best.pth is a checkpoint the commands read: the weights of that step
    assert set(ckpt["model"]) == set(torch.load(out / "last.pth", weights_only=True)["model"])


# ----------------------------------------------------------------------------------------------------------
# the log and temporary files (findings 8, 11)


def test_a_resumed_run_logs_each_step_once_and_removes_stale_parts(voc, tmp_path):
    """Killed after logging steps 5 and 6 (half a line of step 7 too) with its checkpoint at step 4, and during
    two checkpoint writes: the resumed run cuts the log back to step 4 and removes the temporary files."""
    out = tmp_path / "run"
    common = dict(COMMON, steps=8, ckpt_every=4)
    train(MODEL, voc, out, stop_at=4, **common)
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(dict(step=5, loss=1.0, lr=0.01, time=1.0)) + "\n")
        f.write(json.dumps(dict(step=6, loss=1.0, lr=0.01, time=1.0)) + "\n")
        f.write('{"step": 7, "lo')
    stale = [out / ".last.pth.k2j3h4.part", out / ".best.pth.x8y9z0.part"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    train(MODEL, voc, out, resume=out / "last.pth", **common)
    assert [e["step"] for e in _log(out / "log.jsonl")] == list(range(1, 9))
    assert not any(p.exists() for p in stale)
    assert not list(out.glob(".*.part"))


# ----------------------------------------------------------------------------------------------------------
# SIGTERM and SIGINT (finding 6)


def _cli_train(voc, out, *extra):
    return [sys.executable, "-m", "deeplab_fast", "train", "--model", MODEL, "--data", str(voc), "--out", str(out),
            "--num-classes", str(NUM_CLASSES), "--batch-size", "2", "--lr", "0.01", "--crop-size", "33",
            "--preprocessing", "torchvision", "--width-divisor", "8", "--seed", "5", "--log-every", "1",
            "--workers", "2", "--device", "cpu", "--no-progress", "--threads", "1", *extra]


def _wait_for_step(log, step: int, proc, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()}")
        if log.exists() and any(json.loads(line).get("step", 0) >= step
                                for line in log.read_text().splitlines() if line.endswith("}")):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {log} after {timeout} s")


@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_a_checkpoint_at_the_step_boundary(voc, tmp_path, signum, status):
    """SIGTERM (a scheduler's pre-emption) and SIGINT (Ctrl-C, 1000 steps before the next checkpoint): the run
    finishes its step, writes last.pth, says so in one line and exits 128 + the signal number; resumed, it ends
    where an uninterrupted run ends, bit for bit."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = tmp_path / "stopped"
    proc = subprocess.Popen(_cli_train(voc, out, "--steps", "20"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    _wait_for_step(out / "log.jsonl", 3, proc)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == status, stdout + stderr
    ckpt = load_training_checkpoint(out / "last.pth")
    logged = [e["step"] for e in _log(out / "log.jsonl")]
    assert 3 <= ckpt["step"] < 20 and logged == list(range(1, ckpt["step"] + 1))
    lines = [line for line in stderr.strip().splitlines() if line]
    assert len(lines) == 1 and signal.Signals(signum).name in lines[0], stderr
    assert f"step {ckpt['step']}" in lines[0] and "Traceback" not in stderr
    if signum != signal.SIGTERM:
        return
    done = subprocess.run(_cli_train(voc, out, "--steps", "20", "--resume", str(out / "last.pth")),
                          capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr
    straight = subprocess.run(_cli_train(voc, tmp_path / "straight", "--steps", "20"), capture_output=True,
                              text=True, env=env, timeout=240)
    assert straight.returncode == 0, straight.stderr
    _assert_bitwise_equal(_state(out / "last.pth"), _state(tmp_path / "straight" / "last.pth"))


# ----------------------------------------------------------------------------------------------------------
# killed at random points, resumed, until done


def _run_and_exit(out, kwargs):  # in a forked child
    try:
        train(MODEL, kwargs.pop("voc"), out, **kwargs)
        code = 0
    except BaseException:  # noqa: BLE001 - the exit status is the report
        code = 1
    os._exit(code)


def _run_forked(out, kwargs) -> mp.Process:
    p = mp.get_context("fork").Process(target=_run_and_exit, args=(out, kwargs))
    p.start()
    return p


def _logged_step(log) -> int:
    if not log.exists():
        return 0
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_killed_at_random_points_and_resumed_ends_bitwise_where_an_uninterrupted_run_ends(voc, tmp_path, workers):
    """SIGKILL three times at random moments (in a step, in a checkpoint write: one is written every step), each
    time resuming from last.pth: last.pth is always loadable, and the final weights, momentum and log equal an
    uninterrupted run's. Both runs are forked from this process (so they run with the same thread settings)."""
    common = dict(COMMON, voc=voc, steps=14, ckpt_every=1, workers=workers)
    reference = _run_forked(tmp_path / "straight", dict(common))
    reference.join(240)
    assert reference.exitcode == 0
    out = tmp_path / "killed"
    rng = random.Random(1000 + workers)
    kills, starts = 0, []
    while True:
        last = out / "last.pth"
        start = load_training_checkpoint(last)["step"] if last.exists() else 0
        starts.append(start)
        child = _run_forked(out, dict(common, resume=last if last.exists() else None))
        if kills == 3:
            child.join(240)
            assert child.exitcode == 0
            break
        target = start + rng.randint(1, 3)
        deadline = time.monotonic() + 240
        while child.is_alive() and _logged_step(out / "log.jsonl") < target and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))
        child.kill()
        child.join(60)
        kills += 1
        if last.exists():
            load_training_checkpoint(last)  # never a partial file
    assert max(starts) < 14, starts  # every kill landed before the run was done
    _assert_bitwise_equal(_state(out / "last.pth"), _state(tmp_path / "straight" / "last.pth"))
    assert [e["step"] for e in _log(out / "log.jsonl")] == list(range(1, 15))
    assert [e["loss"] for e in _log(out / "log.jsonl")] == [e["loss"] for e in _log(tmp_path / "straight" /
                                                                                    "log.jsonl")]
    assert not list(out.glob(".*.part"))
