"""``deeplab_fast.optimize``: rewrites a model's layers into this library's fused ones, for inference.

``optimize(model)`` walks any ``nn.Module`` and applies only rewrites whose dataflow it can prove:

1. **Conv (+ BN) (+ ReLU) chains inside a chain container.** A chain container is a module whose forward
   is known to feed each child's output to the next child: ``nn.Sequential`` and its subclasses that keep
   ``Sequential.forward`` (torchvision's ``DeepLabHead``, ``FCNHead``, ``ASPPConv``, ...), torchvision's
   ``ASPPPooling`` (children in order, then an upsampling) and torchvision's ``IntermediateLayerGetter``
   (children in order; the outputs of its ``return_layers`` are also returned, so a chain may end at such a
   child but not pass through one). Consecutive children ``Conv2d`` [``BatchNorm2d``] [``ReLU``] (at least
   two of them) become one ``deeplab_fast.nn.AtrousConv2dReLU`` at the conv's position and ``nn.Identity``
   at the others' positions, so later indices and the other children's state-dict keys do not move.
   Eligible: an ``nn.Conv2d`` (exactly that class) with ``groups == 1``, ``padding_mode='zeros'``, integer
   padding or ``'valid'`` or a symmetric ``'same'``, float32/float64/float16/bfloat16 weights, any kernel
   size, stride, dilation, with or without bias; an ``nn.BatchNorm2d`` (or ``nn.SyncBatchNorm``) over its
   output channels; an ``nn.ReLU``. A **grouped** conv (the depthwise convs of MobileNets) followed by an
   eval-mode BN becomes one ``nn.Conv2d`` with the BN folded into its weight and bias (the fused op takes
   groups = 1 only); its activation (ReLU, ReLU6, hard-swish) stays a torch op, as do MobileNetV3's
   squeeze-excitation blocks: elementwise passes and a per-image gate that a fused kernel would not
   speed up on the CPU.
2. **torchvision ResNet blocks** (``torchvision.models.resnet.Bottleneck`` and ``BasicBlock``, exactly those
   classes, whose forward computes ``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x))))))))) + shortcut)``
   with the ReLU after the residual add) become ``FusedResNetBlock``: the main path as a ``Sequential``
   (``conv1, bn1, relu, conv2, bn2, relu, conv3, bn3``) fused by rule 1, so ``conv3 + bn3`` becomes an
   ``AtrousConv2dReLU`` without ReLU, the same shortcut (``downsample``, itself a Sequential fused by rule 1)
   and the same final ReLU. A block where nothing is eligible (e.g. every conv grouped) is left as is.
3. **torchvision's DeepLab-v3 ASPP** (``torchvision.models.segmentation.deeplabv3.ASPP``, found by class name
   and module path: torchvision is not imported) becomes ``deeplab_fast.nn.ASPP`` (``ASPP.from_torchvision``:
   the same weights, buffers, per-submodule training flags and ``requires_grad`` flags), whose eval path on
   CUDA is fused. Only when the two module trees match layer for layer (3 atrous rates, the same conv / BN /
   dropout settings); otherwise its inner Sequentials are fused by rule 1.

The layers of ``deeplab_fast.nn`` (``ASPP``, ``AtrousSeparableConv2d``, ``AtrousConv2dReLU``) are already
fused: in eval mode they fold their BNs at each call and run the fused op, so DeepLab v3+ and the mobile DeepLabs
are optimized end to end by rules 1 and 2 on their backbones, decoders and heads.

Nothing else is touched: a custom module's attributes are never fused by their names (its forward is not
visible), ``deeplab_fast.nn`` modules, TorchScript modules and ``torch.fx.GraphModule`` s are not entered,
and a chain any of whose modules has hooks (forward, pre-forward or backward) is left alone, as is a
ResNet block or ASPP with hooks. The top-level module itself is never replaced (its children are): wrap a bare
torchvision ASPP or ResNet block in an ``nn.Sequential`` to have it swapped. ``optimize`` is idempotent.

**BatchNorm.** When the chain is in eval mode at ``optimize()`` time (conv and BN both ``eval()``) and BN
tracks running statistics, BN is folded into the new layer's weight and bias (``weight * s``,
``beta + (bias - mean) * s``, ``s = gamma / sqrt(var + eps)``, computed in float32 or better) and the BN
module is gone. Otherwise (a model in training mode, a BN without running statistics) the BN module is kept
inside the fused layer (``AtrousConv2dReLU.bn``, shared, not copied): training goes on exactly as before
(batch statistics, running-statistics updates, the same parameters), and in eval mode BN is folded into the
op's per-channel scale and bias at every call, a little slower than folding once. For the full speed-up call
``model.eval()`` before ``optimize()``.

Notes:
  - The eval outputs are those of the original model up to rounding (the folded BN rounds differently:
    about 1e-6 relative in float32). Training-mode outputs are unchanged too where BN was kept.
  - It is meant for inference: folding removes BN modules and changes the parameter set, so the optimized
    model's ``state_dict`` differs from the original's. Load the weights first, then optimize. Training the
    folded parameters is possible but is a different parametrisation from the original's.
  - Parameters keep their dtype and device; modules keep their training flags. The memory format is left to
    the caller: on CUDA the fused paths want channels_last activations and weights
    (``model.to(memory_format=torch.channels_last)`` and channels_last inputs).
  - The fused layers take batched 4-D inputs (``nn.Conv2d`` also takes unbatched 3-D ones and empty batches).
  - A Sequential is assumed to be called as a whole (``seq(x)``). Code elsewhere that calls or inspects its
    children one by one (``seq[1](y)``) sees the fused layer and the ``Identity`` placeholders instead;
    calling all of them in order still gives the same result.
"""
from __future__ import annotations

