"""The merge pipeline, as it reads on the whiteboard:

    zoo -> fetch checkpoints -> task vectors -> [method-specific steps] -> merge -> evaluate -> track
                                   baselines (pretrained, experts) -> evaluate ----------^

Every step is a cached Prefect task that writes a content-addressed artifact and returns a
reference (tasks/): a second run with the same params hits the cache everywhere; changing
`merge.lam` re-runs only that merge, its evaluation and its tracking.

Method-specific steps (AdaMerging's coefficient tuning, MuDSC's activations, PCB's search) are
ONE more task each, registered in flows/preparation.py: `prepare(inputs, choice)` below runs the
chosen method's step and hands its outputs to the merge. See that file's docstring.

Runs on the ephemeral Prefect API by default, on a server when PREFECT_API_URL is set.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.params import MethodChoice, Params
from flows.preparation import MergeInputs, prepare, run_tags
from flows.report import MergeResult, Report
from tasks.cache import RecordedOnce
from tasks.evaluate import evaluate_model
from tasks.fetch import fetch_checkpoint
from tasks.merge import merge_models
from tasks.publish import publish
from tasks.task_vectors import extract_task_vectors
from tasks.tracking import track_merge
from tasks.zoo import build_zoo


@flow(name="merge-pipeline", log_prints=True)
def merge_pipeline(params: Params) -> dict[str, Any]:
    """Build/reuse the zoo, merge with every method of params (primary + compare), evaluate,
    track, and write the outputs. Returns the report (also written to outputs.report)."""
    inputs = gather_inputs(params)
    split = params.evaluation.split
    pretrained_acc = evaluate(inputs, inputs.base, inputs.tasks, split)
    expert_acc = expert_accuracy(inputs, split)

    results = []
    for choice in params.methods():
        prepared = prepare(inputs, choice)
        merged = merge_method(inputs, choice, prepared)
        accuracy = evaluate(inputs, merged, inputs.tasks, split)
        results.append(MergeResult(choice.label, choice.method, choice.hparams(), accuracy, merged, prepared))
        if params.tracking.enabled:
            track(params, choice, accuracy, expert_acc, pretrained_acc, inputs.base, inputs.models, merged,
                  run_tags(inputs, choice))

    publish(results[0].merged, params.path(params.outputs.merged))
    report = Report(tasks=inputs.tasks, split=split, pretrained=pretrained_acc,
                    experts=expert_acc, merges=results)
    report.write(params)
    return report.to_dict()


def gather_inputs(params: Params) -> MergeInputs:
    """zoo -> fetch checkpoints -> task vectors: everything a merge starts from."""
    store, device = str(params.path(params.artifacts)), params.resolved_device()
    zoo = build_zoo(store, params.zoo.zoo_spec())
    publish(zoo, params.path(params.zoo.dir))
    base = fetch_checkpoint(f"{zoo.path}/pretrained")
    experts = {t: fetch_checkpoint(f"{zoo.path}/experts/{t}") for t in zoo.summary["tasks"]}
    task_vectors = extract_task_vectors(store, base, experts)
    return MergeInputs(store=store, params=params, zoo=zoo,
                       tasks=params.evaluation.tasks or zoo.summary["tasks"], base=base,
                       models=experts, task_vectors=task_vectors, device=device)


def evaluate(inputs: MergeInputs, model: Any, tasks: list[str], split: str) -> dict[str, float]:
    """Per-task accuracy of `model` (any reference with a path and a content hash)."""
    ev = inputs.params.evaluation
    ref = evaluate_model(inputs.store, model, inputs.zoo, tasks, split, ev.batch_size, ev.limit,
                         inputs.device)
    return ref.summary["accuracy"]


def expert_accuracy(inputs: MergeInputs, split: str) -> dict[str, float]:
    """Each expert on its own task: the reference that normalized accuracy divides by."""
    return {t: evaluate(inputs, inputs.models[t], [t], split)[t] for t in inputs.tasks}


def track(params: Params, choice: MethodChoice, accuracy, expert_acc, pretrained_acc, base,
          experts, merged, tags: dict[str, str] | None = None) -> None:
    """One MLflow run per merge, recorded once per distinct merge (see RecordedOnce)."""
    logged = {"zoo": params.zoo.zoo_spec(), "evaluation": params.evaluation.model_dump(mode="json"),
              "device": params.device, "merge": {"method": choice.method, **choice.hparams()}}
    track_merge.with_options(cache_policy=RecordedOnce(task="track_merge"), persist_result=True)(
        method=choice.method, hyperparams=choice.hparams(), accuracy=accuracy,
        expert_accuracy=expert_acc, pretrained_accuracy=pretrained_acc, params=logged,
        input_hashes={"pretrained": base.content_hash,
                      **{f"expert/{t}": m.content_hash for t, m in experts.items()}},
        output_hash=merged.content_hash, run_name=choice.label, tags=tags,
        experiment=params.tracking.experiment, tracking_uri=params.tracking_uri(),
        artifact_root=str(params.artifact_root()), project_dir=params.project)


def merge_method(inputs: MergeInputs, choice: MethodChoice, prepared: dict[str, Any]):
    """The merge of one method choice, with what its [method-specific steps] prepared."""
    models = [inputs.models[t] for t in sorted(inputs.models)]
    return merge_models(inputs.store, choice.method, choice.hparams(), inputs.base, models,
                        prepared, inputs.device)
