"""Fine-tuning data: JSON-lines records -> examples with labels and loss masks -> batches.

A record is `{"image": path | [paths] | null, "question": ..., "answer": ...}` or
`{"image": ..., "messages": [user, assistant, user, assistant, ...]}`. The text follows Ai2's
training formatter (message_format "role", always_start_with_space): every user turn becomes
`" User: {text} Assistant:"`, every assistant turn `" {text}"` followed by `<|endoftext|>`, each
encoded on its own; the sequence is BOS, the image blocks, then the turns. Position i's label is
token i + 1; the loss covers the assistant turns and their end-of-text tokens.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .preprocess.image import ImageError
from .preprocess.processor import PAD, MolmoProcessor


class RecordError(ValueError):
    """A record that cannot become a training example; the message names its line."""


@dataclass(frozen=True)
class Record:
    line: int  # 1-based line number in the file
    images: list[str]
    messages: list[str]  # user, assistant, user, assistant, ...


def read_records(path: str | Path) -> Iterator[Record | RecordError]:
    """Each line of a JSON-lines file as a Record, or the RecordError that names what is wrong."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield parse_record(json.loads(line), n, path.parent)
                except json.JSONDecodeError as e:
                    yield RecordError(f"{path}:{n}: not valid JSON ({e.msg})")
                except RecordError as e:
                    yield RecordError(f"{path}:{n}: {e}")


def parse_record(raw, line: int, base: Path = Path(".")) -> Record:
    """Validate one record's fields; image paths are taken relative to `base`."""
    if not isinstance(raw, dict):
        raise RecordError("a record must be a JSON object")
    if "messages" in raw:
        messages = raw["messages"]
        if not isinstance(messages, list) or not messages or len(messages) % 2:
            raise RecordError("messages must be a non-empty list of user and assistant turns, ending on the assistant")
    elif "question" in raw and "answer" in raw:
        messages = [raw["question"], raw["answer"]]
    else:
        raise RecordError('a record needs "question" and "answer", or "messages"')
    for k, m in enumerate(messages):
        if not isinstance(m, str):
            raise RecordError(f"turn {k + 1} is not a string")
        if k % 2 and not m.strip():
            raise RecordError(f"empty answer (turn {k + 1})")
    images = raw.get("image")
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise RecordError('"image" must be a path, a list of paths, or null')
    return Record(line, [str(base / i) for i in images], list(messages))


def encode_record(record: Record, processor: MolmoProcessor, max_len: int) -> dict[str, torch.Tensor]:
    """One example: the processor's image inputs, `input_ids` [L], `labels` [L], `loss_masks` [L].

    Raises RecordError for an unreadable image or a sequence over `max_len` tokens.
    """
    tok = processor.tokenizer
    try:
        ex = processor.process(images=record.images or None, text=record.messages[0])
    except (ImageError, OSError, ValueError) as e:
        raise RecordError(str(e)) from None
    ids = ex["input_ids"].tolist()
    weights = [0.0] * len(ids)
    for k, m in enumerate(record.messages[1:], 1):
        answer = k % 2 == 1
        piece = tok.encode(f" {m}" if answer else f" User: {m} Assistant:") + ([tok.eos_id] if answer else [])
        ids += piece
        weights += [float(answer)] * len(piece)
    if len(ids) - 1 > max_len:
        raise RecordError(f"{len(ids) - 1} tokens, over the context of {max_len}")
    full = torch.tensor(ids)
    ex["input_ids"], ex["labels"] = full[:-1], full[1:]  # position i predicts token i + 1
    ex["loss_masks"] = torch.tensor(weights[1:])
    return ex


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`MolmoProcessor.collate` (rows right-padded with -1) plus labels (-1) and loss masks (0)."""
    out = MolmoProcessor.collate(examples)
    L = out["input_ids"].shape[1]
    out["labels"] = torch.full((len(examples), L), PAD, dtype=torch.long)
    out["loss_masks"] = torch.zeros(len(examples), L)
    for b, e in enumerate(examples):
        out["labels"][b, : len(e["labels"])] = e["labels"]
        out["loss_masks"][b, : len(e["loss_masks"])] = e["loss_masks"]
    return out


@dataclass
class Dataset:
    """The usable examples of a JSON-lines file, checked up front so a run never dies hours in.

    With skip_bad, bad records are counted (`skipped`, with their errors) instead of raising.
    """

    path: Path
    processor: MolmoProcessor
    max_len: int
    skip_bad: bool = False

    def __post_init__(self):
        self.records: list[Record] = []
        self.errors: list[str] = []
        for r in read_records(self.path):
            if not isinstance(r, RecordError):
                try:
                    encode_record(r, self.processor, self.max_len)  # images readable, length within the context
                    self.records.append(r)
                    continue
                except RecordError as e:
                    r = RecordError(f"{self.path}:{r.line}: {e}")
            if not self.skip_bad:
                raise r
            self.errors.append(str(r))
        if not self.records:
            raise RecordError(f"{self.path}: no usable records")

    @property
    def skipped(self) -> int:
        return len(self.errors)

    def __len__(self) -> int:
        return len(self.records)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return collate([encode_record(self.records[i], self.processor, self.max_len) for i in indices])


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of epoch `epoch`: a function of (seed, epoch) alone, so a resumed run
    sees the same data in the same order."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order