import copy
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .nn.aspp import ASPP
from .nn.atrous import AtrousConv2dReLU

__all__ = ["optimize", "FusedResNetBlock"]

_OP_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)
_TV_DEEPLAB = "torchvision.models.segmentation.deeplabv3"
_TV_RESNET = "torchvision.models.resnet"
# Residual blocks whose forward is known to be relu(main(x) + (downsample(x) or x)), with main the chain of
# these attributes in this order (checked by reading the classes' source): rule 2.
_BODY_BASIC = ("conv1", "bn1", "relu", "conv2", "bn2")
_BODY_BOTTLENECK = _BODY_BASIC + ("relu", "conv3", "bn3")
_RESNET_BLOCKS = {
    (_TV_RESNET, "BasicBlock"): _BODY_BASIC,
    (_TV_RESNET, "Bottleneck"): _BODY_BOTTLENECK,
    # deeplab_fast.models' own block: torchvision's names and forward (also in its Caffe style, where the
    # stride sits in conv1: the body is laid out from the block's own convs either way).
    ("deeplab_fast.models.backbones", "Bottleneck"): _BODY_BOTTLENECK,
}
_TV_UTILS = "torchvision.models._utils"
# Layer types whose settings must agree between a torchvision ASPP and ours for the swap.
_LEAF_TYPES = (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.Dropout, nn.AdaptiveAvgPool2d)


class FusedResNetBlock(nn.Module):
    """A torchvision ResNet ``Bottleneck`` / ``BasicBlock`` with its main path as a Sequential (fused):
    ``relu(body(x) + (downsample(x) if downsample is not None else x))``.

    ``body`` computes the block's ``conv1 -> bn1 -> relu -> conv2 -> bn2 [-> relu -> conv3 -> bn3]``, after
    ``optimize`` mostly ``AtrousConv2dReLU`` layers (the last one without ReLU, since the residual add comes
    before the block's last ReLU). ``kind`` names the block it replaced.
    """

    def __init__(self, body: nn.Sequential, downsample: Optional[nn.Module], relu: nn.Module,
                 kind: str = "Bottleneck"):
        super().__init__()
        self.body = body
        self.downsample = downsample
        self.relu = relu
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        identity = x if self.downsample is None else self.downsample(x)
        out += identity
        return self.relu(out)

    def extra_repr(self) -> str:
        return f"kind={self.kind}"


# ----------------------------------------------------------------------------------------------------------
# Public entry point


