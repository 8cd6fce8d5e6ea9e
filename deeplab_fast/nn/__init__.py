"""Drop-in DeepLab layers as ``nn.Module`` s, each checked against a reference implementation."""
from .crf import PRESETS, CRFPreset, DenseCRF

__all__ = ["DenseCRF", "CRFPreset", "PRESETS"]
