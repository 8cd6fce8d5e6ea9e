"""Drop-in DeepLab layers as ``nn.Module`` s, each checked against a reference implementation."""
from .aspp import ASPP, ASPP_L, ASPP_S, ASPPv2
from .atrous import AtrousConv2dReLU
from .crf import PRESETS, CRFPreset, DenseCRF
from .crf3d import DenseCRF3d
from .separable import AtrousSeparableConv2d

__all__ = ["ASPP", "ASPPv2", "ASPP_L", "ASPP_S", "AtrousConv2dReLU", "AtrousSeparableConv2d", "DenseCRF",
           "DenseCRF3d", "CRFPreset", "PRESETS"]
