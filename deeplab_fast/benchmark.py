"""Measuring the models' speed, shared by ``deeplab-fast bench`` and ``benchmarks/``: a synchronised per-call timer
(CUDA events on the GPU, the wall clock on the CPU), the device's description, the peer models (torchvision's, and
segmentation_models_pytorch's DeepLabV3Plus), and the images/s rows of one model in its forms (``optimize(model)``,
plain torch, the peers, the network + dense CRF where its weights name a CRF preset).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch

from . import models, optimize
from .nn import DenseCRF

__all__ = ["time_per_call", "device_name", "load_torchvision", "torchvision_model", "load_smp", "smp_model",
           "smp_size", "crf_preset", "bench_forms", "bench_rows", "logits_of"]

# What to install when torchvision is missing or does not match torch (README: "Install").
TORCHVISION_HINT = ("install the torchvision release made for your torch, from the same package index as torch "
                    "(e.g. torch 2.13.0 with torchvision 0.28.0; a CPU-only torch needs the +cpu torchvision of "
                    "https://download.pytorch.org/whl/cpu)")


def logits_of(out):
    """The main logits of a model's output: ``out["out"]`` for torchvision-style dicts, else ``out``."""
    return out["out"] if isinstance(out, dict) else out


def device_name(device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.multi_processor_count} SMs), torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def load_torchvision(python_only: bool = False):
    """(torchvision, note): the torchvision module, or None, and a sentence saying why not, or how it was loaded
    (empty when it imported normally). deeplab_fast needs no torchvision; ``bench`` and the test and benchmark
    suites use its models as peers and references.

    torchvision's compiled ops work only with the torch build they were made for: PyPI's Linux torchvision is made
    for PyPI's CUDA torch, and beside a CPU-only torch its import fails ("operator torchvision::nms does not
    exist"). With ``python_only=True`` (the test suites), torchvision is then imported without registering those
    ops: its Python model code needs none of them, and the note says so. ``deeplab-fast bench`` does not do that:
    it reports the note instead of a torchvision column.
    """
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"], _TORCHVISION_NOTE.get("note", "")
    if importlib.util.find_spec("torchvision") is None:
        return None, f"not installed ({TORCHVISION_HINT})"
    try:
        return importlib.import_module("torchvision"), ""
    except Exception as e:  # noqa: BLE001 - any failure of a third-party import is reported, not raised
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[mod]
        if not python_only or torch.version.cuda is not None:
            return None, (f"cannot be imported with torch {torch.__version__} ({error}): {TORCHVISION_HINT}")
    # The compiled ops cannot load (a CUDA torchvision beside a CPU torch): import its Python code without them.
    stub = "torchvision._meta_registrations"
    sys.modules[stub] = types.ModuleType(stub)
    try:
        tv = importlib.import_module("torchvision")
    except Exception as e:  # noqa: BLE001
        del sys.modules[stub]
        return None, f"cannot be imported even without its compiled ops ({type(e).__name__}: {e})"
    _TORCHVISION_NOTE["note"] = (f"{tv.__version__}: its compiled ops do not load with torch {torch.__version__} "
                                 f"({error}); its Python model code is used without them")
    return tv, _TORCHVISION_NOTE["note"]


_TORCHVISION_NOTE: dict = {}

# deeplab_fast's models that torchvision has (its builder's name); torchvision's weights load into ours as they are.
TORCHVISION_BUILDERS = {"deeplab_v3_resnet50": "deeplabv3_resnet50", "deeplab_v3_resnet101": "deeplabv3_resnet101",
                        "deeplab_v3_mobilenet_v3_large": "deeplabv3_mobilenet_v3_large",
                        "lraspp_mobilenet_v3_large": "lraspp_mobilenet_v3_large"}
# deeplab_fast's DeepLab v3+ models and segmentation_models_pytorch's encoder name for the same backbone
# (``flavor="smp"``: its architecture, whose state dicts load into ours).
SMP_ENCODERS = {"deeplab_v3plus_resnet50": "resnet50", "deeplab_v3plus_resnet101": "resnet101",
                "deeplab_v3plus_mobilenet_v2": "mobilenet_v2"}
SMP_OUTPUT_STRIDE = 16


def torchvision_model(name: str, num_classes: int, python_only: bool = False):
    """torchvision's own model for ``name`` (``TORCHVISION_BUILDERS``: DeepLabV3 ResNet-50/101, the mobile
    DeepLabV3 and LR-ASPP; random weights, no auxiliary head), or None when torchvision has no such model. Raises
    RuntimeError, with load_torchvision's note, when torchvision cannot be loaded."""
    if name not in TORCHVISION_BUILDERS:
        return None
    tv, note = load_torchvision(python_only)
    if tv is None:
        raise RuntimeError(f"torchvision {note}")
    from torchvision.models import segmentation  # optional peer: loaded only when asked for (load_torchvision)

    return getattr(segmentation, TORCHVISION_BUILDERS[name])(weights=None, weights_backbone=None,
                                                            num_classes=num_classes, aux_loss=False)


