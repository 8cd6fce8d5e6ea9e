"""The "poly" learning-rate policy and the DeepLab parameter groups.

Sources: Chen et al., "DeepLab: ..." (v2), TPAMI 2017, sec. 4.1 ("poly" policy, lr x (1 - iter/max_iter)^power,
power 0.9; base lr 1e-3 (v1 / v2 VGG) or 2.5e-4 (v2 ResNet), momentum 0.9, weight decay 5e-4, the final
classifier at 10x), following Liu et al., ParseNet (2015); the released Caffe prototxts (``lr_mult: 10 / 20`` on
fc8, ``lr_mult: 2, decay_mult: 0`` on biases); Chen et al., "Rethinking Atrous Convolution ..." (v3),
arXiv:1706.05587, sec. 4.1 (poly, power 0.9, base lr 0.007); torchvision's segmentation reference (10x on the
auxiliary classifier's lr as well).
"""
from __future__ import annotations

import numbers
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["poly_lr", "param_groups", "HEAD_ATTRIBUTES"]

# Attribute names of the classifier ("head") modules trained at head_lr_mult: deeplab_fast.models use ``fc8`` and
# ``msc`` (v1 LargeFOV / MSc-LargeFOV: the final 1x1 conv and the multi-scale branches), ``aspp`` (v2: the
# ASPP classifier), ``classifier`` / ``aux_classifier`` (v3, LR-ASPP and v3+: torchvision's names),
# ``low_level`` / ``decoder`` (v3+: the low-level projection and the decoder, new layers like the ASPP).
HEAD_ATTRIBUTES = ("fc8", "aspp", "classifier", "aux_classifier", "msc", "low_level", "decoder")


def poly_lr(optimizer: torch.optim.Optimizer, max_steps: int, power: float = 0.9,
            start_step: int = 0) -> torch.optim.lr_scheduler.PolynomialLR:
    """``torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=max_steps, power=power)``: after ``k`` calls
    of ``scheduler.step()`` each group's lr is ``base_lr * (1 - k / max_steps) ** power`` (0 from ``max_steps``
    on; each group keeps its own base lr, so the head's 10x stays 10x). Step it once per iteration, after
    ``optimizer.step()``.

    ``start_step`` > 0 starts the schedule there, as if it had been stepped ``start_step`` times (a resumed run
    whose schedule length changed): each group's lr is set to the closed form at that step from its
    ``initial_lr`` (its ``lr`` if it has none). ValueError for ``max_steps`` < 1 (not an int), a negative
    ``power`` or ``start_step``."""
    if isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral) or max_steps < 1:
        raise ValueError(f"poly_lr: max_steps must be an int >= 1, got {max_steps!r}")
    if isinstance(power, bool) or not isinstance(power, numbers.Real) or not power >= 0:
        raise ValueError(f"poly_lr: power must be a real number >= 0, got {power!r}")
    if isinstance(start_step, bool) or not isinstance(start_step, numbers.Integral) or start_step < 0:
        raise ValueError(f"poly_lr: start_step must be an int >= 0, got {start_step!r}")
    if start_step == 0:
        return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=int(max_steps), power=float(power))
    factor = max(0.0, 1.0 - min(start_step, max_steps) / max_steps) ** float(power)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor
    # Constructed at last_epoch = start_step - 1, the scheduler takes its initial step to start_step and keeps
    # the groups' lrs; its later steps follow the recursive form from there.
    return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=int(max_steps), power=float(power),
                                                 last_epoch=int(start_step) - 1)


def _head_modules(model: nn.Module, head) -> List[nn.Module]:
    if head is not None:
        mods = [head] if isinstance(head, nn.Module) else head
        if isinstance(mods, (str, bytes)) or not isinstance(mods, Sequence) or not mods \
                or not all(isinstance(m, nn.Module) for m in mods):
            raise ValueError(f"param_groups: head must be an nn.Module or a non-empty list of them, got {head!r}")
        return list(mods)
    mods = [getattr(model, n) for n in HEAD_ATTRIBUTES if isinstance(getattr(model, n, None), nn.Module)]
    if not mods:
        raise ValueError(f"param_groups: {type(model).__name__} has none of the head attributes "
                         f"{', '.join(HEAD_ATTRIBUTES)}; pass head= (a module or a list of modules)")
    return mods


def param_groups(model: nn.Module, base_lr: float, weight_decay: float = 5e-4, head_lr_mult: float = 10.0,
                 head: Optional[Union[nn.Module, Sequence[nn.Module]]] = None) -> List[Dict]:
    """Parameter groups for ``torch.optim.SGD``: the backbone at ``base_lr``, the classifier ("head") at
    ``head_lr_mult * base_lr`` (the DeepLab recipes' 10x for the final classifier, TPAMI 2017 sec. 4.1).

    The head is ``head`` (a module or a list of modules, which must belong to ``model``) if given, else the
    model's modules among ``HEAD_ATTRIBUTES`` (``fc8``, ``aspp``, ``classifier``, ``aux_classifier``, ``msc``;
    attributes that are None or not modules are skipped); ValueError if there is none. Biases (parameters whose
    name ends in ``bias``) get no weight decay, as the Caffe prototxts' ``decay_mult: 0``; the Caffe models'
    2x lr on biases is not reproduced. Only trainable parameters (``requires_grad``) are included, each in
    exactly one group, shared parameters once.

    Returns up to four dicts, empty ones left out, in this order: backbone weights (``base_lr``,
    ``weight_decay``), head weights (``head_lr_mult * base_lr``, ``weight_decay``), backbone biases, head biases
    (no decay). Each has ``params``, ``lr``, ``weight_decay``, ``lr_mult`` (1 or head_lr_mult) and ``name``
    (``"backbone"``, ``"head"``, ``"backbone_bias"``, ``"head_bias"``); SGD keeps the extra keys.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"param_groups: model must be an nn.Module, got {type(model).__name__}")
    for name, v in (("base_lr", base_lr), ("weight_decay", weight_decay), ("head_lr_mult", head_lr_mult)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v >= 0:
            raise ValueError(f"param_groups: {name} must be a real number >= 0, got {v!r}")
    head_ids = set()
    for m in _head_modules(model, head):
        head_ids.update(id(p) for p in m.parameters())
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    model_ids = {id(p) for _, p in model.named_parameters()}
    if head is not None and not head_ids <= model_ids:
        raise ValueError("param_groups: head has parameters that are not the model's")
    buckets = {"backbone": [], "head": [], "backbone_bias": [], "head_bias": []}
    for n, p in named:
        key = "head" if id(p) in head_ids else "backbone"
        if n.endswith("bias"):
            key += "_bias"
        buckets[key].append(p)
    settings = {
        "backbone": (1.0, weight_decay), "head": (float(head_lr_mult), weight_decay),
        "backbone_bias": (1.0, 0.0), "head_bias": (float(head_lr_mult), 0.0),
    }
    groups = []
    for key, params in buckets.items():
        if params:
            mult, decay = settings[key]
            groups.append({"params": params, "lr": float(base_lr) * mult, "weight_decay": float(decay),
                           "lr_mult": mult, "name": key})
    if not groups:
        raise ValueError(f"param_groups: {type(model).__name__} has no trainable parameters")
    return groups
