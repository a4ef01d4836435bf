"""molmo: a from-scratch PyTorch implementation of Ai2's Molmo-7B-D-0924."""
from .config import LLMConfig, MolmoConfig, VisionConfig
from .generation import GenerationConfig, GenerationOutput, ask, generate, stream
from .model import Molmo
from .preprocess import MolmoProcessor, Tokenizer

__all__ = ["Molmo", "MolmoConfig", "VisionConfig", "LLMConfig", "MolmoProcessor", "Tokenizer",
           "GenerationConfig", "GenerationOutput", "generate", "stream", "ask"]
