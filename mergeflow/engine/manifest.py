"""What travels with a merged model: config and tokenizer files, a model card and a manifest."""

from __future__ import annotations

import json
from pathlib import Path

from mergeflow.checkpoint_writer import CheckpointWriter

# Files copied from the base model's directory when present (config, tokenizer, chat template).
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json",
)


def copy_side_files(writer: CheckpointWriter, base_dir: Path) -> list[str]:
    if not base_dir.is_dir():
        return []
    copied = []
    for name in SIDE_FILES:
        if (base_dir / name).is_file():
            writer.add_file(base_dir / name)
            copied.append(name)
    return copied


def model_card(manifest: dict) -> str:
    params = json.dumps(manifest["hyperparameters"], sort_keys=True)
    lines = [
        "---",
        "tags: [merge, mergeflow]",
        *(["library_name: transformers"] if manifest.get("transformers") else []),
        "---",
        "",
        f"# Merged model ({manifest['method']})",
        "",
        f"Merged with mergeflow {manifest['mergeflow_version']} using **{manifest['method']}** "
        f"({manifest['paper']}).",
        "",
        f"Hyperparameters: `{params}`",
        "",
        "## Inputs",
        "",
        f"- base: `{manifest['base']['path']}` (content hash `{manifest['base']['content_hash']}`)",
    ]
    for i, m in enumerate(manifest["models"]):
        lines.append(f"- model {i}: `{m['path']}` (content hash `{m['content_hash']}`)")
    lines += [
        "",
        f"Output content hash: `{manifest['output_hash']}` ({manifest['tensors']} tensors). "
        "Integer and boolean tensors are copied from the base.",
        "",
        "Reproduce: " + ("`mergeflow merge RECIPE.yaml --out DIR` with the recipe in `mergeflow_manifest.json`."
                         if manifest.get("recipe") else
                         "merged from Python (`merge_checkpoints`), not from a recipe: a recipe with the "
                         "inputs, method and hyperparameters above gives the same bytes."),
        "",
    ]
    return "\n".join(lines)
