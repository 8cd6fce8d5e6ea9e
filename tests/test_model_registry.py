"""The model registry (deeplab_fast/models/_api.py, zoo.py): list_models, get_model with weights by name, path or
URL, get_model_weights and the entries' meta / transforms. Downloads are tested against a real HTTP server on
127.0.0.1 started here (a good file, a wrong hash, a truncated file, a 404) into a temporary torch.hub cache; any
other address fails the test, so nothing else is reached."""
from __future__ import annotations

import hashlib
import http.server
import io
import threading
import urllib.request

import numpy as np
import pytest
import torch

from deeplab_fast import models
from deeplab_fast.cli import main
from deeplab_fast.data import VOC_CLASSES

TINY = {"width_divisor": 8}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A private torch.hub cache; urlopen only reaches 127.0.0.1."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    real = torch.hub.urlopen

    def local_only(req, *a, **k):
        url = req.full_url if isinstance(req, urllib.request.Request) else req
        assert url.startswith(("http://127.0.0.1:", "file://")), f"the test reached out to {url}"
        return real(req, *a, **k)

    monkeypatch.setattr(torch.hub, "urlopen", local_only)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    return cache


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the network was used")

    monkeypatch.setattr(torch.hub, "urlopen", refuse)


class _Server:
    """An HTTP server on 127.0.0.1 serving ``files`` (path -> bytes); ``truncate`` paths send half the bytes
    after a full Content-Length; unknown paths answer 404."""

    def __init__(self):
        self.files, self.truncate, self.requests = {}, set(), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if self.path in outer.truncate else body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def _tiny_checkpoint(num_classes: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = models.get_model("deeplab_v1_largefov", num_classes=num_classes, **TINY).eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return model, buf.getvalue()


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------------------------------
# The registry


def test_list_models_and_weights_enums():
    names = models.list_models()
    assert names == sorted(models.MODELS) == ["deeplab_v1_largefov", "deeplab_v1_msc_largefov",
                                              "deeplab_v2_resnet101", "deeplab_v3_mobilenet_v3_large",
                                              "deeplab_v3_resnet101", "deeplab_v3_resnet50",
                                              "deeplab_v3plus_mobilenet_v2", "deeplab_v3plus_resnet101",
                                              "deeplab_v3plus_resnet50", "lraspp_mobilenet_v3_large"]
    for name in names:
        enum = models.get_model_weights(name)
        assert issubclass(enum, models.WeightsEnum) and len(enum) >= 1
        assert models.get_model_weights(models.MODELS[name]) is enum  # by builder too
        for member in enum:
            meta = member.meta
            assert {"num_classes", "categories", "normalization", "source", "recipe"} <= set(meta)
            assert meta["normalization"]["mode"] in ("caffe", "torchvision")
            assert member.transforms().mode == meta["normalization"]["mode"]
            if meta["categories"] is not None:
                assert meta["num_classes"] == len(meta["categories"])
            assert models.get_weight(repr(member)) is member

    w = models.get_model_weights("deeplab_v3_resnet101")
    assert w.DEFAULT is w.COCO_WITH_VOC_LABELS_V1
    assert w.DEFAULT.url == "https://download.pytorch.org/models/deeplabv3_resnet101_coco-586e9e4e.pth"
    assert w.DEFAULT.meta["categories"] == VOC_CLASSES and len(VOC_CLASSES) == 21
    assert w.DEFAULT.meta["normalization"]["mode"] == "torchvision"
    assert w.DEFAULT.model_kwargs == {"num_classes": 21, "aux_loss": True}
    assert models.DeepLabV3_ResNet50_Weights.DEFAULT.url.endswith("deeplabv3_resnet50_coco-cd0a2569.pth")
    assert w.IMAGENET1K_BACKBONE.url.endswith("resnet101-63fe2227.pth") and w.IMAGENET1K_BACKBONE.backbone_only
    assert models.DeepLabV1_LargeFOV_Weights.IMAGENET1K_VGG16_BACKBONE.url.endswith("vgg16-397923af.pth")
    v2 = models.DeepLabV2_ResNet101_Weights
    assert v2.DEFAULT is v2.VOC_AUG_CAFFE_V1 and v2.DEFAULT.converter is models.convert_kazuto_deeplabv2
    assert v2.DEFAULT.meta["normalization"]["mode"] == "caffe" and v2.DEFAULT.meta["num_classes"] == 21
    assert v2.COCO_STUFF164K_V1.meta["num_classes"] == 182 and not v2.DEFAULT.check_hash
    assert v2.COCO_INIT_CAFFE.url is None and v2.COCO_INIT_CAFFE.backbone_only

    with pytest.raises(ValueError, match="unknown model 'deeplab_v4'"):
        models.get_model_weights("deeplab_v4")
    with pytest.raises(ValueError, match="not one of the weights"):
        w.verify("IMAGENET1K_V9")


def test_weights_of_another_model_and_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="are not weights of deeplab_v3_resnet50"):
        models.get_model("deeplab_v3_resnet50", weights=models.DeepLabV3_ResNet101_Weights.DEFAULT)
    with pytest.raises(FileNotFoundError, match="no such file, and not a registered weights name.*DEFAULT"):
        models.get_model("deeplab_v3_resnet50", weights="NOT_A_NAME")
    with pytest.raises(ValueError, match="conflicting|does not fit these weights"):
        models.build_model("deeplab_v3_resnet50", {}, weights=models.DeepLabV3_ResNet50_Weights.DEFAULT,
                           num_classes=5)


