"""DeepLab v3+ (Chen et al., "Encoder-Decoder with Atrous Separable Convolution for Semantic Image Segmentation",
ECCV 2018) on ResNet-50/101 and MobileNetV2, in two flavors.

- ``flavor="paper"``: the architecture of the paper and of the official TensorFlow code (tensorflow/models,
  research/deeplab: ``model.py``'s ``extract_features`` / ``refine_by_decoder``, ``feature_extractor.py``):
  ASPP rates 6, 12, 18 at output stride 16 (12, 24, 36 at 8); the three atrous branches are depthwise-separable
  (``split_separable_conv2d``: depthwise atrous conv + BN + ReLU, pointwise 1x1 + BN + ReLU); a 1x1 branch and
  image pooling (mean, 1x1 conv + BN + ReLU, broadcast); concat, 1x1 projection + BN + ReLU, dropout 0.1 (keep
  probability 0.9). Decoder: the stride-4 feature projected to 48 channels (1x1 conv + BN + ReLU); the ASPP
  output resized to its size (bilinear, ``align_corners=True``); concat [ASPP, low-level]; two 3x3 separable
  convs of 256 (BN + ReLU after depthwise and pointwise); a 1x1 conv to the classes; the logits resized to the
  input (bilinear, ``align_corners=True``). BN eps 1e-5 in the head (the official ``batch_norm_epsilon``).
  Backbones: torchvision's ResNet (ImageNet weights by name), every block of a dilated stage at its dilation
  (the official code's rule, no multi-grid: its default ``[1, 1, 1]``), the stride-4 feature = ``layer1``'s
  output; MobileNetV2 as the official code cuts it: the ASPP on ``layer_18`` (torchvision's ``features.17``,
  320 channels; ``features.18`` is dropped), the decoder on ``layer_4/depthwise_output`` (the depthwise conv's
  output inside ``features.3``, 144 channels), and the block that would stride past the output stride keeps the
  previous dilation (the official MobileNet rule). The concat order of the image-pooling branch is the only
  layout difference from the official code, whose projection takes [pool, 1x1, rates...]; ours takes [1x1,
  rates..., pool] (torchvision's ASPP layout): a converted official checkpoint's projection weight needs its
  first 256 input channels moved last.
- ``flavor="smp"``: segmentation_models_pytorch 0.6.0's ``DeepLabV3Plus(encoder, encoder_output_stride=16 | 8)``
  exactly, so its state dicts load (``weights.convert_smp_deeplabv3plus``) and give its outputs: ASPP rates 12,
  24, 36 at either output stride; separable convs without BN / ReLU between depthwise and pointwise; dropout
  0.5; an extra separable conv + BN + ReLU after the ASPP; the decoder's stride-4 feature is ``layer1`` (ResNet) or
  ``features.3``'s output (MobileNetV2, 24 channels), one separable conv of 256; every conv of a dilated stage at
  the stage's dilation; ASPP on ``features.18`` (1280 channels) for MobileNetV2. smp refuses inputs whose size is
  not a multiple of 16 (its check); this model takes any size and agrees with smp where smp runs.

Module tree (both flavors): ``backbone`` (``ResNet`` without ``avgpool`` / ``fc``, or ``MobileNetV2``), ``aspp``
(``deeplab_fast.nn.ASPP``, separable), ``aspp_conv`` (smp only: ``AtrousSeparableConv2d``), ``low_level``
(1x1 conv to 48 + BN + ReLU), ``decoder`` (a Sequential of ``AtrousSeparableConv2d``), ``classifier`` (1x1 conv
with bias).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import positive_int
from ..nn.aspp import ASPP
from ..nn.separable import AtrousSeparableConv2d
from .backbones import RESNET_LAYERS, MobileNetV2, ResNet
from .deeplab import check_rgb_input

__all__ = ["DeepLabV3Plus", "V3PLUS_BACKBONES", "FLAVORS"]

V3PLUS_BACKBONES = ("resnet50", "resnet101", "mobilenet_v2")
FLAVORS = ("paper", "smp")
_PAPER_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}
_SMP_RATES = (12, 24, 36)


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class DeepLabV3Plus(nn.Module):
    """DeepLab v3+ (see the module docstring for the two flavors).

    Args:
        backbone ("resnet50", "resnet101" or "mobilenet_v2"): default "resnet101".
        num_classes (int): default 21.
        output_stride (16 or 8): the encoder's output stride (later stages dilated). Default 16.
        flavor ("paper" or "smp"): default "paper".
        aux_loss (bool): must be False (no auxiliary head; accepted for torchvision's builder arguments).

    ``forward(x)`` takes Tensor[N, 3, H, W] (floating point, normalised as the weights expect) and returns
    torchvision's ``OrderedDict([("out", Tensor[N, num_classes, H, W])])`` (logits, bilinear with
    ``align_corners=True`` to the input size). ``forward_logits(x)`` returns the decoder's scores at stride 4,
    Tensor[N, num_classes, ceil(H / 4), ceil(W / 4)]. Attributes: ``output_stride``, ``flavor``,
    ``atrous_rates``, ``arch``. Raises ValueError on bad arguments and bad input (``check_rgb_input``).
    """

    def __init__(self, backbone: str = "resnet101", num_classes: int = 21, output_stride: int = 16,
                 flavor: str = "paper", aux_loss: bool = False):
        super().__init__()
        if aux_loss:
            raise ValueError("DeepLabV3Plus: the model has no auxiliary head (aux_loss must be False)")
        if backbone not in V3PLUS_BACKBONES:
            raise ValueError(f"DeepLabV3Plus: backbone must be one of {V3PLUS_BACKBONES}, got {backbone!r}")
        if flavor not in FLAVORS:
            raise ValueError(f"DeepLabV3Plus: flavor must be 'paper' (the official TensorFlow architecture) or "
                             f"'smp' (segmentation_models_pytorch 0.6.0's), got {flavor!r}")
        if isinstance(output_stride, bool) or output_stride not in (8, 16):
            raise ValueError(f"DeepLabV3Plus: output_stride must be 16 or 8, got {output_stride!r}")
        self.num_classes = positive_int(num_classes, "num_classes", "DeepLabV3Plus")
        self.arch = f"deeplab_v3plus_{backbone}"
        self.backbone_name = backbone
        self.flavor = flavor
        self.output_stride = int(output_stride)
        paper = flavor == "paper"
        if backbone.startswith("resnet"):
            self.backbone = ResNet(RESNET_LAYERS[int(backbone[6:])], include_top=False, full_dilation=True,
                                   replace_stride_with_dilation=(False, output_stride == 8, True))
            high, low = 2048, 256
        else:
            self.backbone = MobileNetV2(output_stride, dilation_rule="tf" if paper else "full", last_conv=not paper)
            high, low = self.backbone.out_channels, 144 if paper else 24
        rates = _PAPER_RATES[self.output_stride] if paper else _SMP_RATES
        self.aspp = ASPP(high, rates, 256, dropout=0.1 if paper else 0.5, separable=True, depthwise_bn=paper)
        self.aspp_conv = None if paper else AtrousSeparableConv2d(256, 256, 3, depthwise_bn=False)
        self.low_level = nn.Sequential(nn.Conv2d(low, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU())
        convs = [AtrousSeparableConv2d(256 + 48, 256, 3, depthwise_bn=paper)]
        if paper:
            convs.append(AtrousSeparableConv2d(256, 256, 3))
        self.decoder = nn.Sequential(*convs)
        self.classifier = nn.Conv2d(256, self.num_classes, 1)

    @property
    def atrous_rates(self) -> Tuple[int, int, int]:
        return self.aspp.atrous_rates

    def _features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """{"low": the decoder's stride-4 feature, "high": the ASPP's input}."""
        if isinstance(self.backbone, ResNet):
            f = self.backbone.forward_features(x)
            return {"low": f["layer1"], "high": f["layer4"]}
        low = None
        for i, block in enumerate(self.backbone.features):
            if i == 3 and self.flavor == "paper":  # layer_4/depthwise_output: inside the block
                y = block.conv[1](block.conv[0](x))
                low = y
                y = block.conv[3](block.conv[2](y))
                x = x + y if block.use_res_connect else y
            else:
                x = block(x)
                if i == 3:
                    low = x
        return {"low": low, "high": x}

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The class scores at stride 4 (before the final resize)."""
        check_rgb_input(x, "DeepLabV3Plus")
        f = self._features(x)
        y = self.aspp(f["high"])
        if self.aspp_conv is not None:
            y = self.aspp_conv(y)
        low = self.low_level(f["low"])
        y = self.decoder(torch.cat([_resize(y, low.shape[-2:]), low], dim=1))
        return self.classifier(y)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict([("out", _resize(self.forward_logits(x), x.shape[-2:]))])
