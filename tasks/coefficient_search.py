"""Tasks of the per-task coefficient search (flows/coefficient_search.py).

- `pcb_scores`: PCB's clipped task vectors and scales (the "PCB matrix"), computed once per
  (checkpoints, ratio, variant, clip) and cached in the artifact store; lam is not in its key.
- `evaluate_candidate`: merge one candidate lam vector and return its per-task accuracy on the
  VALIDATION split (the split is fixed here, so a search can never select on test).
- `evaluate_choice`: the chosen coefficients on any split, for the report after the search.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from mergeflow.sources import CheckpointRef
from tasks.artifacts import ArtifactRef
from tasks.cache import ArtifactCache

SEARCH_SPLIT = "val"
SCORES_FILE = "pcb_scores.safetensors"

POLICY = ArtifactCache(task="pcb_scores", kind="pcb_scores",
                       code=("mergeflow.methods.pcb", "mergeflow.coefficient_search", "mergeflow.merging",
                             "mergeflow.statistics", "mergeflow.checkpoint", "tasks.coefficient_search"))


@task(name="pcb_scores", cache_policy=POLICY, persist_result=True)
def pcb_scores(store: str, base: CheckpointRef, models: list[CheckpointRef], ratio: float, variant: str,
               clip: float) -> ArtifactRef:
    """The lam-independent part of PCB for `models` (in this order), as one safetensors file."""
    slot = POLICY.slot(locals())
    if slot.done:
        return slot.done
    from mergeflow.checkpoint import load_state_dict
    from mergeflow.coefficient_search import pcb_components, save_pcb_components

    components = pcb_components(load_state_dict(base.path), [load_state_dict(m.path) for m in models],
                                ratio=ratio, variant=variant, clip=clip)
    kept = sum(int((scale > 0).sum()) for _, scale in components.values())
    total = sum(scale.numel() for _, scale in components.values())
    with slot.writer(SCORES_FILE) as out:
        save_pcb_components(components, out.main_path, variant)
        out.summary = {"tensors": len(components), "kept_fraction": kept / total}
    return out.ref


def _candidate_state(method: str, hparams: dict[str, Any], lams: list[float], base: CheckpointRef,
                     models: list[CheckpointRef], scores: ArtifactRef | None):
    from mergeflow.checkpoint import load_state_dict
    from mergeflow.coefficient_search import (
        candidate_hparams,
        load_pcb_components,
        merge_candidate,
        merge_pcb_components,
    )

    base_sd = load_state_dict(base.path)
    if method == "pcb":
        if scores is None:
            raise ValueError("a pcb candidate needs the cached pcb_scores artifact")
        variant = candidate_hparams(method, hparams, lams)["variant"]
        return merge_pcb_components(base_sd, load_pcb_components(scores.path), lams, variant)
    return merge_candidate(method, base_sd, [load_state_dict(m.path) for m in models], hparams, lams)


def _accuracy(state, zoo_dir: str, tasks: list[str], split: str, limit: int | None, batch_size: int,
              device: str) -> dict[str, float]:
    from mergeflow.evaluation import evaluate
    from mergeflow.zoo import Zoo

    return evaluate(state, Zoo.open(zoo_dir), tasks, split=split, device=device, batch_size=batch_size,
                    limit=limit)


@task(name="evaluate_candidate", cache_policy=NO_CACHE, persist_result=False)
def evaluate_candidate(zoo_dir: str, tasks: list[str], method: str, hparams: dict[str, Any], lams: list[float],
                       base: CheckpointRef, models: list[CheckpointRef], scores: ArtifactRef | None,
                       limit: int | None = None, batch_size: int = 1024, device: str = "cpu") -> dict[str, float]:
    """Per-task validation accuracy of one candidate (lams[i] belongs to models[i])."""
    state = _candidate_state(method, hparams, lams, base, models, scores)
    return _accuracy(state, zoo_dir, tasks, SEARCH_SPLIT, limit, batch_size, device)


@task(name="evaluate_choice", cache_policy=NO_CACHE, persist_result=False)
def evaluate_choice(zoo_dir: str, tasks: list[str], method: str, hparams: dict[str, Any], lams: list[float],
                    base: CheckpointRef, models: list[CheckpointRef], scores: ArtifactRef | None, split: str,
                    limit: int | None = None, batch_size: int = 1024, device: str = "cpu") -> dict[str, float]:
    """Per-task accuracy of chosen coefficients on `split` (the final report; never the objective)."""
    state = _candidate_state(method, hparams, lams, base, models, scores)
    return _accuracy(state, zoo_dir, tasks, split, limit, batch_size, device)


def search_figure(values: list[float], title: str):
    """Objective per evaluation (dots) and the best so far (line); a matplotlib Figure (Agg)."""
    from matplotlib.figure import Figure

    best, running = [], float("-inf")
    for v in values:
        running = max(running, v)
        best.append(running)
    steps = list(range(1, len(values) + 1))
    fig = Figure(figsize=(7, 4), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(steps, [100 * v for v in values], s=12, color="#9e9e9e", label="candidate")
    ax.step(steps, [100 * v for v in best], where="post", color="#1f77b4", label="best so far")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("mean validation accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return fig