def test_cached_checkpoint_loads_by_name_without_network(hub, no_network):
    torch.manual_seed(0)
    reference = models.get_model("deeplab_v3_resnet50", num_classes=21, aux_loss=True).eval()
    torch.save(reference.state_dict(), hub / "deeplabv3_resnet50_coco-cd0a2569.pth")
    for name in ("DEFAULT", "COCO_WITH_VOC_LABELS_V1", "DeepLabV3_ResNet50_Weights.DEFAULT"):
        model = models.get_model("deeplab_v3_resnet50", weights=name).eval()
        assert model.aux_loss and model.num_classes == 21
        assert _same_weights(model, reference), name
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        torch.testing.assert_close(model(x)["out"], reference(x)["out"], rtol=0, atol=0)


def test_download_good_file_then_from_the_cache(hub, server):
    model, data = _tiny_checkpoint()
    sha = hashlib.sha256(data).hexdigest()
    server.files[f"/w/tiny-{sha[:8]}.pth"] = data
    url = server.url(f"/w/tiny-{sha[:8]}.pth")
    got = models.get_model("deeplab_v1_largefov", weights=url, **TINY)  # classes read from the checkpoint: 3
    assert got.num_classes == 3 and _same_weights(got, model)
    assert (hub / f"tiny-{sha[:8]}.pth").read_bytes() == data
    server.close()  # the second call must not need the server
    again = models.get_model("deeplab_v1_largefov", weights=url, **TINY)
    assert _same_weights(again, model)
    assert len(server.requests) == 1


def test_download_wrong_hash_is_refused_and_not_cached(hub, server):
    _, data = _tiny_checkpoint()
    server.files["/w/tiny-0123abcd.pth"] = data  # the name promises another sha256
    with pytest.raises(models.CheckpointError, match="sha256 does not match"):
        models.get_model("deeplab_v1_largefov", weights=server.url("/w/tiny-0123abcd.pth"), **TINY)
    assert list(hub.iterdir()) == []


def test_download_truncated_file(hub, server):
    _, data = _tiny_checkpoint()
    sha = hashlib.sha256(data).hexdigest()
    for path in (f"/w/tiny-{sha[:8]}.pth", "/w/unhashed.pth"):
        server.files[path] = data
        server.truncate.add(path)
    with pytest.raises(models.CheckpointError, match="sha256 does not match"):
        models.get_model("deeplab_v1_largefov", weights=server.url(f"/w/tiny-{sha[:8]}.pth"), **TINY)
    assert list(hub.iterdir()) == []
    # Without a hash in the name the truncated file is caught when it is read, and removed from the cache.
    with pytest.raises(models.CheckpointError, match="not a weights-only PyTorch checkpoint.*removed it"):
        models.get_model("deeplab_v1_largefov", weights=server.url("/w/unhashed.pth"), **TINY)
    assert list(hub.iterdir()) == []


def test_download_404(hub, server):
    with pytest.raises(OSError, match="download failed.*404"):
        models.get_model("deeplab_v1_largefov", weights=server.url("/missing-01234567.pth"), **TINY)
    assert list(hub.iterdir()) == []


