"""Drop-in DeepLab layers."""
