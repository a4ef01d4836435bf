"""molmo: a from-scratch PyTorch implementation of Ai2's Molmo-7B-D-0924.

Names are imported on first use, so `import molmo.preprocess` loads none of the network code.
"""
import importlib

_EXPORTS = {
    "Molmo": "model", "MolmoOutput": "model",
    "MolmoConfig": "config", "VisionConfig": "config", "LLMConfig": "config",
    "MolmoProcessor": "preprocess", "Tokenizer": "preprocess",
    "GenerationConfig": "generation", "GenerationOutput": "generation",
    "generate": "generation", "stream": "generation", "ask": "generation",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'molmo' has no attribute {name!r}")
