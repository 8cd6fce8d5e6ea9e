"""ASPP heads: DeepLab v3 (``ASPP``, torchvision-compatible) and DeepLab v2 (``ASPPv2``, summed branches).

Sources: Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation" (v3), arXiv:1706.05587,
sec. 3.3, as torchvision.models.segmentation.deeplabv3.ASPP writes it; Chen et al., "DeepLab: Semantic Image
Segmentation with Deep Convolutional Nets, Atrous Convolution, and Fully Connected CRFs" (v2), TPAMI 2017,
sec. 3.3 and fig. 4 (ASPP-L rates 6/12/18/24, ASPP-S 2/4/8/12), as kazuto1011/deeplab-pytorch's ``_ASPP``.

Both modules have a **fused path**, taken in eval mode on CUDA tensors when no gradient is needed and triton is
installed (``deeplab_fast.ops.aspp``): every BN folded into its conv, the branch convs run by the fused atrous op
(``deeplab_fast.ops.atrous_conv2d``), and one Triton kernel for the concat + projection (v3) or the sum (v2).
Otherwise (training, CPU, gradients, no triton) they run the plain-torch reference, which is torchvision's
formulation and fully differentiable. ``fused_forward`` runs the fused path on request (on CPU tensors only
under ``TRITON_INTERPRET=1``). Under ``torch.autocast`` the fused path runs in the autocast dtype (the input is
cast to it, ``deeplab_fast.nn.atrous.autocast_dtype``); while exporting (``torch.export``, ONNX) the modules always
take the plain-torch path, so exported graphs hold standard ops only.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import aspp as _aspp_ops
from ..ops.atrous_conv import atrous_conv2d
from .._validation import positive_int
from .atrous import _bn_scale_shift, autocast_dtype
from .separable import AtrousSeparableConv2d

__all__ = ["ASPP", "ASPPv2", "ASPP_L", "ASPP_S"]

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the Triton kernels' (float64 runs plain torch)
ASPP_L = (6, 12, 18, 24)  # DeepLab v2, large field of view
ASPP_S = (2, 4, 8, 12)    # DeepLab v2, small field of view


def _rates(rates, count: Optional[int], owner: str) -> tuple:
    if isinstance(rates, (str, bytes)) or not isinstance(rates, Sequence):
        raise ValueError(f"{owner}: atrous_rates must be a sequence of positive ints, got {rates!r}")
    rates = tuple(positive_int(r, "each atrous rate", owner) for r in rates)
    if count is not None and len(rates) != count:
        raise ValueError(f"{owner}: atrous_rates must be {count} positive ints, got {len(rates)}: {rates}")
    if not rates:
        raise ValueError(f"{owner}: atrous_rates must not be empty")
    return rates


def _check_input(x, in_channels: int, owner: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{owner}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{owner}: input must be 4-D [N, C, H, W], got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{owner}: input has {x.shape[1]} channels, expected in_channels = {in_channels}")
    if x.shape[0] == 0:
        raise ValueError(f"{owner}: input has an empty batch")


def _bn_fold(bn: nn.modules.batchnorm._BatchNorm):
    """(scale, shift) float32 with bn(z) = z * scale + shift, from the running statistics (eval mode)."""
    scale, shift = _bn_scale_shift(bn, None)
    return scale.float(), shift.float()


def _version_key(*tensors):
    """The tensors' identities and version counters, or None when one has no counter (an inference tensor)."""
    if any(t.is_inference() for t in tensors):
        return None
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)


class _ASPPConv(nn.Sequential):
    """3x3 atrous conv (no bias) + BN + ReLU: torchvision's ASPPConv."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


class _ASPPPooling(nn.Sequential):
    """Image pooling: global average pool + 1x1 conv + BN + ReLU, broadcast back: torchvision's ASPPPooling.

    The pool is computed as a mean over H and W (what ``nn.AdaptiveAvgPool2d(1)``, kept at index 0 for the key
    layout, computes) and the 1x1 result is broadcast with ``expand`` (a bilinear resize of a 1x1 map, with or
    without ``align_corners``, is that broadcast): both export as plain ONNX ops (ReduceMean, Expand)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        x = x.mean(dim=(2, 3), keepdim=True)
        for mod in list(self)[1:]:
            x = mod(x)
        return x.expand(n, x.shape[1], h, w)


