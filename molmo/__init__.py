"""molmo: a from-scratch PyTorch implementation of Ai2's Molmo-7B-D-0924."""
from .config import LLMConfig, MolmoConfig, VisionConfig
from .model import Molmo

__all__ = ["Molmo", "MolmoConfig", "VisionConfig", "LLMConfig"]
