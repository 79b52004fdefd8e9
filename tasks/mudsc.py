"""Tasks of the MuDSC pipeline: train (or reuse) a different-init pair, collect activation
statistics, merge with one method, evaluate, record. Each writes a content-addressed artifact
(see tasks/artifacts.py) and returns its reference; keys cover the inputs' content hashes,
the parameters and the code of the library modules involved."""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks.artifacts import ArtifactRef
from tasks.cache import ArtifactCache, RecordedOnce

_LIB = ("mergeflow.mudsc", "mergeflow.datasets", "mergeflow.checkpoint_writer", "tasks.mudsc")
PAIR = ArtifactCache(task="mudsc_pair", kind="mudsc_pair", code=_LIB)
ACTIVATIONS = ArtifactCache(task="mudsc_activations", kind="mudsc_activations", code=_LIB)
MERGE = ArtifactCache(task="mudsc_merge", kind="mudsc_merge", code=_LIB)
EVALUATE = ArtifactCache(task="mudsc_evaluate", kind="mudsc_evaluate", code=_LIB)


def _load_pair(pair: ArtifactRef):
    from pathlib import Path

    from mergeflow.mudsc import zoo

    return [zoo.load(Path(pair.path) / name) for name in pair.summary["models"]]


@task(name="mudsc_pair", cache_policy=PAIR, persist_result=True)
def train_pair(store: str, family: str, dataset: str, width: int | None = None,
               steps: int | None = None) -> ArtifactRef:
    """Two models of `family` from seeds 0 and 1 on the disjoint label sets of `dataset`."""
    slot = PAIR.slot(locals())
    if slot.done:
        return slot.done
    from mergeflow.mudsc import zoo

    with slot.writer() as out:
        names = []
        for spec in zoo.pair_specs(family, dataset, width, steps):
            zoo.save(zoo.train(spec), spec, out.dir / spec.dirname)
            names.append(spec.dirname)
        out.summary = {"models": names, "family": family, "dataset": dataset}
    return out.ref


@task(name="mudsc_activations", cache_policy=ACTIVATIONS, persist_result=True)
def collect_activations(store: str, pair: ArtifactRef, images: int = 2000, seed: int = 0) -> ArtifactRef:
    """Per-merge-point feature sums, second moments and counts over `images` unlabelled
    training images (safetensors `p{i}.sum`, `p{i}.outer`; counts and point names in the summary)."""
    slot = ACTIVATIONS.slot(locals())
    if slot.done:
        return slot.done
    from safetensors.torch import save_file

    from mergeflow.mudsc.compare import sample_images
    from mergeflow.mudsc.graph import build_graph
    from mergeflow.mudsc.merge import activation_stats

    models = _load_pair(pair)
    x = sample_images(pair.summary["dataset"], images, seed)
    moments = activation_stats(models, x, progress=True)
    graph = build_graph(models[0].backbone, x[:2])
    with slot.writer("moments.safetensors") as out:
        tensors = {}
        for i, m in enumerate(moments):
            tensors[f"p{i}.sum"], tensors[f"p{i}.outer"] = m.sum, m.outer
        save_file(tensors, str(out.main_path))
        out.summary = {"points": [p.name for p in graph.points], "counts": [m.count for m in moments]}
    return out.ref


def load_moments(ref: ArtifactRef):
    from safetensors.torch import load_file

    from mergeflow.mudsc.activations import Moments

    t = load_file(ref.path)
    return [Moments(t[f"p{i}.sum"], t[f"p{i}.outer"], c) for i, c in enumerate(ref.summary["counts"])]


@task(name="mudsc_merge", cache_policy=MERGE, persist_result=True)
def merge_pair(store: str, pair: ArtifactRef, activations: ArtifactRef, method: str,
               hyperparams: dict[str, Any], images: int = 2000, seed: int = 0) -> ArtifactRef:
    """Merge the pair with a model-level method (`mergeflow.mudsc.registry`); saves the merged
    backbone and every model's unmerged head (`model.safetensors`)."""
    slot = MERGE.slot(locals())
    if slot.done:
        return slot.done
    from mergeflow.checkpoint_writer import save_checkpoint
    from mergeflow.mudsc.compare import sample_images
    from mergeflow.mudsc.registry import run_method

    models = _load_pair(pair)
    x = sample_images(pair.summary["dataset"], images, seed)
    result = run_method(method, models, x, hyperparams, stats=load_moments(activations))
    with slot.writer() as out:
        save_checkpoint(result.model.state_dict(), out.dir, config={
            "method": method, "hyperparams": hyperparams, "classes": result.model.heads_classes})
        out.summary = {"objective": result.matching.objective if result.matching else None,
                       "iterations": len(result.matching.history) if result.matching else 0}
    return out.ref


@task(name="mudsc_evaluate", cache_policy=EVALUATE, persist_result=True)
def evaluate_merged(store: str, pair: ArtifactRef, merged: ArtifactRef | None, split: str = "test") -> ArtifactRef:
    """Joint and per-task accuracy of a merged model (or of the output ensemble when None)."""
    slot = EVALUATE.slot(locals())
    if slot.done:
        return slot.done
    import copy
    import json
    from pathlib import Path

    from mergeflow import datasets
    from mergeflow.checkpoint import load_state_dict
    from mergeflow.mudsc.evaluation import ensemble, evaluate
    from mergeflow.mudsc.models import MultiHeadModel

    models = _load_pair(pair)
    tasks = [m.classes for m in models]
    if merged is None:
        model = ensemble(models)
    else:
        model = MultiHeadModel(copy.deepcopy(models[0].backbone), [copy.deepcopy(m.head) for m in models], tasks)
        model.load_state_dict(load_state_dict(merged.path))
    accuracy = evaluate(model, getattr(datasets.load(pair.summary["dataset"]), split), tasks)
    with slot.writer("accuracy.json") as out:
        Path(out.main_path).write_text(json.dumps(accuracy, sort_keys=True) + "\n")
        out.summary = accuracy
    return out.ref


@task(name="mudsc_record", cache_policy=RecordedOnce(task="mudsc_record"), persist_result=True)
def record(method: str, hyperparams: dict[str, Any], accuracy: ArtifactRef, ensemble_accuracy: ArtifactRef,
           pair: ArtifactRef, merged: ArtifactRef, tracking_uri: str | None = None,
           project_dir: str = ".") -> str:
    """One MLflow run per merge (metrics: joint and per-task accuracy; 'expert' = ensemble)."""
    from tasks.tracking import log_merge_run

    return log_merge_run(experiment="mergeflow-mudsc", tracking_uri=tracking_uri, project_dir=project_dir,
                         method=method, hyperparams=hyperparams, accuracy=accuracy.summary,
                         expert_accuracy=ensemble_accuracy.summary,
                         input_hashes={"pair": pair.content_hash}, output_hash=merged.content_hash)
