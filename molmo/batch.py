"""The batch job: many records (a JSONL file or a folder of images) through the model.

- Records are preprocessed in background threads while the model runs, and grouped into
  batches of similar size (crops, then prompt length) from a window of upcoming records.
- Bad input never stops the job: a record that cannot run gets `{"id", "error"}`, one line.
- Nothing lost, nothing twice: each finished row is appended to the output as one whole line
  at once; `resume=True` drops a torn last line and skips the ids already written. At the end
  the output is rewritten (temporary file, then rename) in input order.
- Data parallel: under torchrun each rank takes the records whose id hashes to it, appends to
  its own part file `OUTPUT.part-RANK`, and rank 0 merges everything into OUTPUT at the end.
"""
from __future__ import annotations

import collections
import json
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from .generation import GenerationConfig, check_context, generate
from .pointing import parse_points
from .preprocess import MolmoProcessor, load_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class Record:
    """One input record: `line` is its place in the input (1-based), `key` its id as JSON text."""

    line: int
    id: object
    prompt: str | None = None
    images: list[Path] = field(default_factory=list)
    error: str | None = None  # a fault of the input itself (not JSON, no id, ...): known before any work

    @property
    def key(self) -> str:
        return json.dumps(self.id, sort_keys=True)


def read_records(source: str | Path, default_prompt: str | None = None) -> list[Record]:
    """The records of a JSONL file (`{"id", "image": path | [paths] | null, "prompt"}`, image paths
    relative to the file's folder), or of every image under a folder (id: its relative path)."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return [Record(i, p.relative_to(source).as_posix(), default_prompt, [p],
                       None if default_prompt else "no prompt: give --prompt")
                for i, p in enumerate(files, 1)]
    if not source.is_file():
        raise ValueError(f"{source}: no such input file or folder")
    records, seen = [], {}
    with open(source, encoding="utf-8", errors="replace") as f:
        for n, text in enumerate(f, 1):
            if text.strip():
                r = _parse(text, n, source.parent, default_prompt)
                if r.error is None and r.key in seen:
                    r.error = f"duplicate id: also at line {seen[r.key]}"
                seen.setdefault(r.key, n)
                records.append(r)
    return records


def _parse(text: str, n: int, folder: Path, default_prompt: str | None) -> Record:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return Record(n, f"line {n}", error=f"line {n}: not valid JSON ({e.msg} at column {e.colno})")
    if not isinstance(obj, dict) or obj.get("id") is None or isinstance(obj.get("id"), (dict, list)):
        return Record(n, f"line {n}", error=f"line {n}: a record needs an \"id\" (a string or number)")
    r = Record(n, obj["id"], obj.get("prompt", default_prompt))
    image = obj.get("image")
    images = [] if image is None else image if isinstance(image, list) else [image]
    if not all(isinstance(p, str) and p for p in images):
        r.error = "\"image\" must be a path, a list of paths, or null"
    elif not isinstance(r.prompt, str) or not r.prompt:
        r.error = "no prompt: the record has none and no --prompt was given"
    r.images = [folder / p for p in images]
    return r


def rank_of(record: Record, world: int) -> int:
    """The rank that runs a record: a hash of its id, the same on every machine and every run."""
    return zlib.crc32(record.key.encode()) % world


# ---- output files ---------------------------------------------------------------------------

def read_output(path: Path, repair: bool = False) -> dict[str, dict]:
    """The records already written to an output file, by key. repair: cut a torn last line."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data) and repair:
        with open(path, "r+b") as f:
            f.truncate(end)
    done = {}
    for line in data[:end].splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # not ours; the merge rewrites the file from the parsed records only
        if isinstance(rec, dict) and "id" in rec:
            done.setdefault(json.dumps(rec["id"], sort_keys=True), rec)
    return done


class _Appender:
    """Appends whole lines: each record is one write() of one complete line (O_APPEND)."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        while data:
            data = data[os.write(self.fd, data):]

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


def _part(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.name}.part-{rank}")


def _parts(output: Path) -> list[Path]:
    return sorted(output.parent.glob(f"{output.name}.part-*"))


def check_output(output: Path, resume: bool) -> list[Path]:
    """One clear error for an output that cannot be written or would be overwritten; -> the files
    of an earlier run (OUTPUT and its parts) that resume continues."""
    output = Path(output)
    if output.is_dir():
        raise ValueError(f"--output {output}: is a folder; give a file name such as answers.jsonl")
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ValueError(f"--output {output}: folder {folder} does not exist or is not writable")
    existing = [p for p in [output, *_parts(output)] if p.exists() and p.stat().st_size]
    if existing and not resume:
        raise ValueError(f"{existing[0]} exists: pass --resume to continue that job, or remove it")
    return existing


def merge(records: list[Record], output: Path) -> dict:
    """Rewrite OUTPUT from itself and every part file, one line per record in input order; the
    input's own faults (not JSON, no id, duplicates) get their error lines here. -> counts."""
    done = {}
    for path in [output, *_parts(output)]:
        for k, rec in read_output(path).items():
            done.setdefault(k, rec)
    lines, missing, errors = [], 0, 0
    for r in records:
        rec = {"id": r.id, "error": r.error} if r.error else done.get(r.key)  # input faults never run
        if rec is None:
            missing += 1
            continue
        errors += "error" in rec
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    tmp = output.with_name(output.name + ".merging")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, output)
    for p in _parts(output):
        p.unlink()
    return {"records": len(records), "written": len(lines), "errors": errors, "missing": missing}


