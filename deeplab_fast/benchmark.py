"""Measuring the models' speed, shared by ``deeplab-fast bench`` and ``benchmarks/``: a synchronised per-call timer
(CUDA events on the GPU, the wall clock on the CPU), the device's description, torchvision's peer model, and the
images/s rows of one model in its forms (``optimize(model)``, plain torch, torchvision, v2 + dense CRF).
"""
from __future__ import annotations

import importlib
import importlib.util
import platform
import statistics
import sys
import time
import types
from pathlib import Path

__all__ = ["time_per_call", "device_name", "load_torchvision", "torchvision_model", "bench_rows", "logits_of"]

# What to install when torchvision is missing or does not match torch (README: "Install").
TORCHVISION_HINT = ("install the torchvision release made for your torch, from the same package index as torch "
                    "(e.g. torch 2.13.0 with torchvision 0.28.0; a CPU-only torch needs the +cpu torchvision of "
                    "https://download.pytorch.org/whl/cpu)")


def logits_of(out):
    """The main logits of a model's output: ``out["out"]`` for torchvision-style dicts, else ``out``."""
    return out["out"] if isinstance(out, dict) else out


def device_name(device) -> str:
    import torch

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
    import torch

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

TORCHVISION_BUILDERS = {"deeplab_v3_resnet50": "deeplabv3_resnet50", "deeplab_v3_resnet101": "deeplabv3_resnet101"}


def torchvision_model(name: str, num_classes: int, python_only: bool = False):
    """torchvision's own model for ``name`` (DeepLabV3 ResNet-50/101, random weights), or None when torchvision
    has no such model. Raises RuntimeError, with load_torchvision's note, when torchvision cannot be loaded."""
    if name not in TORCHVISION_BUILDERS:
        return None
    tv, note = load_torchvision(python_only)
    if tv is None:
        raise RuntimeError(f"torchvision {note}")
    from torchvision.models import segmentation

    return getattr(segmentation, TORCHVISION_BUILDERS[name])(weights=None, weights_backbone=None,
                                                            num_classes=num_classes, aux_loss=False)


def time_per_call(fn, device, repeat: int, warmup: int = 1) -> list[float]:
    """Seconds per call of fn(), synchronised (CUDA events on the GPU, wall clock on the CPU)."""
    import torch

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


def bench_forms(name: str, crf: bool = False) -> list[str]:
    """The forms ``bench_rows`` times for a model, in order (torchvision's only where it has the model and can be
    loaded)."""
    from . import models

    forms = ["deeplab_fast (optimize)", "plain torch (same architecture)"]
    if name in TORCHVISION_BUILDERS and load_torchvision()[0] is not None:
        forms.append("torchvision")
    if crf and models.model_entry(name).family == "v2":
        forms.append("deeplab_fast + dense CRF")
    return forms


def bench_rows(name: str, size: int, batch: int, device, dtype, repeat: int, crf: bool = False,
               num_classes: int = 21, warmup: int = 1, on_call=None) -> list[dict]:
    """images/s of one model in its forms (ours = optimize(model), plain torch, torchvision) on one input, and
    for the v2 network the network + dense CRF end to end. Each row: impl, median_s, images_per_s; a form that
    could not run (torchvision missing or not matching torch) is a row with ``skipped`` (why) and no times.
    Each form is called ``warmup`` times, then ``repeat`` timed times; ``on_call()``, if given, runs after each
    call (a progress bar)."""
    import torch

    from . import models, optimize
    from .nn import DenseCRF

    torch.manual_seed(0)
    plain = models.get_model(name, num_classes=num_classes).eval()
    forms = {"deeplab_fast (optimize)": optimize(plain), "plain torch (same architecture)": plain}
    skipped = {}
    try:
        tv = torchvision_model(name, num_classes)
    except RuntimeError as e:  # torchvision missing or not matching torch: the row says why
        tv = None
        skipped["torchvision"] = str(e)
    if tv is not None:
        forms["torchvision"] = tv.eval()
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    x = x.to(device=device, dtype=dtype).contiguous(memory_format=memory_format)

    def counted(fn):
        def call():
            out = fn()
            if on_call is not None:
                on_call()
            return out
        return call

    rows = []
    for impl, model in forms.items():
        model = model.to(device=device, dtype=dtype, memory_format=memory_format)
        with torch.no_grad():
            times = time_per_call(counted(lambda: model(x)), device, repeat, warmup)
        med = statistics.median(times)
        rows.append(dict(model=name, impl=impl, size=size, batch=batch, median_s=med, images_per_s=batch / med))
    if crf and models.model_entry(name).family == "v2":
        model = forms["deeplab_fast (optimize)"]
        layer = DenseCRF.from_preset("deeplab_v2_voc")
        image = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)

        def end_to_end():
            return layer(logits_of(model(x)).float(), image)

        with torch.no_grad():
            times = time_per_call(counted(end_to_end), device, repeat, warmup)
        med = statistics.median(times)
        rows.append(dict(model=name, impl="deeplab_fast + dense CRF", size=size, batch=batch, median_s=med,
                         images_per_s=batch / med))
    rows += [dict(model=name, impl=impl, size=size, batch=batch, median_s=None, images_per_s=None, skipped=why)
             for impl, why in skipped.items()]
    return rows
