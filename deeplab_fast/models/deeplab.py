"""The DeepLab models: v1 (VGG-16 LargeFOV, with or without MSC), v2 (ResNet-101 + ASPP, optional multi-scale
inputs) and v3 (ResNet-50/101 + ASPP, torchvision's head or the paper's).

Every model takes ``num_classes`` and accepts ``Tensor[N, 3, H, W]`` (floating point, any H, W). Returns:

- DeepLab v1 and v2: logits ``Tensor[N, num_classes, H, W]``, the network's scores at its ``output_stride`` (an
  int attribute) upsampled bilinearly (``align_corners=False``) to the input size; DeepLab v2 with ``msc=True``
  in training mode returns the list of per-scale logits for the MSC loss (see ``DeepLabV2``).
- DeepLab v3: what torchvision's ``deeplabv3_resnet*`` returns, an ``OrderedDict`` with ``"out"`` (those
  logits) and, with ``aux_loss=True``, ``"aux"`` (the auxiliary head's, upsampled alike). ``forward_logits(x)`` returns the scores before the
upsampling (for v3 the main head's only). Bad input (not a tensor, not 4-D, not 3 channels, empty, integer
dtype) raises ValueError.

Sources: Chen et al., "Semantic Image Segmentation with Deep Convolutional Nets and Fully Connected CRFs",
ICLR 2015 (v1; the released Caffe DeepLab-LargeFOV and DeepLab-MSc-LargeFOV definitions); Chen et al.,
"DeepLab: ...", TPAMI 2017 (v2; kazuto1011/deeplab-pytorch's restatement of the Caffe model, whose module
structure ``DeepLabV2`` follows); Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation",
arXiv:1706.05587 (v3; torchvision.models.segmentation.deeplabv3, whose names ``DeepLabV3`` keeps).
"""
from __future__ import annotations

import numbers
from collections import OrderedDict
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import positive_int
from ..nn.aspp import ASPP, ASPP_L, ASPP_S, ASPPv2
from .backbones import RESNET_LAYERS, ResNet, vgg16_features

__all__ = ["DeepLabV1", "DeepLabV2", "DeepLabV3", "check_rgb_input"]


def check_rgb_input(x, owner: str) -> None:
    """ValueError unless ``x`` is a floating-point Tensor[N, 3, H, W] with N, H, W > 0."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{owner}: input must be a torch.Tensor [N, 3, H, W], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{owner}: input must be a 4-D image batch [N, 3, H, W], got a {x.dim()}-D tensor of "
                         f"shape {tuple(x.shape)} (add the batch dimension with x.unsqueeze(0))")
    if x.shape[1] != 3:
        raise ValueError(f"{owner}: non-RGB input: expected 3 channels (RGB) in dim 1 of [N, 3, H, W], got "
                         f"{x.shape[1]} channels (shape {tuple(x.shape)}); convert grayscale/RGBA images to RGB, "
                         "and channels-last [N, H, W, 3] arrays with .permute(0, 3, 1, 2)")
    if x.numel() == 0:
        raise ValueError(f"{owner}: empty input of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{owner}: input must be floating point (normalised as the weights expect), got "
                         f"{x.dtype}")


def _upsample(logits: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------------------------------
# DeepLab v1


def _msc_branch(in_channels: int, num_classes: int, stride: int, width: int = 128,
                dropout: float = 0.5) -> nn.Sequential:
    """One DeepLab-MSc branch: 3x3 conv 128 (stride s, pad 1), ReLU, dropout, 1x1 128, ReLU, dropout, 1x1 classes."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, stride=stride, padding=1), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Conv2d(width, width, 1), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Conv2d(width, num_classes, 1),
    )