def optimize(model: nn.Module, inplace: bool = False, verbose: bool = False) -> nn.Module:
    """Returns ``model`` with its Conv (+ BN) (+ ReLU) chains fused into ``AtrousConv2dReLU`` layers,
    torchvision ResNet blocks into ``FusedResNetBlock`` s and torchvision's ASPP swapped for
    ``deeplab_fast.nn.ASPP`` (the rules are in this module's docstring): the same outputs, faster.

    Args:
        model (nn.Module): any module (torchvision's segmentation models, this library's, your own).
            Call ``model.eval()`` first so BatchNorm is folded, and load weights first: the optimized model's
            state dict differs from the original's.
        inplace (bool): modify ``model`` itself and return it. Default False: a deep copy is modified and
            returned, and ``model`` is left untouched.
        verbose (bool): print each replacement (module path: from -> to) and a summary. Default False.

    Returns:
        The optimized model: the same top-level object (``inplace=True``) or a copy of it.

    Raises:
        ValueError: ``model`` is not an ``nn.Module``, or is a TorchScript or ``torch.compile`` wrapper
            (optimize the eager module, then script or compile it); ``inplace`` / ``verbose`` not bools.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"optimize: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError("optimize: model is a TorchScript module; optimize the eager module, then script it")
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        raise ValueError("optimize: model is a torch.compile wrapper; optimize model._orig_mod, then compile it")
    for name, v in (("inplace", inplace), ("verbose", verbose)):
        if not isinstance(v, bool):
            raise ValueError(f"optimize: {name} must be a bool, got {v!r}")
    if not inplace:
        model = copy.deepcopy(model)
    ctx = _Context()
    _visit(model, "", (), ctx)
    if verbose:
        for _, line in sorted(ctx.log, key=lambda entry: entry[0]):  # in module order
            print(f"deeplab_fast.optimize: {line}")
        print(f"deeplab_fast.optimize: {ctx.chains} conv chain(s) fused, {ctx.blocks} ResNet block(s) and "
              f"{ctx.aspps} ASPP head(s) replaced")
    return model


# ----------------------------------------------------------------------------------------------------------
# The walk


class _Context:
    def __init__(self):
        # Keyed by id(), so the modules are kept alive here too: a replaced module freed during the walk
        # could otherwise lend its id to a new one.
        self.seen: dict = {}            # id -> module visited (a module shared by two parents: once)
        self.replaced: dict = {}        # id(old child) -> (old child, its replacement): one per shared child
        self.log: List[tuple] = []      # (position: child indices from the root, text)
        self.chains = 0
        self.blocks = 0
        self.aspps = 0


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _class_is(m: nn.Module, module_name: str, *qualnames: str) -> bool:
    t = type(m)
    return t.__module__ == module_name and t.__qualname__ in qualnames


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _forward_overridden(m: nn.Module) -> bool:
    """The instance has its own forward (monkeypatched): its class's forward says nothing about it."""
    return "forward" in vars(m)


def _opaque(m: nn.Module) -> bool:
    """Modules not entered: already fused (deeplab_fast.nn), TorchScript, fx graphs (their dataflow is the
    graph's, not the children's order)."""
    return (type(m).__module__.startswith("deeplab_fast.nn") or isinstance(m, torch.jit.ScriptModule)
            or isinstance(m, torch.fx.GraphModule))


def _visit(module: nn.Module, prefix: str, order: tuple, ctx: _Context) -> None:
    if id(module) in ctx.seen or _opaque(module):
        return
    ctx.seen[id(module)] = module
    for index, (name, child) in enumerate(list(module._modules.items())):
        if child is None:
            continue
        path = _join(prefix, name)
        new = ctx.replaced.get(id(child), (None, None))[1]
        if new is None:
            new = _replace_block(child, path, order + (index,), ctx)
            if new is not None:
                ctx.replaced[id(child)] = (child, new)
        if new is not None:
            module._modules[name] = new
            child = new
        _visit(child, path, order + (index,), ctx)
    observed = _chain_container(module)
    if observed is not None:
        slots = [(key, _join(prefix, key), child, order + (i,))
                 for i, (key, child) in enumerate(module._modules.items())]
        _fuse_chains(module, slots, observed, ctx)


def _chain_container(m: nn.Module) -> Optional[set]:
    """For a module whose forward feeds each child's output to the next child, the names of the children
    whose outputs are also used elsewhere (a chain may end there but not pass through); None otherwise."""
    if _forward_overridden(m):
        return None
    if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
        return set()
    if _class_is(m, _TV_DEEPLAB, "ASPPPooling"):  # children in order, then F.interpolate
        return set()
    if _class_is(m, _TV_UTILS, "IntermediateLayerGetter"):  # children in order; return_layers' outputs kept
        return {str(k) for k in getattr(m, "return_layers", {})}
    return None


# ----------------------------------------------------------------------------------------------------------
# Rule 1: Conv [+ BN] [+ ReLU] chains


