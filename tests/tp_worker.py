"""Run under torchrun by test_parallel.py: load a snapshot whole and split over the ranks (--tp), run the
same inputs through both, and save each rank's results as OUT/rank-R.safetensors (plus bytes read)."""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from molmo import GenerationConfig, Molmo, generate


def proc_read_bytes() -> int:  # bytes this process has read through read(2), page cache or not
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])


def main(snapshot: str, case: str, out: str, mode: str) -> None:
    inp = {k[6:]: v for k, v in load_file(case).items() if k.startswith("input.")}
    Molmo.from_pretrained(snapshot, dtype=mode, device="cpu", tp=int(sys.argv[5]))  # past lazy imports
    before = proc_read_bytes()
    split = Molmo.from_pretrained(snapshot, dtype=mode, device="cpu", tp=int(sys.argv[5]))
    read = proc_read_bytes() - before
    whole = Molmo.from_pretrained(snapshot, dtype=mode, device="cpu")
    rank = torch.distributed.get_rank()
    got = {}
    with torch.no_grad():
        for key, model in (("whole", whole), ("split", split)):
            got[f"{key}.logits"] = model(**inp).logits
            got[f"{key}.greedy"] = generate(model, inp, GenerationConfig(max_new_tokens=6, stop_on_eos=False)).tokens
            got[f"{key}.sampled"] = generate(model, inp, GenerationConfig(max_new_tokens=6, stop_on_eos=False,
                                                                          temperature=1.0, seed=7)).tokens
    save_file({k: v.contiguous() for k, v in got.items()}, f"{out}/rank-{rank}.safetensors")
    Path(f"{out}/rank-{rank}.json").write_text(json.dumps({"bytes_read": split.bytes_read, "rchar": read}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
