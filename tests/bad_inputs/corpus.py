"""Builders of bad inputs: each writes a broken checkpoint (or params file) into a temp dir.

Everything starts from a small, valid model family (a base and fine-tunes of it, three tensors:
a float weight, a float bias, an int buffer), then breaks exactly one thing, so a test failing
points at one missing check.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mergeflow.checkpoint_writer import save_checkpoint

MARKER_NAME = "PAYLOAD_RAN"  # a payload that executes creates this file


def state_dict(seed: int, *, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(4, 3, generator=g).to(dtype),
        "layer.bias": torch.randn(3, generator=g).to(dtype),
        "position_ids": torch.arange(5, dtype=torch.int64),
    }


def family(root: Path, n_models: int = 2) -> tuple[Path, list[Path]]:
    """A valid base and `n_models` fine-tunes, as HF-style directories."""
    base = save_checkpoint(state_dict(0), root / "base", config={"model_type": "toy"})
    models = [save_checkpoint(state_dict(i + 1), root / f"ft{i}", config={"model_type": "toy"})
              for i in range(n_models)]
    return base, models


def weights_file(model_dir: Path) -> Path:
    return model_dir / "model.safetensors"


def rewrite(model_dir: Path, sd: dict[str, torch.Tensor]) -> Path:
    save_file(sd, str(weights_file(model_dir)), metadata={"format": "pt"})
    return model_dir


# ---- broken files ----

def truncate(model_dir: Path, keep_fraction: float = 0.6) -> Path:
    f = weights_file(model_dir)
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep_fraction)])
    return model_dir


def corrupt_header(model_dir: Path) -> Path:
    """Garbage in the JSON header (the length prefix stays valid)."""
    f = weights_file(model_dir)
    data = bytearray(f.read_bytes())
    data[8:24] = b"\xff\xfe{{not json!!}}"[:16]
    f.write_bytes(bytes(data))
    return model_dir


def huge_header_length(model_dir: Path) -> Path:
    """A length prefix claiming a header far larger than the file."""
    f = weights_file(model_dir)
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    return model_dir


def empty_file(model_dir: Path) -> Path:
    weights_file(model_dir).write_bytes(b"")
    return model_dir


def with_value(model_dir: Path, value: float) -> Path:
    """Put NaN or inf into one weight."""
    sd = state_dict(7)
    sd["layer.weight"][1, 2] = value
    return rewrite(model_dir, sd)


def with_shape(model_dir: Path) -> Path:
    sd = state_dict(7)
    sd["layer.weight"] = torch.zeros(3, 4)
    return rewrite(model_dir, sd)


def with_renamed_tensor(model_dir: Path) -> Path:
    sd = state_dict(7)
    sd["layer.weight_renamed"] = sd.pop("layer.weight")
    return rewrite(model_dir, sd)


def with_extra_tensor(model_dir: Path) -> Path:
    sd = state_dict(7)
    sd["head.weight"] = torch.zeros(2)
    return rewrite(model_dir, sd)


def with_dtype(model_dir: Path, dtype: torch.dtype = torch.float16) -> Path:
    return rewrite(model_dir, state_dict(7, dtype=dtype))


def index_with_missing_shard(model_dir: Path) -> Path:
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"layer.weight": "model-00001-of-00002.safetensors",
                                         "layer.bias": "model-00002-of-00002.safetensors"}}))
    weights_file(model_dir).rename(model_dir / "model-00001-of-00002.safetensors")
    return model_dir


def index_not_a_mapping(model_dir: Path) -> Path:
    """An index that is valid JSON but a list, not {"weight_map": {...}}."""
    (model_dir / "model.safetensors.index.json").write_text(json.dumps([{"weight_map": {}}]))
    return model_dir


def index_pointing_outside(model_dir: Path) -> Path:
    """An index whose shard lives in another model's directory (a sibling's weights)."""
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"layer.weight": "../base/model.safetensors"}}))
    return model_dir


def _index(model_dir: Path, weight_map: dict[str, str]) -> Path:
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return model_dir


def index_listing_a_tensor_no_shard_holds(model_dir: Path) -> Path:
    """An index that promises a tensor the shards lack (a shard from another version)."""
    names = sorted(load_file(str(weights_file(model_dir))))
    return _index(model_dir, {**dict.fromkeys(names, "model.safetensors"), "ghost.weight": "model.safetensors"})


def index_leaving_out_a_tensor(model_dir: Path) -> Path:
    names = sorted(load_file(str(weights_file(model_dir))))
    return _index(model_dir, dict.fromkeys(names[1:], "model.safetensors"))


def index_swapping_two_shards(model_dir: Path) -> Path:
    """Two shards, each tensor filed under the other one."""
    sd = load_file(str(weights_file(model_dir)))
    weights_file(model_dir).unlink()
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file({"layer.weight": sd.pop("layer.weight")}, str(model_dir / first))
    save_file(sd, str(model_dir / second))
    return _index(model_dir, {"layer.weight": second, **dict.fromkeys(sd, first)})


def config_not_an_object(model_dir: Path) -> Path:
    (model_dir / "config.json").write_text("[1, 2]")
    return model_dir


def vocab_size_as_text(model_dir: Path) -> Path:
    (model_dir / "config.json").write_text(json.dumps({"model_type": "toy", "vocab_size": "32"}))
    return model_dir


def only_config(model_dir: Path) -> Path:
    """A directory with config.json and no weights (a download that failed half way)."""
    weights_file(model_dir).unlink()
    return model_dir


# ---- code that must never run ----

class _Payload:
    """Unpickling this creates the marker file: proof that the pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def malicious_pickle(model_dir: Path, marker: Path) -> Path:
    """An HF dir holding only `pytorch_model.bin` whose unpickling would create `marker`."""
    for f in model_dir.glob("*.safetensors"):
        f.unlink()
    torch.save({**state_dict(7), "payload": _Payload(marker)}, model_dir / "pytorch_model.bin")
    return model_dir


def remote_code_config(model_dir: Path, marker: Path) -> Path:
    """config.json with `auto_map` pointing at a module whose import would create `marker`."""
    (model_dir / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass EvilModel:\n    pass\n")
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "toy", "auto_map": {"AutoModel": "modeling_evil.EvilModel"}}))
    return model_dir


def leftovers(parent: Path, out_name: str) -> list[str]:
    """Anything a failed write left beside (or at) its destination."""
    return sorted(p.name for p in parent.iterdir() if p.name == out_name or p.name.startswith(f".{out_name}"))
