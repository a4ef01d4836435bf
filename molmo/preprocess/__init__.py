"""Preprocessing: tokenizer and prompts, image loading, multi-crop tiling, the processor."""
from .image import DEFAULT_MAX_PIXELS, ImageError, load_image
from .processor import MolmoProcessor
from .text import Tokenizer, format_prompt
from .tiling import ImageConfig, select_tiling, tile_image

__all__ = ["MolmoProcessor", "Tokenizer", "ImageConfig", "ImageError", "load_image", "format_prompt",
           "select_tiling", "tile_image", "DEFAULT_MAX_PIXELS"]
