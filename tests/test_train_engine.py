"""The training / evaluation engine (deeplab_fast.train.engine) and the ``train`` / ``eval`` commands, on the CPU,
on a small synthetic VOC-layout set with a narrow DeepLab v1 (``width_divisor=8``)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from deeplab_fast.cli import main
from deeplab_fast.data import make_synthetic_voc
from deeplab_fast.models import get_model
from deeplab_fast.data import VOCSegmentation, normalize
from deeplab_fast.train import evaluate, evaluation_loader, train

NUM_CLASSES = 4
MODEL = "deeplab_v1_largefov"
TINY = {"width_divisor": 8, "dropout": 0.0}
# The deterministic settings: list order, no random scaling / flipping, crops covering the whole (padded) image,
# no dropout; the update then depends only on which images a step sees.
STEPS = 500
DETERMINISTIC = dict(shuffle=False, scale_range=(1.0, 1.0), flip=False, crop_size=128)


def _log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _tiny_model():
    torch.manual_seed(0)
    return get_model(MODEL, num_classes=NUM_CLASSES, **TINY)


def _load(checkpoint):
    model = get_model(MODEL, num_classes=NUM_CLASSES, **TINY)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["model"])
    return model.eval()


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_synthetic_voc(tmp_path_factory.mktemp("data") / "VOC2012", num_train=48, num_val=16,
                              size=(96, 128), num_classes=NUM_CLASSES, seed=0)


@pytest.fixture(scope="module")
def trained(voc, tmp_path_factory):
    """A tiny v1 trained ~30 s (2 idle CPU cores) through the real train() path; (result, out_dir)."""
    out = tmp_path_factory.mktemp("run")
    result = train(MODEL, voc, out, num_classes=NUM_CLASSES, steps=STEPS, batch_size=8, lr=0.02, crop_size=97,
                   preprocessing="torchvision", model_kwargs=TINY, log_every=1, seed=0, progress=False)
    return result, out


def test_training_learns(voc, trained):
    result, out = trained
    assert result["step"] == STEPS and os.path.isfile(out / "last.pth")
    log = _log(out / "log.jsonl")
    assert [e["step"] for e in log] == list(range(1, STEPS + 1))
    assert all(set(e) == {"step", "loss", "lr", "time"} for e in log)
    losses = [e["loss"] for e in log]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    assert log[0]["lr"] == pytest.approx(0.02) and log[-1]["lr"] < 1e-3  # poly schedule, base group

    val = evaluation_loader(VOCSegmentation(voc, split="val"))
    before = evaluate(_tiny_model(), val, num_classes=NUM_CLASSES, preprocessing="torchvision", progress=False)
    after = evaluate(_load(out / "last.pth"), val, num_classes=NUM_CLASSES, preprocessing="torchvision", progress=False)
    assert after["num_images"] == 16 and len(after["per_class_iou"]) == NUM_CLASSES
    # Uniform guessing gives a mIoU of ~0.09 here, always predicting the background (87% of the pixels) ~0.22.
    # Training must find shapes: ~0.43 after these steps (red circles and green rectangles; the small blue
    # triangles, 2% of the pixels, come later).
    assert after["miou"] > 0.33, after
    assert after["miou"] > before["miou"] + 0.15, (before, after)
    assert after["per_class_iou"][1] > 0.3, after
    assert after["pixel_accuracy"] > 0.88
    assert after["crf"] is None


def test_eval_cli_crf_scales_flip(voc, trained, tmp_path, capsys):
    _, out = trained
    ckpt = str(out / "last.pth")
    js = tmp_path / "m.json"
    code = main(["eval", "--weights", ckpt, "--data", str(voc), "--crf", "pydensecrf", "--json", str(js),
                 "--workers", "0", "--no-progress"])
    text = capsys.readouterr().out
    assert code == 0, text
    # The model, its width and --preprocessing are read from the training checkpoint.
    assert "deeplab_v1_largefov" in text and "mIoU" in text and "CRF (pydensecrf)" in text
    assert "pixel accuracy" in text and "class 3" in text
    record = json.loads(js.read_text())
    assert record["preprocessing"] == "torchvision" and record["crf"] is not None
    for m in (record, record["crf"]):
        assert 0.0 <= m["miou"] <= 1.0 and 0.0 <= m["pixel_accuracy"] <= 1.0 and len(m["per_class_iou"]) == 4
    # The same numbers as evaluate() without the CRF.
    direct = evaluate(_load(ckpt), evaluation_loader(VOCSegmentation(voc, split="val")), num_classes=NUM_CLASSES,
                      preprocessing="torchvision", progress=False)
    assert record["miou"] == pytest.approx(direct["miou"])

    code = main(["eval", "--model", MODEL, "--weights", ckpt, "--data", str(voc), "--scales", "0.5,1.0", "--flip",
                 "--workers", "0", "--no-progress", "--json", str(js)])
    assert code == 0
    multi = json.loads(js.read_text())
    assert multi["scales"] == [0.5, 1.0] and multi["flip"] is True and multi["crf"] is None
    assert multi["miou"] > 0.3  # multi-scale + flip of a trained model still segments


def test_resume_continues_exactly(voc, tmp_path):
    common = dict(num_classes=NUM_CLASSES, steps=8, batch_size=4, lr=0.01, crop_size=65, preprocessing="torchvision",
                  model_kwargs={"width_divisor": 8}, log_every=1, seed=3, progress=False)  # dropout, shuffling,
    straight = train(MODEL, voc, tmp_path / "a", **common)  # random scaling and flips all on
    assert straight["step"] == 8

    first = train(MODEL, voc, tmp_path / "b", stop_at=4, **common)  # "interrupted" after step 4
    assert first["step"] == 4
    assert torch.load(tmp_path / "b" / "last.pth", weights_only=True)["step"] == 4
    second = train(MODEL, voc, tmp_path / "b", resume=tmp_path / "b" / "last.pth", **common)
    assert second["step"] == 8
    ckpt = torch.load(tmp_path / "b" / "last.pth", weights_only=True)
    assert ckpt["step"] == 8 and ckpt["scheduler"]["last_epoch"] == 8
    assert [e["step"] for e in _log(tmp_path / "b" / "log.jsonl")] == list(range(1, 9))
    # Same data order, augmentation and dropout draws (RNG state in the checkpoint): the same weights.
    a = torch.load(tmp_path / "a" / "last.pth", weights_only=True)["model"]
    for k, v in a.items():
        torch.testing.assert_close(ckpt["model"][k], v, rtol=1e-4, atol=1e-6, msg=k)
    la, lb = _log(tmp_path / "a" / "log.jsonl"), _log(tmp_path / "b" / "log.jsonl")
    assert [e["loss"] for e in lb] == pytest.approx([e["loss"] for e in la], rel=1e-4)

    # A run trained to 4 steps and resumed to 8 (a longer schedule) continues the step count at 5.
    short = dict(common, steps=4)
    train(MODEL, voc, tmp_path / "c", **short)
    train(MODEL, voc, tmp_path / "c", resume=tmp_path / "c" / "last.pth", **common)
    steps = [e["step"] for e in _log(tmp_path / "c" / "log.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
    c = torch.load(tmp_path / "c" / "last.pth", weights_only=True)
    assert c["step"] == 8 and c["args"]["steps"] == 8
    lr5 = _log(tmp_path / "c" / "log.jsonl")[4]["lr"]
    assert lr5 == pytest.approx(0.01 * (1 - 4 / 8) ** 0.9)  # the 8-step poly schedule's value at step 4


def test_torchrun_two_processes_match_one(voc, tmp_path):
    """2 gloo processes with batch 2 each == 1 process with batch 4 over the same images (DDP averages the
    gradients; v1 has no BatchNorm and dropout is off). The per-process losses are means over each process's
    valid pixels, so the match is close, not exact: compare the weight updates."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "deeplab_fast", "train", "--model", MODEL, "--data", str(voc), "--out", str(out),
           "--num-classes", str(NUM_CLASSES), "--steps", "2", "--batch-size", "2", "--lr", "0.01",
           "--crop-size", "128", "--preprocessing", "torchvision", "--width-divisor", "8",
           "--model-kwargs", '{"dropout": 0}',
           "--no-augment", "--no-shuffle", "--workers", "0", "--log-every", "1", "--device", "cpu", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    ddp = torch.load(out / "last.pth", weights_only=True)
    assert ddp["step"] == 2 and ddp["args"]["world_size"] == 2 and ddp["args"]["batch_size"] == 2
    assert [e["step"] for e in _log(out / "log.jsonl")] == [1, 2]  # one log, from rank 0

    def run(name, batch_size):
        result = train(MODEL, voc, tmp_path / name, num_classes=NUM_CLASSES, steps=2, batch_size=batch_size,
                       lr=0.01, preprocessing="torchvision", model_kwargs=TINY, log_every=1, workers=0, device="cpu",
                       progress=False, **DETERMINISTIC)
        return torch.load(result["checkpoint"], weights_only=True)

    one = run("one", 4)  # images 0-3, then 4-7: what ranks 0 and 1 saw together (0, 2 | 1, 3; 4, 6 | 5, 7)
    half = run("half", 2)  # 0-1, then 2-3: had both ranks seen the same images, the update would be of this kind
    w0 = _tiny_model().state_dict()

    def update_distance(a, b):  # |update_a - update_b| / |update_b| over all parameters
        num = den = 0.0
        for k, v0 in w0.items():
            d_a, d_b = a["model"][k] - v0, b["model"][k] - v0
            num += float((d_a - d_b).pow(2).sum())
            den += float(d_b.pow(2).sum())
        return (num / den) ** 0.5

    close = update_distance(ddp, one)
    assert close < 0.01, close  # ~7e-4: only the per-process normalisation of the loss differs
    assert update_distance(half, one) > 5 * close + 0.02  # ~0.08: the data matters, so rank 1 saw its share
    l_ddp = [e["loss"] for e in _log(out / "log.jsonl")]
    l_one = [e["loss"] for e in _log(tmp_path / "one" / "log.jsonl")]
    assert l_ddp == pytest.approx(l_one, rel=0.05)