def load_smp(python_only: bool = False):
    """(segmentation_models_pytorch, "") or (None, why not). It imports torchvision (through timm), so it needs
    what :func:`load_torchvision` needs; hub downloads are kept off (``HF_HUB_OFFLINE``: only random weights are
    built)."""
    if importlib.util.find_spec("segmentation_models_pytorch") is None:
        return None, "not installed (pip install segmentation-models-pytorch)"
    tv, note = load_torchvision(python_only)
    if tv is None:
        return None, f"needs torchvision, which {note}"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return importlib.import_module("segmentation_models_pytorch"), ""
    except Exception as e:  # noqa: BLE001 - any failure of a third-party import is reported, not raised
        return None, f"cannot be imported ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def smp_model(name: str, num_classes: int, python_only: bool = False):
    """segmentation_models_pytorch's ``DeepLabV3Plus`` for ``name`` (``SMP_ENCODERS``, encoder output stride
    ``SMP_OUTPUT_STRIDE``, random weights), or None when it has no such model. RuntimeError (why) when smp cannot
    be loaded. Its inputs must be multiples of 16 (:func:`smp_size`)."""
    if name not in SMP_ENCODERS:
        return None
    smp, note = load_smp(python_only)
    if smp is None:
        raise RuntimeError(f"segmentation_models_pytorch {note}")
    return smp.DeepLabV3Plus(SMP_ENCODERS[name], encoder_weights=None, encoder_output_stride=SMP_OUTPUT_STRIDE,
                             classes=num_classes)


def smp_size(size: int) -> int:
    """The input side smp accepts: ``size`` rounded down to a multiple of 16 (at least 16)."""
    return max(16, size // 16 * 16)


def crf_preset(name: str):
    """The dense CRF preset the model's published numbers use (its weights' ``meta["crf_preset"]``), or None."""
    return next((w.meta["crf_preset"] for w in models.get_model_weights(name) if w.meta.get("crf_preset")), None)


def time_per_call(fn, device, repeat: int, warmup: int = 1) -> list[float]:
    """Seconds per call of fn(), synchronised (CUDA events on the GPU, wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


OURS, PLAIN, TORCHVISION = "deeplab_fast (optimize)", "plain torch (same architecture)", "torchvision"
OURS_SMP, SMP, CRF = "deeplab_fast smp flavor (optimize)", "segmentation_models_pytorch", "deeplab_fast + dense CRF"


def bench_forms(name: str, crf: bool = False) -> list[str]:
    """The forms ``bench_rows`` times for a model, in order (torchvision's and smp's only where they have the model
    and can be loaded; the CRF's where the weights name a preset)."""
    forms = [OURS, PLAIN]
    if name in TORCHVISION_BUILDERS and load_torchvision()[0] is not None:
        forms.append(TORCHVISION)
    if name in SMP_ENCODERS and load_smp()[0] is not None:
        forms += [OURS_SMP, SMP]
    if crf and crf_preset(name):
        forms.append(CRF)
    return forms


def bench_rows(name: str, size: int, batch: int, device, dtype, repeat: int, crf: bool = False,
               num_classes: int = 21, warmup: int = 1, on_call=None) -> list[dict]:
    """images/s of one model in its forms on one input: ours = ``optimize(model)``, plain torch (the model as built),
    torchvision's model (DeepLabV3 ResNet-50/101 and the mobile models), and for the v3+ models our ``flavor="smp"``
    model (optimized) beside segmentation_models_pytorch's ``DeepLabV3Plus`` at ``smp_size(size)`` (smp needs
    multiples of 16); for a model whose weights name a CRF preset (v2) the network + dense CRF end to end. Each
    row: model, impl, size, batch, median_s, images_per_s; a form that could not run (torchvision or smp missing
    or not matching torch) is a row with ``skipped`` (why) and no times. Each form is called ``warmup`` times,
    then ``repeat`` timed times; ``on_call()``, if given, runs after each call (a progress bar)."""
    torch.manual_seed(0)
    plain = models.get_model(name, num_classes=num_classes).eval()
    forms = {OURS: (optimize(plain), size), PLAIN: (plain, size)}
    skipped = {}
    try:
        tv = torchvision_model(name, num_classes)
    except RuntimeError as e:  # torchvision missing or not matching torch: the row says why
        tv = None
        skipped[TORCHVISION] = str(e)
    if tv is not None:
        forms[TORCHVISION] = (tv.eval(), size)
    if name in SMP_ENCODERS:
        try:
            peer = smp_model(name, num_classes)
        except RuntimeError as e:
            skipped[SMP] = str(e)
        else:
            ours_smp = models.get_model(name, num_classes=num_classes, flavor="smp", output_stride=SMP_OUTPUT_STRIDE)
            forms[OURS_SMP] = (optimize(ours_smp.eval()), smp_size(size))
            forms[SMP] = (peer.eval(), smp_size(size))
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format

    def image(side):
        x = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1))
        return x.to(device=device, dtype=dtype).contiguous(memory_format=memory_format)

    def counted(fn):
        def call():
            out = fn()
            if on_call is not None:
                on_call()
            return out
        return call

    def row(impl, fn, side):
        with torch.no_grad():
            times = time_per_call(counted(fn), device, repeat, warmup)
        med = statistics.median(times)
        return dict(model=name, impl=impl, size=side, batch=batch, median_s=med, images_per_s=batch / med)

    rows = []
    for impl, (model, side) in forms.items():
        model = model.to(device=device, dtype=dtype, memory_format=memory_format)
        x = image(side)
        rows.append(row(impl, lambda: model(x), side))
    preset = crf_preset(name) if crf else None
    if preset:
        model, x = forms[OURS][0], image(size)
        layer = DenseCRF.from_preset(preset)
        rgb = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
        rows.append(row(CRF, lambda: layer(logits_of(model(x)).float(), rgb), size))
    rows += [dict(model=name, impl=impl, size=size, batch=batch, median_s=None, images_per_s=None, skipped=why)
             for impl, why in skipped.items()]
    return rows
