"""Where a snapshot lives: a local folder as is, or a Hugging Face hub id fetched into the HF cache.

Imports nothing of the model, so the processor can resolve a hub id without loading the network code.
"""
from __future__ import annotations

from pathlib import Path

from .checkpoint import CheckpointError

HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]  # weights, configs, tokenizer; never code


def resolve_snapshot(path_or_id: str | Path, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub id fetched (weights, configs, tokenizer; no code) into the HF cache."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_id)
    if path.exists():
        raise CheckpointError(f"{name}: not a folder (a snapshot folder or a hub id like allenai/Molmo-7B-D-0924)")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or path.parent.exists() and str(path.parent) != ".":
        raise CheckpointError(f"{name}: no such folder")
    if name.count("/") != 1:
        raise CheckpointError(f"{name}: no such folder, nor a hub id like allenai/Molmo-7B-D-0924")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, revision=revision, allow_patterns=HUB_FILES))
    except Exception as e:  # network, auth or missing repo: one line, naming the id
        raise CheckpointError(f"{name}: could not download from the hub ({type(e).__name__}: {e})") from None