class DeepLabV1(nn.Module):
    """DeepLab v1 LargeFOV (Chen et al., ICLR 2015), optionally with the multi-scale (MSc) branches.

    The released Caffe ``DeepLab-LargeFOV`` definition:

    - ``features``: VGG-16 conv1..conv5 with the DeepLab pools (``vgg16_features(deeplab=True)``): pool1..pool3
      max 3x3/2 pad 1, pool4 max 3x3/1 pad 1, conv5_x at dilation 2 (pad 2), pool5 max 3x3/1 pad 1. Indices and
      keys are torchvision's ``vgg16().features`` (``load_vgg16_features`` loads them).
    - ``head``, an ``nn.Sequential`` with the Caffe layer names (keys ``head.fc6.weight`` ...): ``pool5a``
      average 3x3/1 pad 1 (padding counted, as Caffe's); ``fc6`` 3x3 conv to 1024 at dilation 12 (pad 12),
      ``relu6``, ``drop6`` (0.5); ``fc7`` 1x1 to 1024, ``relu7``, ``drop7`` (0.5). ``model.fc6`` / ``model.fc7``
      are read-only aliases. A Sequential so that ``deeplab_fast.optimize`` can fuse fc6 + ReLU and fc7 + ReLU.
    - ``fc8``: 1x1 conv to ``num_classes`` (initialised N(0, 0.01), bias 0, as the Caffe model).
    - Output stride 8: 513x513 input -> 65x65 scores.

    With ``msc=True`` (``DeepLab-MSc-LargeFOV``), ``msc`` holds five branches, on the image and on the pool1..pool4
    outputs (``msc.data``, ``msc.pool1`` .. ``msc.pool4``), each 3x3 conv to 128 -> ReLU -> dropout 0.5 -> 1x1 to
    128 -> ReLU -> dropout 0.5 -> 1x1 to ``num_classes``. Their first conv has stride 8, 4, 2, 1, 1 (image, pool1,
    pool2, pool3, pool4) and pad 1, which brings each to 1/8, as in the released Caffe definition; their scores
    are summed with fc8's (the paper's concatenation of the 5 x 128 extra channels before the classifier, written
    as a sum of per-branch classifiers). The pools run in floor mode, so every branch lands exactly on fc8's
    ceil(H/8) x ceil(W/8) grid, cell i centred on input pixel 8i, at every input size (Caffe's ceil-mode pools
    give the same sizes only for H, W = 8k + 1, the crops DeepLab used).

    Input: RGB-ordered or not as the weights expect (the Caffe weights take BGR minus the mean, torchvision's
    VGG weights normalised RGB); the model only checks for 3 channels.

    ``width_divisor`` (positive int, default 1) divides every channel count (VGG convs, fc6/fc7's 1024, the MSC
    branches' 128; at least 1 each): a narrow model for quick CPU experiments and tests, which the released or
    torchvision weights do not fit. ``dropout`` (default 0.5, the Caffe model's) is the drop6/drop7 (and MSC
    branch) probability; 0 makes training deterministic given the data. The defaults give the model above, key
    for key and shape for shape.
    """

    output_stride = 8
    # features indices of pool1..pool4 and their MSC branch strides; the image branch has stride 8.
    _TAPS = {4: ("pool1", 64, 4), 9: ("pool2", 128, 2), 16: ("pool3", 256, 1), 23: ("pool4", 512, 1)}

    def __init__(self, num_classes: int = 21, msc: bool = False, width_divisor: int = 1, dropout: float = 0.5):
        super().__init__()
        self.num_classes = positive_int(num_classes, "num_classes", "DeepLabV1")
        d = self.width_divisor = positive_int(width_divisor, "width_divisor", "DeepLabV1")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"DeepLabV1: dropout must be a probability in [0, 1), got {dropout!r}")
        self.arch = "deeplab_v1_msc_largefov" if msc else "deeplab_v1_largefov"
        self.features = vgg16_features(deeplab=True, width_divisor=d)
        conv5 = max(1, 512 // d)
        fc = max(1, 1024 // d)
        self.head = nn.Sequential(OrderedDict([
            ("pool5a", nn.AvgPool2d(3, stride=1, padding=1)),
            ("fc6", nn.Conv2d(conv5, fc, 3, padding=12, dilation=12)),
            ("relu6", nn.ReLU(inplace=True)),
            ("drop6", nn.Dropout(float(dropout))),
            ("fc7", nn.Conv2d(fc, fc, 1)),
            ("relu7", nn.ReLU(inplace=True)),
            ("drop7", nn.Dropout(float(dropout))),
        ]))
        self.fc8 = nn.Conv2d(fc, self.num_classes, 1)
        nn.init.normal_(self.fc8.weight, 0.0, 0.01)
        nn.init.constant_(self.fc8.bias, 0.0)
        if msc:
            width = max(1, 128 // d)
            branches = {"data": _msc_branch(3, self.num_classes, 8, width, float(dropout))}
            for name, ch, stride in self._TAPS.values():
                branches[name] = _msc_branch(max(1, ch // d), self.num_classes, stride, width, float(dropout))
            self.msc = nn.ModuleDict(branches)
        else:
            self.msc = None

    # fc6 / fc7 by their Caffe names (read-only views into ``head``).
    fc6 = property(lambda self: self.head.fc6)
    fc7 = property(lambda self: self.head.fc7)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scores at 1/8: Tensor[N, num_classes, ceil(H/8), ceil(W/8)] (fc8, plus the MSC branches)."""
        check_rgb_input(x, type(self).__name__)
        branch_scores = [] if self.msc is None else [self.msc["data"](x)]
        h = x
        for i, layer in enumerate(self.features):
            h = layer(h)
            if self.msc is not None and i in self._TAPS:
                branch_scores.append(self.msc[self._TAPS[i][0]](h))
        out = self.fc8(self.head(h))
        for s in branch_scores:
            if s.shape[-2:] != out.shape[-2:]:  # cannot happen with floor-mode pools; a guard against edits
                raise RuntimeError(f"DeepLabV1: an MSC branch gives {tuple(s.shape[-2:])} scores, fc8 "
                                   f"{tuple(out.shape[-2:])}")
            out = out + s
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits Tensor[N, num_classes, H, W] (the 1/8 scores upsampled bilinearly): a Tensor, not
        torchvision's dict (DeepLab v1 has no torchvision counterpart)."""
        return _upsample(self.forward_logits(x), x.shape[-2:])


# ----------------------------------------------------------------------------------------------------------
# DeepLab v2


class DeepLabV2(nn.Module):
    """DeepLab v2: dilated ResNet-101 (output stride 8) + ASPP (summed class scores), optionally with
    multi-scale inputs (MSC) (Chen et al., TPAMI 2017).

    Args:
        num_classes (int): default 21.
        aspp ("L", "S" or rates): "L" = ASPP-L (6, 12, 18, 24), "S" = ASPP-S (2, 4, 8, 12), or a sequence of
            positive ints. Default "L".
        msc (bool): multi-scale inputs. Default False.
        msc_scales (floats in (0, 1]): the extra input scales, default (0.5, 0.75), kazuto1011's.
        backbone_style ("caffe" or "torchvision"): "caffe" (default) is the MSRA ResNet of the Caffe model
            (stride on the 1x1 reduce conv, every block of layer3 at dilation 2 and of layer4 at 4, stem max-pool in
            ceil mode), so kazuto1011's converted weights compute what they computed there. "torchvision" is
            torchvision's ResNet with ``replace_stride_with_dilation=[False, True, True]`` (for ImageNet weights
            from ``torchvision.models.resnet101``, which load into ``backbone`` either way).

    Modules: ``backbone`` (``ResNet`` without ``avgpool``/``fc``), ``aspp`` (``deeplab_fast.nn.ASPPv2``, keys
    ``c0``..``c3``). ``weights.convert_kazuto_deeplabv2`` maps kazuto1011/deeplab-pytorch's DeepLabV2 /
    ``MSC(DeepLabV2)`` state dicts onto these names (the key map is in its docstring). BN is plain
    ``nn.BatchNorm2d``; DeepLab v2 trains with frozen BN statistics: call ``freeze_bn()`` after ``train()``.

    MSC (kazuto1011's ``MSC``; the Caffe model's multi-scale inputs): the network runs on the input and on
    ``F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)`` for each ``s`` in ``msc_scales``;
    the smaller scales' scores are resized bilinearly to the full-scale scores' size and fused by an
    element-wise max. ``forward`` then returns

    - eval mode: the fused scores upsampled to the input size, Tensor[N, num_classes, H, W];
    - training mode (``self.training``): the list ``[logits (scale 1), logits at msc_scales[0],
      logits at msc_scales[1], logits_max]``, i.e. ``[1.0, 0.5, 0.75, max]`` by default, each at its own
      network resolution (NOT upsampled), exactly kazuto1011's ``[logits] + logits_pyramid + [logits_max]``, for
      the MSC loss (one cross-entropy per entry, against labels resized to that entry's size).

    ``msc_logits(x)`` returns that list in either mode. Without MSC, ``forward`` returns the upsampled logits in
    both modes.
    """

    output_stride = 8

    def __init__(self, num_classes: int = 21, aspp: Union[str, Sequence[int]] = "L", msc: bool = False,
                 msc_scales: Sequence[float] = (0.5, 0.75), backbone_style: str = "caffe"):
        super().__init__()
        self.num_classes = positive_int(num_classes, "num_classes", "DeepLabV2")
        if isinstance(aspp, str):
            rates = {"L": ASPP_L, "S": ASPP_S}.get(aspp.upper())
            if rates is None:
                raise ValueError(f"DeepLabV2: aspp must be 'L' (rates {ASPP_L}), 'S' (rates {ASPP_S}) or a "
                                 f"sequence of rates, got {aspp!r}")
        else:
            rates = aspp
        if backbone_style not in ("caffe", "torchvision"):
            raise ValueError(f"DeepLabV2: backbone_style must be 'caffe' or 'torchvision', got {backbone_style!r}")
        scales = tuple(msc_scales) if not isinstance(msc_scales, (str, bytes)) else None
        if (scales is None or not scales
                or not all(isinstance(s, numbers.Real) and not isinstance(s, bool) and 0 < s <= 1 for s in scales)):
            raise ValueError(f"DeepLabV2: msc_scales must be a non-empty sequence of scales in (0, 1], got "
                             f"{msc_scales!r}")
        self.msc = bool(msc)
        self.msc_scales = tuple(float(s) for s in scales)
        self.backbone_style = backbone_style
        self.arch = "deeplab_v2_resnet101"
        self.backbone = ResNet(RESNET_LAYERS[101], replace_stride_with_dilation=(False, True, True),
                               style=backbone_style, include_top=False)
        self.aspp = ASPPv2(2048, self.num_classes, rates)  # raises ValueError on bad rates

    def freeze_bn(self) -> "DeepLabV2":
        """Puts every BatchNorm in eval mode (running statistics, no updates), as DeepLab v2 trains. Call it after
        ``train()``, which would undo it."""
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def _single_scale(self, x: torch.Tensor) -> torch.Tensor:
        return self.aspp(self.backbone(x))

    def msc_logits(self, x: torch.Tensor) -> List[torch.Tensor]:
        """[logits at scale 1, logits at each of msc_scales (their own sizes), their max] (kazuto1011's MSC)."""
        check_rgb_input(x, "DeepLabV2")
        logits = self._single_scale(x)
        pyramid = [self._single_scale(F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False))
                   for s in self.msc_scales]
        size = logits.shape[-2:]
        fused = torch.stack([logits] + [_upsample(p, size) for p in pyramid]).amax(dim=0)
        return [logits] + pyramid + [fused]

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scores at 1/8 (with MSC: the max-fused scores, at the full-scale scores' size)."""
        if self.msc:
            return self.msc_logits(x)[-1]
        check_rgb_input(x, "DeepLabV2")
        return self._single_scale(x)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Logits Tensor[N, num_classes, H, W] (a Tensor, as kazuto1011's model returns, not torchvision's dict);
        with MSC in training mode the per-scale list (see the class docstring)."""
        if self.msc and self.training:
            return self.msc_logits(x)
        return _upsample(self.forward_logits(x), x.shape[-2:])


# ----------------------------------------------------------------------------------------------------------
# DeepLab v3


def _fcn_head(in_channels: int, num_classes: int) -> nn.Sequential:
    """torchvision's FCNHead (the auxiliary classifier on layer3)."""
    inter = in_channels // 4
    return nn.Sequential(nn.Conv2d(in_channels, inter, 3, padding=1, bias=False), nn.BatchNorm2d(inter), nn.ReLU(),
                         nn.Dropout(0.1), nn.Conv2d(inter, num_classes, 1))


class DeepLabV3(nn.Module):
    """DeepLab v3: dilated ResNet-50/101 + ASPP (Chen et al. 2017), torchvision-compatible.

    Args:
        depth (50 or 101): the ResNet.
        num_classes (int): default 21.
        output_stride (8, 16 or None): 16 dilates layer4 (``replace_stride_with_dilation=[False, False, True]``),
            8 layer3 and layer4 (``[False, True, True]``). None: the head's default, 8 for "torchvision" (as
            torchvision's deeplabv3), 16 for "paper". Anything else: ValueError.
        multi_grid (ints or None): layer4's multi-grid unit rates (3 ints): block i at dilation
            ``d4 * multi_grid[i]`` with ``d4`` = 2 at output stride 16, 4 at 8 (so (1, 2, 4) gives 2, 4, 8 at OS 16
            and 4, 8, 16 at OS 8). None: the head's default: for "torchvision" no multi-grid, i.e. torchvision's
            dilations exactly (the first block of a dilated stage at the previous stage's dilation:
            layer4 = 2, 4, 4 at OS 8); for "paper" (1, 2, 4).
        head ("torchvision" or "paper"):
            - "torchvision": ``classifier`` = torchvision's DeepLabHead: ``ASPP(2048, (12, 24, 36))`` (fixed
              rates, whatever the output stride), 3x3 conv 256 (no bias), BN, ReLU, 1x1 conv to ``num_classes``.
              With the defaults the model is torchvision's ``deeplabv3_resnet{50,101}``: its state dict loads with
              ``strict=True`` and the outputs agree (``weights.load_torchvision_deeplabv3``,
              ``weights.from_torchvision``). output_stride / multi_grid only change dilations, never weights.
            - "paper": ``classifier`` = ``ASPP.v3_paper(2048, output_stride)`` (rates 6, 12, 18 at OS 16; 12, 24,
              36 at OS 8; no dropout), then a 1x1 conv to ``num_classes``.
        aux_loss (bool): add torchvision's auxiliary FCN head on layer3 (``aux_classifier``). Default False.

    ``forward(x)`` returns what torchvision's model returns: ``OrderedDict([("out", Tensor[N, num_classes, H,
    W])])``, with ``aux_loss=True`` also ``"aux"`` (both upsampled to the input size). The ASPP is ``deeplab_fast.nn.ASPP`` (key
    compatible with torchvision's; fused on CUDA in eval mode). ``backbone`` is a ``ResNet`` without
    ``avgpool``/``fc`` (keys ``backbone.*`` as torchvision's IntermediateLayerGetter).
    """

    def __init__(self, depth: int = 101, num_classes: int = 21, output_stride: Optional[int] = None,
                 multi_grid: Optional[Sequence[int]] = None, head: str = "torchvision", aux_loss: bool = False):
        super().__init__()
        if depth not in RESNET_LAYERS or isinstance(depth, bool):
            raise ValueError(f"DeepLabV3: depth must be 50 or 101, got {depth!r}")
        if head not in ("torchvision", "paper"):
            raise ValueError(f"DeepLabV3: head must be 'torchvision' or 'paper', got {head!r}")
        self.num_classes = positive_int(num_classes, "num_classes", "DeepLabV3")
        if output_stride is None:
            output_stride = 8 if head == "torchvision" else 16
        if isinstance(output_stride, bool) or output_stride not in (8, 16):
            raise ValueError(f"DeepLabV3: output_stride must be 8 or 16, got {output_stride!r}")
        if multi_grid is None and head == "paper":
            multi_grid = (1, 2, 4)
        self.arch = f"deeplab_v3_resnet{depth}"
        self.depth = depth
        self.head = head
        self.output_stride = int(output_stride)
        self.aux_loss = bool(aux_loss)
        self.backbone = ResNet(RESNET_LAYERS[depth], replace_stride_with_dilation=(False, output_stride == 8, True),
                               multi_grid=multi_grid, include_top=False)
        self.multi_grid = self.backbone.multi_grid
        if head == "torchvision":
            self.classifier = nn.Sequential(
                ASPP(2048, (12, 24, 36)),
                nn.Conv2d(256, 256, 3, padding=1, bias=False),
                nn.BatchNorm2d(256),
                nn.ReLU(),
                nn.Conv2d(256, self.num_classes, 1),
            )
        else:
            self.classifier = nn.Sequential(ASPP.v3_paper(2048, self.output_stride),
                                            nn.Conv2d(256, self.num_classes, 1))
        self.aux_classifier = _fcn_head(1024, self.num_classes) if self.aux_loss else None

    @property
    def atrous_rates(self) -> tuple:
        return self.classifier[0].atrous_rates

    def _heads(self, x: torch.Tensor):
        check_rgb_input(x, "DeepLabV3")
        feats = self.backbone.forward_features(x)
        out = self.classifier(feats["layer4"])
        aux = self.aux_classifier(feats["layer3"]) if self.aux_classifier is not None else None
        return out, aux

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The main head's scores at 1/output_stride."""
        check_rgb_input(x, "DeepLabV3")
        return self.classifier(self.backbone(x))

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        out, aux = self._heads(x)
        result = OrderedDict([("out", _upsample(out, x.shape[-2:]))])
        if aux is not None:
            result["aux"] = _upsample(aux, x.shape[-2:])
        return result


