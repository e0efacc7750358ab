"""Load an Amity release into NumPy (and, if installed, PyTorch) arrays.

Usage: python load_release.py <release folder>

Needs only `numpy` and `safetensors` (pip install numpy safetensors). Prints one JSON object:
{"config": {...}, "tensors": {name: [shape...]}, "groups": {prefix: count}}.
"""

import hashlib  # noqa: F401  (BLAKE3 is not in hashlib; `amity fetch` verifies hashes)
import json
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.numpy import load_file


def load_release(folder):
    """Returns (config dict, {tensor name: numpy float32 array})."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    return config, tensors


def split(tensors):
    """The three parts of a release, names without their prefix.

    target_encoder.*  the feature extractor (EMA encoder), what `amity embed` runs
    encoder.*         the context encoder
    predictor.*       the predictor
    """
    parts = {"target_encoder": {}, "encoder": {}, "predictor": {}}
    for name, value in tensors.items():
        prefix, _, rest = name.partition(".")
        parts[prefix][rest] = value
    return parts


if __name__ == "__main__":
    config, tensors = load_release(sys.argv[1])
    with safe_open(str(Path(sys.argv[1]) / "model.safetensors"), framework="numpy") as f:
        assert json.loads(f.metadata()["amity.config"]) == config
    parts = split(tensors)
    for value in tensors.values():
        assert value.dtype.name == "float32"
    print(json.dumps({
        "config": config,
        "tensors": {name: list(value.shape) for name, value in tensors.items()},
        "groups": {prefix: len(part) for prefix, part in parts.items()},
    }))
