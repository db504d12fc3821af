"""lorascope: the analyses of section 7 of the LoRA paper (Hu et al. 2021) for any adapter."""

__version__ = "0.1.0"