def test_segment_download_errors_are_one_line_exit_1(hub, server, tmp_path, capsys):
    from PIL import Image

    Image.fromarray(np.zeros((17, 19, 3), np.uint8)).save(tmp_path / "im.png")
    _, data = _tiny_checkpoint()
    server.files["/w/tiny-0123abcd.pth"] = data
    for path in ("/w/tiny-0123abcd.pth", "/nothing-01234567.pth"):
        code = main(["segment", str(tmp_path / "im.png"), "--model", "deeplab_v1_largefov", "--weights",
                     server.url(path), "--out", str(tmp_path / "o"), "--device", "cpu"])
        err = capsys.readouterr().err
        assert code == 1, err
        lines = [line for line in err.strip().splitlines() if "B/s]" not in line]  # the download's progress bar
        assert len(lines) == 1 and lines[0].startswith("deeplab-fast segment: error: --weights 'http://127.0.0.1")
        assert "Traceback" not in err


def test_file_url_and_path(hub, tmp_path):
    model, data = _tiny_checkpoint(num_classes=4, seed=1)
    path = tmp_path / "mine.pth"
    path.write_bytes(data)
    by_path = models.get_model("deeplab_v1_largefov", weights=str(path), **TINY)
    by_url = models.get_model("deeplab_v1_largefov", weights=path.as_uri(), **TINY)
    assert by_path.num_classes == by_url.num_classes == 4
    assert _same_weights(by_path, model) and _same_weights(by_url, model)
    assert (hub / "mine.pth").exists()  # URLs go through torch.hub's cache; paths are read in place
    # A path's normalisation is the model's default; registered file names get their entry's.
    assert models.resolve_weights("deeplab_v1_largefov", str(path)).meta["normalization"]["mode"] == "caffe"
    named = tmp_path / "deeplabv2_resnet101_msc-vocaug-20000.pth"
    named.write_bytes(data)
    resolved = models.resolve_weights("deeplab_v2_resnet101", str(named))
    assert resolved.url == str(named) and resolved.converter is models.convert_kazuto_deeplabv2
    assert resolved.meta["categories"] == VOC_CLASSES


def test_weights_of_another_architecture(tmp_path):
    _, data = _tiny_checkpoint()
    path = tmp_path / "v1.pth"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=r"missing keys \(backbone\..*unexpected keys \(features\."):
        models.get_model("deeplab_v3_resnet50", weights=str(path), num_classes=3)
    with pytest.raises(ValueError, match="cannot tell the number of classes.*classifier.4.weight"):
        models.get_model("deeplab_v3_resnet50", weights=str(path))


def test_backbone_weights_fill_only_the_backbone(hub, no_network):
    import torchvision

    torch.manual_seed(0)
    vgg = torchvision.models.vgg16()
    torch.save(vgg.state_dict(), hub / "vgg16-397923af.pth")
    torch.manual_seed(1)
    model = models.get_model("deeplab_v1_largefov", weights="IMAGENET1K_VGG16_BACKBONE", num_classes=5)
    assert model.num_classes == 5
    assert torch.equal(model.features[0].weight, vgg.features[0].weight)
    torch.manual_seed(1)
    assert torch.equal(model.fc8.weight, models.get_model("deeplab_v1_largefov", num_classes=5).fc8.weight)


def test_not_downloadable_entry_explains(hub):
    with pytest.raises(ValueError, match="not downloadable.*convert.py --dataset coco.*deeplabv1_resnet101-coco"):
        models.get_model("deeplab_v2_resnet101", weights="COCO_INIT_CAFFE")


def test_transforms_normalise_as_the_weights_expect():
    rgb = np.random.default_rng(0).integers(0, 256, (2, 9, 11, 3), dtype=np.uint8)
    tv = models.DeepLabV3_ResNet50_Weights.DEFAULT.transforms()(rgb)
    caffe = models.DeepLabV2_ResNet101_Weights.DEFAULT.transforms()(rgb)
    assert tv.shape == caffe.shape == (2, 3, 9, 11) and tv.dtype == torch.float32
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float()
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(tv, (x / 255 - mean) / std)
    torch.testing.assert_close(caffe, x.flip(1) - torch.tensor([104.008, 116.669, 122.675]).view(3, 1, 1))
    torch.testing.assert_close(models.preprocess(rgb, "deeplab_v3_resnet50"), tv)
