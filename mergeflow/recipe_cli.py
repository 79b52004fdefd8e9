"""`mergeflow merge RECIPE.yaml --out DIR`: run a recipe through the streaming engine.

Errors (bad recipe, mismatched checkpoints, NaN inputs, no disk space) print one clear message
and exit with status 2 before any output exists; a successful merge prints the output
directory and its content hash.
"""

from __future__ import annotations

import argparse
import sys


def main(args: argparse.Namespace) -> int:
    from mergeflow.engine import merge_checkpoints
    from mergeflow.recipe import load_recipe

    try:
        recipe = load_recipe(args.recipe)
        result = merge_checkpoints(
            recipe.method, recipe.base, recipe.models, args.out, recipe.hyperparameters,
            device=args.device or recipe.device or "cpu",
            progress=not getattr(args, "quiet", False),
            allow_pickle=bool(getattr(args, "allow_pickle", False)),
            trust_remote_code=bool(getattr(args, "trust_remote_code", False)),
            out_dtype=recipe.out_dtype,
            base_only_tensors=recipe.base_only_tensors,
            recipe=recipe.model_dump(mode="json"),
            dry_run=bool(getattr(args, "dry_run", False)),
        )
    except (ValueError, OSError) as err:
        # Every error mergeflow raises on purpose is a ValueError whose message names the problem
        # and the fix (RecipeError, MergeConfigError, CheckpointError, NonFiniteInput, a method's
        # own checks); OSError is the file system (disk full mid-merge). One line, no traceback:
        # the output is written atomically, so nothing is left behind either way.
        print(f"mergeflow merge: {err}", file=sys.stderr)
        return 2
    if getattr(args, "dry_run", False):
        print("dry run: recipe and checkpoints are valid; nothing was written")
        return 0
    print(f"wrote {result.out_dir} (content hash {result.output_hash}) in {result.seconds:.1f} s")
    return 0