def _conv_padding(conv: nn.Module) -> Optional[Tuple[int, int]]:
    """The integer padding of an eligible conv, None for a conv that is not eligible."""
    if type(conv) is not nn.Conv2d or _has_hooks(conv) or _forward_overridden(conv):
        return None
    if conv.groups != 1 or conv.padding_mode != "zeros" or conv.weight.dtype not in _OP_DTYPES:
        return None
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        # 'same' (stride 1): total padding dilation * (k - 1) per axis, symmetric when even.
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if conv.padding != "same" or any(t % 2 for t in total) or any(s != 1 for s in conv.stride):
            return None
        return (total[0] // 2, total[1] // 2)
    return (int(conv.padding[0]), int(conv.padding[1]))


def _bn_ok(bn: nn.Module, conv: nn.Conv2d) -> bool:
    return (type(bn) in _BN_TYPES and bn.num_features == conv.out_channels and not _has_hooks(bn)
            and not _forward_overridden(bn))


def _relu_ok(relu: nn.Module) -> bool:
    return type(relu) is nn.ReLU and not _has_hooks(relu) and not _forward_overridden(relu)


def _has_running_stats(bn: nn.Module) -> bool:
    return bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None


def _grouped_conv_ok(conv) -> bool:
    """A grouped (e.g. depthwise) ``nn.Conv2d`` whose BN can be folded into it: rule 1's conditions but groups."""
    return (type(conv) is nn.Conv2d and conv.groups != 1 and not _has_hooks(conv) and not _forward_overridden(conv)
            and conv.padding_mode == "zeros" and conv.weight.dtype in _OP_DTYPES)


def _foldable_now(conv: nn.Conv2d, bn: nn.Module) -> bool:
    return not conv.training and not bn.training and _has_running_stats(bn)


def _fold_grouped(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """A new ``nn.Conv2d`` computing ``bn(conv(x))`` in eval mode (weight * s, bias beta + (b - mean) * s)."""
    from .nn.atrous import _bn_scale_shift

    scale, shift = _bn_scale_shift(bn, conv.bias)
    w = conv.weight
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=True, device=w.device, dtype=w.dtype)
    needs_grad = any(p.requires_grad for p in (w, conv.bias, bn.weight, bn.bias) if p is not None)
    with torch.no_grad():
        new.weight.copy_(w * scale.view(-1, 1, 1, 1).to(w.dtype))
        new.bias.copy_(shift.to(w.dtype))
    new.weight.requires_grad_(needs_grad)
    new.bias.requires_grad_(needs_grad)
    new.training = conv.training
    return new


def _fuse(conv: nn.Conv2d, padding: Tuple[int, int], bn: Optional[nn.Module],
          relu: Optional[nn.Module]) -> Tuple[AtrousConv2dReLU, str]:
    """The fused layer for one chain, and how BN was handled (for the log)."""
    if isinstance(conv.padding, str):  # 'valid' / 'same' as ints, on a shallow copy sharing the parameters
        conv = copy.copy(conv)
        conv.padding = padding
    fold = bn is not None and not conv.training and not bn.training and _has_running_stats(bn)
    if bn is not None and not fold and not bn.training and _has_running_stats(bn):
        # The chain is in training mode but BN is in eval mode (frozen statistics): keep BN as a module, so
        # the parameters (and their training) stay as they were; from_modules folds only eval-mode BNs.
        bn.training = True
        try:
            fused = AtrousConv2dReLU.from_modules(conv, bn, relu)
        finally:
            bn.training = False
    else:
        fused = AtrousConv2dReLU.from_modules(conv, bn, relu)
    fused.training = conv.training  # not .train(): that would also set the shared BN's mode
    if fold:
        params = [p for p in (conv.weight, conv.bias, bn.weight, bn.bias) if p is not None]
        needs_grad = any(p.requires_grad for p in params)
        for p in (fused.weight, fused.bias):
            if p is not None:
                p.requires_grad_(needs_grad)
    how = "" if bn is None else (" (BN folded)" if fold else " (BN kept)")
    return fused, how


def _fuse_chains(container: nn.Module, slots: Sequence[tuple], observed: set, ctx: _Context,
                 log_placeholders: bool = True) -> int:
    """Fuses the chains among ``slots`` ((key in container._modules, display path, module, log position), in
    call order). The fused layer goes to the conv's key, ``nn.Identity`` to the others'. Returns how many
    chains were fused."""
    fused_count = 0
    i, n = 0, len(slots)
    while i < n:
        key, path, conv, position = slots[i]
        padding = _conv_padding(conv) if conv is not None else None
        if padding is None:
            if (i + 1 < n and key not in observed and _grouped_conv_ok(conv) and slots[i + 1][2] is not None
                    and _bn_ok(slots[i + 1][2], conv) and _foldable_now(conv, slots[i + 1][2])):
                container._modules[key] = _fold_grouped(conv, slots[i + 1][2])
                k, bn_path, bn, _ = slots[i + 1]
                identity = nn.Identity()
                identity.training = bn.training
                container._modules[k] = identity
                ctx.log.append((position, f"{path}: grouped Conv2d+BatchNorm2d -> Conv2d (BN folded)"
                                          + (f"; {bn_path} -> Identity" if log_placeholders else f" (with {bn_path})")))
                ctx.chains += 1
                fused_count += 1
                i += 2
                continue
            i += 1
            continue
        chain = [slots[i]]
        bn = relu = None
        j = i + 1
        if j < n and chain[-1][0] not in observed and slots[j][2] is not None and _bn_ok(slots[j][2], conv):
            bn = slots[j][2]
            chain.append(slots[j])
            j += 1
        if j < n and chain[-1][0] not in observed and slots[j][2] is not None and _relu_ok(slots[j][2]):
            relu = slots[j][2]
            chain.append(slots[j])
            j += 1
        if len(chain) == 1:
            i += 1
            continue
        fused, how = _fuse(conv, padding, bn, relu)
        container._modules[key] = fused
        for k, _, m, _ in chain[1:]:
            identity = nn.Identity()
            identity.training = m.training
            container._modules[k] = identity
        kinds = "+".join(type(s[2]).__name__ for s in chain)
        others = ", ".join(s[1] for s in chain[1:])
        ctx.log.append((position, f"{path}: {kinds} -> AtrousConv2dReLU{how}"
                                  + (f"; {others} -> Identity" if log_placeholders else f" (with {others})")))
        ctx.chains += 1
        fused_count += 1
        i = j
    return fused_count


# ----------------------------------------------------------------------------------------------------------
# Rules 2 and 3: whole-block replacements


def _replace_block(m: nn.Module, path: str, position: tuple, ctx: _Context) -> Optional[nn.Module]:
    if _class_is(m, _TV_DEEPLAB, "ASPP"):
        return _swap_aspp(m, path, position, ctx)
    names = _RESNET_BLOCKS.get((type(m).__module__, type(m).__qualname__))
    if names is not None:
        return _fuse_resnet_block(m, names, path, position, ctx)
    return None


def _swap_aspp(m: nn.Module, path: str, position: tuple, ctx: _Context) -> Optional[nn.Module]:
    if any(_has_hooks(sub) or _forward_overridden(sub) for sub in m.modules()):
        return None
    try:
        new = ASPP.from_torchvision(m)
    except (ValueError, RuntimeError, StopIteration):
        return None
    old_mods, new_mods = dict(m.named_modules()), dict(new.named_modules())
    if old_mods.keys() != new_mods.keys():
        return None
    for name, old in old_mods.items():
        sub = new_mods[name]
        if isinstance(old, _LEAF_TYPES) or isinstance(sub, _LEAF_TYPES):
            if type(old) is not type(sub) or old.extra_repr() != sub.extra_repr():
                return None
        sub.training = old.training
    new_params = dict(new.named_parameters())
    for name, p in m.named_parameters():
        new_params[name].requires_grad_(p.requires_grad)
    ctx.log.append((position, f"{path}: torchvision ASPP -> deeplab_fast.nn.ASPP"))
    ctx.aspps += 1
    return new


def _fuse_resnet_block(m: nn.Module, names: Sequence[str], path: str, position: tuple,
                       ctx: _Context) -> Optional[nn.Module]:
    if _has_hooks(m) or _forward_overridden(m):
        return None
    kind = type(m).__qualname__
    try:
        members = [getattr(m, name) for name in names]
        downsample, relu = m.downsample, m.relu
    except AttributeError:
        return None
    if not all(isinstance(x, nn.Module) for x in members) or not (downsample is None
                                                                  or isinstance(downsample, nn.Module)):
        return None
    body = nn.Sequential(*members)
    slots = [(str(i), _join(path, name), mod, position + (-1, i))
             for i, (name, mod) in enumerate(zip(names, members))]
    if _fuse_chains(body, slots, set(), ctx, log_placeholders=False) == 0:
        return None
    body = nn.Sequential(*[x for x in body if type(x) is not nn.Identity])  # our placeholders: not needed here
    body.training = m.training
    new = FusedResNetBlock(body, downsample, relu, kind)
    new.training = m.training
    ctx.log.append((position, f"{path}: {kind} -> FusedResNetBlock"))
    ctx.blocks += 1
    return new
