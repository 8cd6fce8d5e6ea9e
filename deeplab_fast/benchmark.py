"""Measuring the models' speed, shared by ``deeplab-fast bench`` and ``benchmarks/``: a synchronised per-call timer
(CUDA events on the GPU, the wall clock on the CPU), the device's description, torchvision's peer model, and the
images/s rows of one model in its forms (``optimize(model)``, plain torch, torchvision, v2 + dense CRF).
"""
from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

__all__ = ["time_per_call", "device_name", "torchvision_model", "bench_rows", "logits_of"]


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


def torchvision_model(name: str, num_classes: int):
    """torchvision's own model for ``name`` (DeepLabV3 ResNet-50/101, random weights), or None when torchvision
    has none or cannot be imported."""
    tv_builders = {"deeplab_v3_resnet50": "deeplabv3_resnet50", "deeplab_v3_resnet101": "deeplabv3_resnet101"}
    if name not in tv_builders:
        return None
    try:
        from torchvision.models import segmentation
    except Exception:  # noqa: BLE001 - torchvision is optional (and its C ops may not load on the CPU wheel)
        return None
    return getattr(segmentation, tv_builders[name])(weights=None, weights_backbone=None, num_classes=num_classes,
                                                   aux_loss=False)


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


def bench_rows(name: str, size: int, batch: int, device, dtype, repeat: int, crf: bool = False,
               num_classes: int = 21) -> list[dict]:
    """images/s of one model in its forms (ours = optimize(model), plain torch, torchvision) on one input, and
    for the v2 network the network + dense CRF end to end. Each row: impl, median_s, images_per_s."""
    import torch

    from . import models, optimize
    from .nn import DenseCRF

    torch.manual_seed(0)
    plain = models.get_model(name, num_classes=num_classes).eval()
    forms = {"deeplab_fast (optimize)": optimize(plain), "plain torch (same architecture)": plain}
    tv = torchvision_model(name, num_classes)
    if tv is not None:
        forms["torchvision"] = tv.eval()
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    x = x.to(device=device, dtype=dtype).contiguous(memory_format=memory_format)
    rows = []
    for impl, model in forms.items():
        model = model.to(device=device, dtype=dtype, memory_format=memory_format)
        with torch.no_grad():
            times = time_per_call(lambda: model(x), device, repeat)
        med = statistics.median(times)
        rows.append(dict(model=name, impl=impl, size=size, batch=batch, median_s=med, images_per_s=batch / med))
    if crf and models.model_entry(name).family == "v2":
        model = forms["deeplab_fast (optimize)"]
        layer = DenseCRF.from_preset("deeplab_v2_voc")
        image = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)

        def end_to_end():
            return layer(logits_of(model(x)).float(), image)

        with torch.no_grad():
            times = time_per_call(end_to_end, device, repeat)
        med = statistics.median(times)
        rows.append(dict(model=name, impl="deeplab_fast + dense CRF", size=size, batch=batch, median_s=med,
                         images_per_s=batch / med))
    return rows
