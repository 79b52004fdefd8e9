"""Build Llama-architecture checkpoints offline for benchmarks: a base and K fine-tunes.

Tensor names and shapes come from a `transformers` LlamaConfig (the model is built on the meta
device, so nothing is allocated); weights are random, stored in bf16 and sharded like HF models.
A fine-tune is the base plus a small random delta per tensor, large enough to survive bf16
rounding (about 5-20 % of each tensor's scale), so task vectors are non-zero almost everywhere.

    python bench/make_llama.py --size small --models 3 --out /tmp/mf_llama_small
    python bench/make_llama.py --size 0.5b  --models 3 --out /tmp/mf_llama_05b
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

SIZES = {
    # ~0.5B parameters (501M): 16 layers, hidden 1536, untied embeddings.
    "0.5b": dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=16,
                 num_attention_heads=12, num_key_value_heads=4),
    # ~12M parameters, for quick runs and tests.
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
}


def llama_config(size: str):
    from transformers import LlamaConfig

    # `architectures` as in a real checkpoint's config.json: tools such as mergekit read it
    return LlamaConfig(**SIZES[size], max_position_embeddings=2048, tie_word_embeddings=False,
                       torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])


def llama_signature(config) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of LlamaForCausalLM for `config`, without allocating weights."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _base_tensor(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return (1.0 + 0.05 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    return (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)


def _delta(shape: tuple[int, ...], scale: float, g: torch.Generator) -> torch.Tensor:
    return scale * torch.randn(shape, generator=g)


def write_model(state: dict[str, torch.Tensor], out: Path, config, shard_bytes: int) -> None:
    from mergeflow.checkpoint_writer import save_checkpoint

    save_checkpoint(state, out, config=config.to_dict(), max_shard_bytes=shard_bytes)
    # A stand-in tokenizer file, so the engine's copying of tokenizer files is exercised.
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}) + "\n")


def build(size: str, n_models: int, out: Path, seed: int = 0, shard_bytes: int = 256 * 2**20) -> list[Path]:
    config = llama_config(size)
    sig = llama_signature(config)
    out.mkdir(parents=True, exist_ok=True)
    dirs = [out / "base"] + [out / f"ft{i}" for i in range(n_models)]
    g = torch.Generator().manual_seed(seed)
    base = {name: _base_tensor(name, shape, g) for name, shape in sorted(sig.items())}
    write_model(base, dirs[0], config, shard_bytes)
    for i in range(n_models):
        g = torch.Generator().manual_seed(seed + 1000 + i)
        ft = {}
        for name, t in base.items():
            # Task-specific scale per tensor (some tensors barely move), relative to the base.
            scale = 0.002 * (0.5 + torch.rand((), generator=g).item())
            if name.endswith("norm.weight"):
                scale *= 10
            ft[name] = (t.to(torch.float32) + _delta(t.shape, scale, g)).to(torch.bfloat16)
        write_model(ft, dirs[i + 1], config, shard_bytes)
        del ft
    return dirs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--models", type=int, default=3, help="number of fine-tunes")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    a = p.parse_args()
    if a.force and a.out.exists():
        shutil.rmtree(a.out)
    t0 = time.perf_counter()
    dirs = build(a.size, a.models, a.out, seed=a.seed)
    print(f"built {len(dirs)} checkpoints under {a.out} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