class ASPP(nn.Module):
    """DeepLab-v3 atrous spatial pyramid pooling (Chen et al. 2017, sec. 3.3).

    Five branches on the backbone feature ``x`` (Tensor[N, in_channels, H, W]): a 1x1 conv, three 3x3 atrous
    convs at ``atrous_rates``, and image pooling; each conv with BN and ReLU. Their outputs are concatenated
    (5 x out_channels) and projected by a 1x1 conv + BN + ReLU + dropout. Output Tensor[N, out_channels, H, W].

    Args:
        in_channels (int): C of the input (2048 for ResNet-101).
        atrous_rates (3 ints): the atrous branches' rates. Default (12, 24, 36), torchvision's (output stride 8);
            the paper's output stride 16 uses (6, 12, 18) (``ASPP.v3_paper``).
        out_channels (int): channels of every branch and of the output. Default 256.
        dropout (float): after the projection (training only). Default 0.5, torchvision's.
        separable (bool): depthwise-separable atrous branches (DeepLab v3+: ``AtrousSeparableConv2d``). Default
            False. Such a module does not match torchvision's key names and never takes the Triton path (its
            branches fold their BNs in eval mode).
        depthwise_bn (bool): with ``separable``, BN + ReLU after each depthwise conv (the paper's layout, default
            True); False: segmentation_models_pytorch's (none between the depthwise and pointwise convs).
        eps (float): every BN's epsilon. Default 1e-5.

    Parameter and buffer names are torchvision's ``ASPP``'s (``convs.{0..4}.*``, ``project.{0,1}.*``), so
    ``load_state_dict`` from a torchvision ASPP works, as does ``ASPP.from_torchvision``.
    Raises ValueError on bad arguments (rates that are not 3 positive ints, ...) and on bad input (not 4-D,
    wrong channel count, empty batch).
    """

    def __init__(self, in_channels: int, atrous_rates: Sequence[int] = (12, 24, 36), out_channels: int = 256,
                 dropout: float = 0.5, separable: bool = False, depthwise_bn: bool = True, eps: float = 1e-5):
        super().__init__()
        self.in_channels = positive_int(in_channels, "in_channels", "ASPP")
        self.out_channels = positive_int(out_channels, "out_channels", "ASPP")
        self.atrous_rates = _rates(atrous_rates, 3, "ASPP")
        if not isinstance(dropout, numbers.Real) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"ASPP: dropout must be a probability in [0, 1], got {dropout!r}")
        self.separable = bool(separable)
        self.depthwise_bn = bool(depthwise_bn) if self.separable else None
        modules = [nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                 nn.BatchNorm2d(out_channels, eps=eps), nn.ReLU())]
        for r in self.atrous_rates:
            if self.separable:
                modules.append(AtrousSeparableConv2d(in_channels, out_channels, 3, dilation=r,
                                                     depthwise_bn=self.depthwise_bn, eps=eps))
            else:
                modules.append(_ASPPConv(in_channels, out_channels, r))
                modules[-1][1].eps = eps
        modules.append(_ASPPPooling(in_channels, out_channels))
        modules[-1][2].eps = eps
        self.convs = nn.ModuleList(modules)
        self.project = nn.Sequential(
            nn.Conv2d(len(self.convs) * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels, eps=eps),
            nn.ReLU(),
            nn.Dropout(float(dropout)),
        )
        self._fold_cache: dict = {}

    # ---- presets and conversion ----

    @classmethod
    def v3_paper(cls, in_channels: int, output_stride: int = 16, out_channels: int = 256) -> "ASPP":
        """The paper's head: rates (6, 12, 18) at output stride 16, doubled (12, 24, 36) at 8; no dropout."""
        rates = {16: (6, 12, 18), 8: (12, 24, 36)}.get(output_stride)
        if rates is None:
            raise ValueError(f"ASPP.v3_paper: output_stride must be 8 or 16, got {output_stride!r}")
        return cls(in_channels, rates, out_channels, dropout=0.0)

    @classmethod
    def from_torchvision(cls, module: nn.Module) -> "ASPP":
        """A copy of a ``torchvision.models.segmentation.deeplabv3.ASPP`` (its weights, buffers and mode)."""
        try:
            convs, project = module.convs, module.project
            in_channels = convs[0][0].in_channels
            out_channels = convs[0][0].out_channels
            rates = tuple(int(c[0].dilation[0]) for c in list(convs)[1:-1])
            dropout = float(project[3].p)
        except (AttributeError, IndexError, TypeError) as e:
            raise ValueError(f"ASPP.from_torchvision: not a torchvision ASPP ({type(module).__name__}): {e}") from e
        p = next(module.parameters())
        new = cls(in_channels, rates, out_channels, dropout).to(device=p.device, dtype=p.dtype)
        new.load_state_dict(module.state_dict())  # in the source's dtype: no rounding on the way
        return new.train(module.training)

    # ---- forward ----

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_channels, "ASPP")
        if self._use_fused(x):
            return self.fused_forward(x)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's formulation: the five branches, a concat, the projection."""
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))

    def _use_fused(self, x: torch.Tensor) -> bool:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        return (x.is_cuda and x.dtype in _FUSED_DTYPES and not torch.compiler.is_exporting()
                and not any(m.training for m in self.modules()) and not needs_grad and not self.separable
                and _aspp_ops.HAVE_TRITON and self._bn_have_stats())

    def _bn_have_stats(self) -> bool:
        return all(m.track_running_stats and m.running_mean is not None
                   for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))

    def train(self, mode: bool = True) -> "ASPP":
        self.clear_fold_cache()
        return super().train(mode)

    def clear_fold_cache(self) -> None:
        """Drops the cached BN-folded branch weights of the fused path. They are rebuilt when a weight or BN
        tensor changes through PyTorch ops (version counters), after a train-mode forward, ``train()``/``eval()``
        and ``load_state_dict``; call this after writing a parameter through ``.data`` (which PyTorch does not
        track)."""
        self._fold_cache.clear()

    def _folded_branch(self, i: int, dtype: torch.dtype):
        """Branch i's conv with its BN folded in: (weight in `dtype`, shift in `dtype`), cached while the conv
        weight, the BN affine parameters and statistics and its batch counter keep their versions (outside
        torch.compile)."""
        conv, bn = self.convs[i][0], self.convs[i][1]
        tracked = [t for t in (bn.weight, bn.bias, bn.num_batches_tracked) if t is not None]
        key = None
        if not torch.compiler.is_compiling():  # no version reads while tracing
            key = _version_key(conv.weight, bn.running_mean, bn.running_var, *tracked)
        if key is not None:
            key += (dtype,)
            hit = self._fold_cache.get(i)
            if hit is not None and hit[0] == key:
                return hit[1]
        scale, shift = _bn_fold(bn)
        weight = (conv.weight.float() * scale.view(-1, 1, 1, 1)).to(dtype)
        weight = weight.contiguous(memory_format=torch.channels_last)
        folded = (weight, shift.to(dtype))
        if key is not None:
            self._fold_cache[i] = (key, folded)
        return folded

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The fused inference path (eval semantics: BN running statistics, no dropout), on any device where
        the Triton kernels run (CUDA; the CPU under TRITON_INTERPRET=1). Raises RuntimeError without triton, and
        ValueError for a separable head or BN without running statistics."""
        _check_input(x, self.in_channels, "ASPP")
        if not _aspp_ops.HAVE_TRITON:
            raise RuntimeError("ASPP.fused_forward needs triton (pip install triton)")
        if self.separable or not self._bn_have_stats():
            raise ValueError("ASPP.fused_forward: needs the standard (non-separable) branches and BN running "
                             "statistics")
        dtype = autocast_dtype(x) or x.dtype  # under autocast: the autocast dtype (deeplab_fast.nn.atrous)
        x = x.to(dtype).contiguous(memory_format=torch.channels_last)  # the fast layout of the convs and kernel
        with torch.autocast(x.device.type, enabled=False):  # cast by hand above; the float32 parts stay so
            return self._fused(x, dtype)

    def _fused(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # The four spatial branches, pre-activation (their ReLU is applied by the projection kernel on load).
        branches = []
        for i in range(4):
            weight, shift = self._folded_branch(i, dtype)
            rate = 1 if i == 0 else self.atrous_rates[i - 1]
            branches.append(atrous_conv2d(x, weight, shift, None, 1, 0 if i == 0 else rate, rate, relu=False))
        # Image pooling: a per-image vector through its columns of the projection weight (float32).
        pool_conv, pool_bn = self.convs[4][1], self.convs[4][2]
        pooled = x.mean(dim=(2, 3), dtype=torch.float32)                             # [N, C_in]
        ps, pt = _bn_fold(pool_bn)
        pooled = torch.relu(pooled @ pool_conv.weight.float().flatten(1).t() * ps + pt)   # [N, C_b]
        proj_w = self.project[0].weight.flatten(1)                                    # [C_out, 5 C_b]
        cb = self.out_channels
        pool_bias = (pooled @ proj_w[:, 4 * cb:].float().t()).contiguous()           # [N, C_out]
        scale, shift = _bn_fold(self.project[1])
        return _aspp_ops.aspp_project(branches, proj_w.to(dtype), pool_bias, scale, shift)


class ASPPv2(nn.Module):
    """DeepLab-v2 ASPP (Chen et al., TPAMI 2017, sec. 3.3, fig. 4): parallel 3x3 atrous convs with bias, each
    giving class scores, summed.

    Args:
        in_channels (int): C of the input (2048 for ResNet-101).
        num_classes (int): output channels (class scores), e.g. 21 for PASCAL VOC.
        atrous_rates (ints): default ASPP-L (6, 12, 18, 24); ``ASPPv2.aspp_s`` gives ASPP-S (2, 4, 8, 12).

    Input Tensor[N, in_channels, H, W]; output Tensor[N, num_classes, H, W] = sum_i conv_i(x). Weights are
    initialised N(0, 0.01) and biases 0, as in the paper's released Caffe model definition.

    Key names are ``c0``, ``c1``, ... (one Conv2d per rate), as kazuto1011/deeplab-pytorch's ``_ASPP`` names
    them; inside that repository's DeepLabV2 they sit under ``aspp.``. Its converted Caffe weights map as:

    ============================  ==========================  ===============
    Caffe layer (DeepLab-v2 VOC)  kazuto1011/deeplab-pytorch  this module
    ============================  ==========================  ===============
    ``fc1_voc12_c0`` (rate 6)     ``aspp.c0.{weight,bias}``   ``c0.*``
    ``fc1_voc12_c1`` (rate 12)    ``aspp.c1.{weight,bias}``   ``c1.*``
    ``fc1_voc12_c2`` (rate 18)    ``aspp.c2.{weight,bias}``   ``c2.*``
    ``fc1_voc12_c3`` (rate 24)    ``aspp.c3.{weight,bias}``   ``c3.*``
    ============================  ==========================  ===============

    ``ASPPv2.from_state_dict(state_dict, prefix="aspp.")`` loads such a checkpoint's head.
    Raises ValueError on bad arguments or input.
    """

    def __init__(self, in_channels: int, num_classes: int, atrous_rates: Sequence[int] = ASPP_L):
        super().__init__()
        self.in_channels = positive_int(in_channels, "in_channels", "ASPPv2")
        self.num_classes = positive_int(num_classes, "num_classes", "ASPPv2")
        self.atrous_rates = _rates(atrous_rates, None, "ASPPv2")
        for i, rate in enumerate(self.atrous_rates):
            conv = nn.Conv2d(in_channels, num_classes, 3, padding=rate, dilation=rate, bias=True)
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.constant_(conv.bias, 0.0)
            self.add_module(f"c{i}", conv)

    @classmethod
    def aspp_l(cls, in_channels: int, num_classes: int) -> "ASPPv2":
        """ASPP-L: rates 6, 12, 18, 24."""
        return cls(in_channels, num_classes, ASPP_L)

    @classmethod
    def aspp_s(cls, in_channels: int, num_classes: int) -> "ASPPv2":
        """ASPP-S: rates 2, 4, 8, 12."""
        return cls(in_channels, num_classes, ASPP_S)

    @classmethod
    def from_state_dict(cls, state_dict: dict, prefix: str = "aspp.",
                        atrous_rates: Sequence[int] = ASPP_L) -> "ASPPv2":
        """The head of a kazuto1011/deeplab-pytorch DeepLabV2 checkpoint (keys ``aspp.c{i}.weight/bias``).
        Raises ValueError when a branch's keys are missing or the shapes disagree."""
        keys = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if "c0.weight" not in keys:
            raise ValueError(f"ASPPv2.from_state_dict: no '{prefix}c0.weight' in the state dict")
        k, c = keys["c0.weight"].shape[:2]
        module = cls(c, k, atrous_rates)
        try:
            module.load_state_dict(keys)
        except RuntimeError as e:
            raise ValueError(f"ASPPv2.from_state_dict: {e}") from e
        return module

    def branches(self):
        return [getattr(self, f"c{i}") for i in range(len(self.atrous_rates))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_channels, "ASPPv2")
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if (x.is_cuda and x.dtype in _FUSED_DTYPES and not torch.compiler.is_exporting() and not needs_grad
                and len(self.atrous_rates) == 4 and _aspp_ops.HAVE_TRITON):
            return self.fused_forward(x)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of the branches, as kazuto1011/deeplab-pytorch's _ASPP."""
        return sum(conv(x) for conv in self.branches())

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Branch convs without their biases (the fused atrous op), then one Triton pass for the sum plus the
        summed bias. Needs 4 branches and triton (CUDA; the CPU under TRITON_INTERPRET=1)."""
        _check_input(x, self.in_channels, "ASPPv2")
        if not _aspp_ops.HAVE_TRITON:
            raise RuntimeError("ASPPv2.fused_forward needs triton (pip install triton)")
        if len(self.atrous_rates) != 4:
            raise ValueError(f"ASPPv2.fused_forward: needs 4 branches, has {len(self.atrous_rates)}")
        x = x.to(autocast_dtype(x) or x.dtype).contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, enabled=False):
            outs = [atrous_conv2d(x, conv.weight.to(x.dtype), None, None, 1, r, r, relu=False)
                    for conv, r in zip(self.branches(), self.atrous_rates)]
            bias = sum(conv.bias.float() for conv in self.branches())
            return _aspp_ops.aspp_sum(outs, bias)