def test_bad_input(voc, tmp_path, capsys):
    missing = tmp_path / "no_such_voc"
    code = main(["train", "--model", MODEL, "--data", str(missing), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "no such folder" in err

    code = main(["eval", "--model", MODEL, "--data", str(voc)])
    assert code == 2
    assert "--weights is required" in capsys.readouterr().err

    code = main(["eval", "--model", MODEL, "--data", str(voc), "--weights", str(tmp_path / "none.pth")])
    assert code == 2
    assert "none.pth" in capsys.readouterr().err

    code = main(["eval", "--model", MODEL, "--data", str(missing), "--weights", str(tmp_path / "none.pth")])
    assert code == 2
    assert str(missing) in capsys.readouterr().err

    code = main(["train", "--model", "deeplab_v3_resnet50", "--data", str(voc), "--width-divisor", "8"])
    assert code == 2
    assert "--width-divisor is for the v1 models" in capsys.readouterr().err


def test_init_weights_from_torchvision_backbones(tmp_path, monkeypatch):
    """--init: torchvision's vgg16 loads into v1's features, resnet50 into v3's backbone, by registered name (from
    torch.hub's cache, no network) or by a file of that name; the classifier keeps its own initialisation; a
    checkpoint that matches nothing is an error."""
    import torchvision

    from deeplab_fast import models
    from deeplab_fast.train import init_weights

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16()
    torch.save(vgg.state_dict(), cache / "vgg16-397923af.pth")
    v1 = models.deeplab_v1_largefov(num_classes=3)
    fc8 = v1.fc8.weight.detach().clone()
    loaded, total = init_weights(v1, "IMAGENET1K_VGG16_BACKBONE")
    assert loaded == 26 and total > loaded  # 13 convs x (weight, bias)
    assert torch.equal(v1.features[0].weight, vgg.features[0].weight)
    assert torch.equal(v1.features[28].bias, vgg.features[28].bias)
    assert torch.equal(v1.fc8.weight, fc8)
    v1b = models.deeplab_v1_largefov(num_classes=3)
    assert init_weights(v1b, cache / "vgg16-397923af.pth")[0] == 26  # a file named as the registered one
    assert torch.equal(v1b.features[28].weight, vgg.features[28].weight)

    r50 = torchvision.models.resnet50()
    torch.save(r50.state_dict(), cache / "resnet50-0676ba61.pth")
    v3 = models.deeplab_v3_resnet50(num_classes=3)
    loaded, _ = init_weights(v3, "IMAGENET1K_BACKBONE")
    assert torch.equal(v3.backbone.layer4[2].conv3.weight, r50.layer4[2].conv3.weight)
    assert torch.equal(v3.backbone.bn1.running_var, r50.bn1.running_var)
    assert loaded == len([k for k in r50.state_dict() if not k.startswith("fc.")])

    with pytest.raises(ValueError, match="matches"):
        init_weights(v1, {"nothing.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="matches"):  # a raw torchvision state dict has other names
        init_weights(v3, r50.state_dict())


def test_train_config_with_an_extra_head(voc, tmp_path):
    """train(TrainConfig(...)) with an extra trainable head after the network (the room left for a CRF-as-RNN
    stage): its parameters train in their own group at their own learning rate and are checkpointed."""
    from torch import nn

    from deeplab_fast.train import TrainConfig

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, out, image):
            assert image.shape[1] == 3
            return out * self.scale

    with pytest.raises(ValueError, match="steps and batch_size must be >= 1"):
        TrainConfig(model=MODEL, data_root=voc, out_dir=tmp_path, steps=0, batch_size=1, lr=0.1, crop_size=33)
    cfg = TrainConfig(model=MODEL, data_root=voc, out_dir=tmp_path / "head", num_classes=NUM_CLASSES, steps=3,
                      batch_size=2, lr=0.01, crop_size=65, preprocessing="torchvision", model_kwargs=TINY, log_every=1,
                      progress=False, extra_head=lambda model: Scale(), extra_head_lr=0.5)
    result = train(cfg)
    assert result["step"] == 3
    ckpt = torch.load(result["checkpoint"], weights_only=True)
    assert float(ckpt["extra_head"]["scale"]) != 1.0
    groups = ckpt["optimizer"]["param_groups"]
    assert groups[-1]["initial_lr"] == 0.5 and groups[-1]["weight_decay"] == 0.0
    assert groups[0]["initial_lr"] == 0.01


def test_train_recipe_option(voc, tmp_path, capsys):
    """--recipe sets the model, its options and the hyperparameters (explicit options win); a recipe of another
    family than --model is refused."""
    code = main(["train", "--recipe", "v3_os16", "--model", MODEL, "--data", str(voc)])
    assert code == 2 and "is for deeplab_v3_resnet101" in capsys.readouterr().err
    code = main(["train", "--data", str(voc)])
    assert code == 2 and "--model NAME or --recipe NAME" in capsys.readouterr().err

    init = tmp_path / "tiny.pth"
    torch.save(_tiny_model().state_dict(), init)
    out = tmp_path / "recipe"
    code = main(["train", "--recipe", "v1_largefov", "--data", str(voc), "--out", str(out), "--init", str(init),
                 "--num-classes", str(NUM_CLASSES), "--width-divisor", "8", "--steps", "1", "--batch-size", "2",
                 "--crop-size", "33", "--workers", "0", "--no-progress", "--device", "cpu"])
    text = capsys.readouterr()
    assert code == 0, text.err
    args = torch.load(out / "last.pth", weights_only=True)["args"]
    assert args["model"] == MODEL and args["lr"] == 1e-3 and args["steps"] == 1 and args["crop_size"] == 33
    assert args["preprocessing"] == "caffe"  # an unregistered --init file: the model's default normalisation
    assert "init: " in text.out


def test_checkpoints_that_say_mode_and_the_mode_option_still_work(voc, trained, tmp_path, capsys):
    """The input preprocessing was called "mode" before: checkpoints that store it so are read as
    "preprocessing" (eval, resume, --init defaults, a CRF-as-RNN stage's spec), and ``--mode`` is a hidden,
    deprecated alias of ``--preprocessing``."""
    from deeplab_fast.train import CRFasRNNStage, load_trained_crf, read_training_checkpoint

    _, out = trained
    old = torch.load(out / "last.pth", weights_only=True)
    old["args"]["mode"] = "caffe"  # not what it was trained with: shows that the old key is the one read
    del old["args"]["preprocessing"]
    path = tmp_path / "old.pth"
    torch.save(old, path)
    assert read_training_checkpoint(path)["args"]["preprocessing"] == "caffe"
    js = tmp_path / "m.json"
    assert main(["eval", "--weights", str(path), "--data", str(voc), "--workers", "0", "--no-progress",
                 "--json", str(js)]) == 0
    assert json.loads(js.read_text())["preprocessing"] == "caffe"
    capsys.readouterr()

    assert main(["eval", "--weights", str(path), "--data", str(voc), "--workers", "0", "--no-progress",
                 "--mode", "torchvision", "--json", str(js)]) == 0
    assert json.loads(js.read_text())["preprocessing"] == "torchvision"
    assert "--mode is deprecated; use --preprocessing" in capsys.readouterr().err
    for command in ("train", "eval"):
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert "--preprocessing" in text and not re.search(r"--mode\b", text)

    stage = CRFasRNNStage(preset="pydensecrf", preprocessing="caffe")
    crf = stage.build_crf(NUM_CLASSES)
    spec = dict(stage.to_dict(), mode=stage.preprocessing)
    del spec["preprocessing"]
    ckpt = dict(model={}, args=dict(num_classes=NUM_CLASSES, crf_rnn=spec),
                extra_head={f"crf.{k}": v for k, v in crf.state_dict().items()})
    assert repr(load_trained_crf(ckpt)) == repr(crf)
    torch.save(ckpt, tmp_path / "crf_old.pth")
    assert read_training_checkpoint(tmp_path / "crf_old.pth")["args"]["crf_rnn"]["preprocessing"] == "caffe"


def test_evaluate_takes_any_loader():
    """evaluate() takes a loader (as torchvision's): here a list of pairs whose labels are the model's own argmax
    on the preprocessed image (mIoU 1) and their complement in two classes (mIoU 0), in batches of two."""
    model = _tiny_model().eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 40, 48), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        own = model(normalize(images, "caffe")).argmax(1)
    assert len(own.unique()) > 1  # a meaningful case: several classes present
    loader = torch.utils.data.DataLoader(list(zip(images, own)), batch_size=2)
    result = evaluate(model, loader, num_classes=NUM_CLASSES, preprocessing="caffe", progress=False)
    assert result["num_images"] == 4 and result["miou"] == 1.0 and result["pixel_accuracy"] == 1.0
    wrong = torch.utils.data.DataLoader(list(zip(images, (own + 1) % NUM_CLASSES)), batch_size=2)
    result = evaluate(model, wrong, num_classes=NUM_CLASSES, preprocessing="caffe", progress=False)
    assert result["pixel_accuracy"] == 0.0 and result["miou"] == 0.0


def test_training_settings_take_the_recipes_and_the_init_checkpoint():
    from deeplab_fast.train import RECIPES, recipe_for_family, training_settings

    v3 = training_settings(recipe="v3_os16")
    r = RECIPES["v3_os16"]
    assert (v3["model"], v3["model_kwargs"], v3["init"]) == (r.model, dict(r.model_kwargs), r.init)
    assert (v3["steps"], v3["batch_size"], v3["lr"], v3["crop_size"]) == (r.steps, r.batch_size, r.lr, r.crop_size)
    assert v3["num_classes"] == 21 and v3["preprocessing"] is None
    mine = training_settings(recipe="v3_os16", steps=5, lr=0.5, model_kwargs={"aux_loss": True})
    assert mine["steps"] == 5 and mine["lr"] == 0.5 and mine["model_kwargs"] == {**r.model_kwargs, "aux_loss": True}
    v1 = training_settings(model=MODEL)
    family = recipe_for_family("v1")
    assert v1["steps"] == family.steps and v1["model_kwargs"] == dict(family.family_model_kwargs)
    saved = dict(model=MODEL, model_kwargs=TINY, num_classes=NUM_CLASSES, preprocessing="torchvision")
    stage = training_settings(init_args=saved, init="OUT/last.pth")
    assert (stage["model"], stage["model_kwargs"], stage["num_classes"], stage["preprocessing"]) == (
        MODEL, TINY, NUM_CLASSES, "torchvision")
    other = training_settings(model="deeplab_v3_resnet50", init_args=saved)  # another model: the checkpoint's
    assert other["num_classes"] == 21 and other["preprocessing"] is None  # options do not apply
    with pytest.raises(ValueError, match="is for deeplab_v3_resnet101"):
        training_settings(model=MODEL, recipe="v3_os16")
    with pytest.raises(ValueError, match="give a model or a recipe"):
        training_settings()