# ---- the job --------------------------------------------------------------------------------

@dataclass
class _Ready:
    record: Record
    inputs: dict | None = None
    size: tuple[int, int] | None = None  # (width, height) of a single image, for points in pixels
    error: str | None = None


def _prepare(record: Record, processor, config, max_new_tokens: int) -> _Ready:
    """Load and preprocess one record in a worker thread; any fault becomes its error."""
    try:
        arrays = [load_image(p, processor.max_pixels) for p in record.images]
        inputs = processor.process(images=arrays or None, text=record.prompt)
        check_context(config, len(inputs["input_ids"]), max_new_tokens)
    except Exception as e:  # noqa: BLE001 - whatever one record does, the job goes on
        return _Ready(record, error=_message(e))
    size = (arrays[0].shape[1], arrays[0].shape[0]) if len(arrays) == 1 else None
    return _Ready(record, inputs, size)


def _message(e: Exception) -> str:
    """One line: our errors say what and where; anything else also names its type."""
    first = str(e).splitlines()[0] if str(e).strip() else ""
    return first if isinstance(e, (ValueError, OSError)) and first else f"{type(e).__name__}: {first}".rstrip(": ")


def _result(ready: _Ready, text: str, n_tokens: int) -> dict:
    rec = {"id": ready.record.id, "text": text, "n_tokens": n_tokens, "prompt": ready.record.prompt}
    if ready.size is not None and "<point" in text:
        rec["points"] = [{"x": round(p.x, 2), "y": round(p.y, 2), "label": p.label}
                         for p in parse_points(text, *ready.size)]
    return rec


def _crops(ready: _Ready) -> int:
    images = ready.inputs.get("images")
    return 0 if images is None else images.shape[0]


def run_job(model, processor, records: list[Record], output: str | Path, cfg: GenerationConfig,
            batch_size: int = 8, resume: bool = False, rank: int = 0, world: int = 1, workers: int = 2,
            window: int | None = None, progress: bool = True) -> dict:
    """Run this rank's share of `records`, appending finished rows to OUTPUT (or its part file
    when world > 1). Returns counts for this rank; `merge` puts the output in order afterwards."""
    output = Path(output)
    mine = [r for r in records if r.error is None and rank_of(r, world) == rank]
    target = output if world == 1 else _part(output, rank)
    existing = check_output(output, resume)
    done: dict[str, dict] = {}
    for p in existing:
        done.update(read_output(p, repair=p in (target, output)))
    todo = [r for r in mine if r.key not in done]
    window = window or 4 * batch_size
    counts = {"rank": rank, "records": len(mine), "resumed": len(mine) - len(todo), "done": 0, "errors": 0}
    bar = _bar(len(mine), len(mine) - len(todo), progress and rank == 0)
    sink = _Appender(target)
    t0 = time.perf_counter()

    def emit(rec: dict) -> None:
        sink.write(rec)
        counts["errors" if "error" in rec else "done"] += 1
        bar.update(1)
        rate = (counts["done"] + counts["errors"]) / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(errors=counts["errors"], records_per_s=f"{rate:.2f}", refresh=False)

    def run(group: list[_Ready]) -> None:
        seed = None if cfg.seed is None else (cfg.seed * 1_000_003 + group[0].record.line) % 2**63
        try:
            batch = MolmoProcessor.collate([g.inputs for g in group])
            out = generate(model, batch, replace(cfg, seed=seed), tokenizer=processor.tokenizer)
        except Exception as e:  # noqa: BLE001
            if len(group) > 1:  # find the row at fault: the others still get their answers
                for g in group:
                    run([g])
                return
            emit({"id": group[0].record.id, "error": _message(e)})
            return
        for g, text, n in zip(group, out.texts, out.lengths):
            emit(_result(g, text, n))

    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            pending = collections.deque()
            it = iter(todo)

            def fill():  # keep two windows of records in preparation
                while len(pending) < 2 * window:
                    r = next(it, None)
                    if r is None:
                        return
                    pending.append(pool.submit(_prepare, r, processor, model.config, cfg.max_new_tokens))

            fill()
            while pending:
                ready = [pending.popleft().result() for _ in range(min(window, len(pending)))]
                fill()
                for g in ready:
                    if g.error is not None:
                        emit({"id": g.record.id, "error": g.error})
                good = sorted((g for g in ready if g.error is None), key=lambda g: (_crops(g), len(g.inputs["input_ids"])))
                for i in range(0, len(good), batch_size):
                    run(good[i:i + batch_size])
    finally:
        sink.close()
        bar.close()
    counts["seconds"] = round(time.perf_counter() - t0, 3)
    return counts


def _bar(total: int, initial: int, enabled: bool):
    from huggingface_hub.utils import tqdm

    return tqdm(total=total, initial=initial, unit="record", disable=not enabled, dynamic_ncols=True)
