"""AdaMerging's pipeline step: draw unlabelled inputs, tune the coefficients, record the tuning.

    prepare_adamerging(inputs, choice) -> {"coefficients": ArtifactRef}   (flows/preparation.py)

1. `draw_unlabelled` (cached): per task, the inputs of one split without their labels. The
   default split is `test`, as in the paper (transductive: the model adapts to the inputs it is
   then scored on); the run is tagged `mergeflow.transductive=true`. `val`/`train` are options.
2. `tune_adamerging` (cached): `mergeflow.adamerging.tune_coefficients` on the zoo's pretrained
   encoder, the task vectors and the frozen heads. Its artifact is the coefficients file (plus the
   entropy curve); its key covers the zoo, base, task vectors, unlabelled inputs (content hashes),
   every tuning setting, the device and the code.
3. The merge then applies the file with the registered `adamerging` method (no tuning there).
4. `track_adamerging` (once per distinct tuning): an MLflow run with the entropy curve per step,
   the coefficients as a heat map (tasks x tensors), the per-task accuracy of the merged model,
   and the transductive tag. Its merge and evaluation are the flow's own cached tasks, called with
   the flow's arguments, so the flow's later merge and evaluation of this method are cache hits.

A user-given coefficients file (`coefficients: path` in params) skips steps 1, 2 and 4.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task

from mergeflow.sources import CheckpointRef
from tasks.artifacts import ArtifactRef
from tasks.cache import ArtifactCache, RecordedOnce

UNLABELLED_FILE = "unlabelled.safetensors"
COEFFICIENTS_FILE = "coefficients.safetensors"
CURVE_FILE = "entropy_curve.json"
HEATMAP_FILE = "coefficients_heatmap.png"

DRAW_POLICY = ArtifactCache(task="draw_unlabelled", kind="unlabelled",
                            code=("mergeflow.zoo.tasks", "mergeflow.datasets", "tasks.adamerging"))
TUNE_POLICY = ArtifactCache(task="tune_adamerging", kind="adamerging",
                            code=("mergeflow.adamerging", "mergeflow.methods.ties", "mergeflow.merging",
                                  "mergeflow.statistics", "mergeflow.zoo.vit", "mergeflow.zoo.zoo",
                                  "mergeflow.checkpoint", "tasks.adamerging"))


@task(name="draw_unlabelled", cache_policy=DRAW_POLICY, persist_result=True)
def draw_unlabelled(store: str, zoo: ArtifactRef, tasks: list[str], split: str,
                    limit: int | None) -> ArtifactRef:
    """Per task, the first `limit` inputs of `split` (all if None), labels dropped."""
    slot = DRAW_POLICY.slot(locals())
    if slot.done:
        return slot.done
    from safetensors.torch import save_file

    from mergeflow.zoo import Zoo

    z = Zoo.open(zoo.path)
    images = {}
    for t in tasks:
        data = getattr(z.load_task(t), split)
        images[t] = data.images[: limit or len(data)].contiguous()
    with slot.writer(UNLABELLED_FILE) as out:
        save_file(images, str(out.main_path), metadata={"split": split})
        out.summary = {"split": split, "transductive": split == "test",
                       "count": {t: int(v.shape[0]) for t, v in images.items()}}
    return out.ref


@task(name="tune_adamerging", cache_policy=TUNE_POLICY, persist_result=True)
def tune_adamerging(store: str, zoo: ArtifactRef, base: CheckpointRef, task_vectors: ArtifactRef,
                    unlabelled: ArtifactRef, tasks: list[str], config: dict[str, Any],
                    device: str) -> ArtifactRef:
    """Learn the coefficients for `tasks` (in this order: the merge's model order)."""
    slot = TUNE_POLICY.slot(locals())
    if slot.done:
        return slot.done
    from safetensors.torch import load_file

    from mergeflow.adamerging import AdaMergingConfig, tune_coefficients
    from mergeflow.checkpoint import load_state_dict
    from mergeflow.zoo import Zoo
    from mergeflow.zoo.vit import build_encoder

    cfg = AdaMergingConfig(**config)
    z = Zoo.open(zoo.path)
    encoder = build_encoder(z.config, load_state_dict(base.path))
    taus = {t: load_state_dict(Path(task_vectors.path) / t) for t in tasks}
    inputs = load_file(unlabelled.path)
    provenance = {"unlabelled": {"split": unlabelled.summary["split"],
                                 "transductive": unlabelled.summary["transductive"],
                                 "count": unlabelled.summary["count"]}}
    result = tune_coefficients(encoder, taus, {t: z.head(t) for t in tasks}, {t: inputs[t] for t in tasks},
                               cfg, device=device, metadata=provenance)
    with slot.writer(COEFFICIENTS_FILE) as out:
        result.coefficients.save(out.main_path)
        curve = {"loss": result.loss, "task_entropy": result.task_entropy}
        (out.dir / CURVE_FILE).write_text(json.dumps(curve) + "\n")
        out.summary = {"variant": cfg.variant, "mode": cfg.mode, "tasks": tasks, "steps": cfg.steps,
                       "loss_first": result.loss[0] if result.loss else None,
                       "loss_last": result.loss[-1] if result.loss else None, **provenance}
    return out.ref


@task(name="track_adamerging", cache_policy=RecordedOnce(task="track_adamerging"), persist_result=True)
def track_adamerging(coefficients: ArtifactRef, accuracy: dict[str, float],
                     expert_accuracy: dict[str, float], pretrained_accuracy: dict[str, float],
                     hyperparams: dict[str, Any], params: dict[str, Any], experiment: str,
                     tracking_uri: str, artifact_root: str, project_dir: str) -> str:
    """One MLflow run for the tuning: entropy curve, heat map, accuracy of the result, tags."""
    from mergeflow.adamerging import Coefficients
    from tasks.tracking import Tracker

    coefs = Coefficients.load(coefficients.path)
    curve = json.loads((Path(coefficients.root) / CURVE_FILE).read_text())
    unl = coefs.metadata.get("unlabelled", {})
    tracker = Tracker(experiment, tracking_uri=tracking_uri, artifact_root=artifact_root,
                      project_dir=project_dir)
    run_id = tracker.log_merge_run(
        method="adamerging", hyperparams=hyperparams, accuracy=accuracy,
        expert_accuracy=expert_accuracy, pretrained_accuracy=pretrained_accuracy, params=params,
        input_hashes={"adamerging_coefficients": coefficients.content_hash},
        run_name=f"{coefs.metadata.get('variant', 'adamerging')} tuning ({coefs.mode})",
        tags={"mergeflow.stage": "adamerging_tuning",
              "mergeflow.transductive": str(bool(unl.get("transductive"))).lower(),
              "mergeflow.unlabelled_split": str(unl.get("split"))})
    _log_curve(tracker, run_id, curve)
    tracker.client.log_figure(run_id, coefficient_heatmap(coefs), HEATMAP_FILE)
    tracker.client.log_artifact(run_id, coefficients.path)
    return run_id


def _log_curve(tracker, run_id: str, curve: dict) -> None:
    from mlflow.entities import Metric

    metrics = [Metric("entropy_loss", float(v), 0, step) for step, v in enumerate(curve["loss"])]
    for t, values in curve["task_entropy"].items():
        metrics += [Metric(f"entropy/{t}", float(v), 0, step) for step, v in enumerate(values)]
    for i in range(0, len(metrics), 1000):  # MLflow's per-batch metric limit
        tracker.client.log_batch(run_id, metrics=metrics[i : i + 1000])


def coefficient_heatmap(coefs):
    """Tasks x tensors (layer-wise) or tasks x 1 (task-wise), values in [0, 1]."""
    from matplotlib.figure import Figure

    values = coefs.values.T.numpy()  # (tasks, rows)
    cols = values.shape[1]
    fig = Figure(figsize=(min(24.0, max(6.0, 0.12 * cols + 3)), 2.2 + 0.35 * len(coefs.task_names)),
                 dpi=120, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(len(coefs.task_names)), coefs.task_names)
    if coefs.mode == "layer_wise":
        step = max(1, cols // 40)
        ticks = list(range(0, cols, step))
        ax.set_xticks(ticks, [coefs.tensor_names[i] for i in ticks], rotation=90, fontsize=5)
        ax.set_xlabel("parameter tensor (state-dict order)")
    else:
        ax.set_xticks([0], ["all tensors"])
    ax.set_title(f"{coefs.metadata.get('variant', 'adamerging')} coefficients ({coefs.mode})")
    fig.colorbar(im, ax=ax, label="coefficient")
    return fig


def prepare_adamerging(inputs, choice) -> dict[str, Any]:
    """The pipeline step (flows/preparation.py): tune unless a coefficients file is given."""
    from mergeflow.adamerging import AdaMergingConfig

    hp = choice.hparams()
    if hp.get("coefficients"):
        return {"coefficients": _external_file(hp["coefficients"], inputs.params)}
    tasks = sorted(inputs.models)  # the merge's model order (flows/merge.py: sorted task names)
    unlabelled = draw_unlabelled(inputs.store, inputs.zoo, tasks, hp["unlabelled_split"],
                                 hp["unlabelled_limit"])
    config = AdaMergingConfig(**{k: v for k, v in hp.items() if k in AdaMergingConfig.model_fields})
    coefficients = tune_adamerging(inputs.store, inputs.zoo, inputs.base, inputs.task_vectors, unlabelled,
                                   tasks, config.tuning_fields(), inputs.device)
    prepared = {"coefficients": coefficients}
    if inputs.params.tracking.enabled:
        _track(inputs, choice, prepared, coefficients)
    return prepared


def _track(inputs, choice, prepared: dict[str, Any], coefficients: ArtifactRef) -> None:
    """Accuracy of the tuned model via the flow's own (cached) merge and evaluation tasks."""
    from tasks.evaluate import evaluate_model
    from tasks.merge import merge_models

    params, ev = inputs.params, inputs.params.evaluation
    models = [inputs.models[t] for t in sorted(inputs.models)]
    merged = merge_models(inputs.store, choice.method, choice.hparams(), inputs.base, models, prepared,
                          inputs.device)

    def accuracy(model, on: list[str]) -> dict[str, float]:
        ref = evaluate_model(inputs.store, model, inputs.zoo, on, ev.split, ev.batch_size, ev.limit,
                             inputs.device)
        return ref.summary["accuracy"]

    track_adamerging(
        coefficients=coefficients, accuracy=accuracy(merged, inputs.tasks),
        expert_accuracy={t: accuracy(inputs.models[t], [t])[t] for t in inputs.tasks},
        pretrained_accuracy=accuracy(inputs.base, inputs.tasks), hyperparams=choice.hparams(),
        params={"evaluation": ev.model_dump(mode="json"), "device": params.device,
                "zoo": params.zoo.zoo_spec()},
        experiment=params.tracking.experiment, tracking_uri=params.tracking_uri(),
        artifact_root=str(params.artifact_root()), project_dir=params.project)


def _external_file(path: str, params) -> ArtifactRef:
    """A user-given coefficients file as a reference keyed by its content (not its path)."""
    from mergeflow.adamerging import Coefficients
    from mergeflow.hashing import hash_file

    p = params.path(path).resolve()
    Coefficients.load(p)  # a clear error now if it is missing or not a coefficients file
    return ArtifactRef(kind="adamerging", key="external", root=str(p.parent), path=str(p),
                       main=p.name, content_hash=hash_file(p))
