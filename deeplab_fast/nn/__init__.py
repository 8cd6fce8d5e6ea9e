"""Drop-in DeepLab layers as ``nn.Module`` s, each checked against a reference implementation."""
from .atrous import AtrousConv2dReLU
from .crf import PRESETS, CRFPreset, DenseCRF

__all__ = ["AtrousConv2dReLU", "DenseCRF", "CRFPreset", "PRESETS"]
