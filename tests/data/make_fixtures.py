"""Regenerate the committed fixture files: `python tests/data/make_fixtures.py`.

`saved_on_cuda0.pt` is what torch.save writes for CUDA tensors on a GPU machine (storages tagged
"cuda:0"), made here without a GPU by registering a location tagger that claims every CPU
storage lives on cuda:0 while saving.
"""

from pathlib import Path

import torch


def main() -> None:
    out = Path(__file__).with_name("saved_on_cuda0.pt")
    state = {
        "weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "bias": torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64),
        "step": 7,
    }
    entry = (-1, lambda storage: "cuda:0", lambda storage, location: None)
    torch.serialization._package_registry.append(entry)
    torch.serialization._package_registry.sort(key=lambda e: e[0])
    try:
        torch.save(state, out)
    finally:
        torch.serialization._package_registry.remove(entry)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
