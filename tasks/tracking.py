"""MLflow tracking: one run per merge, with metrics, a per-task chart, the report and lineage.

    from tasks.tracking import Tracker, log_merge_run, track_merge

    run_id = log_merge_run(
        method="task_arithmetic", hyperparams={"lam": 0.3},
        accuracy={"mnist": 0.91, ...},               # the merged model, per task
        expert_accuracy={...}, pretrained_accuracy={...},
        params=params.model_dump(mode="json"),        # flattened into MLflow params
        input_hashes={"pretrained": h0, "expert/mnist": h1}, output_hash=h_out,
        experiment="mergeflow", tracking_uri=params.tracking_uri(),
        artifact_root=params.artifact_root(), project_dir=params.project,
    )

    track_merge(...)   # the same, as a Prefect task in a flow's run graph (never cached)

    # a sweep: one parent run, one child run per grid point
    tracker = Tracker(experiment="mergeflow", project_dir=params.project)
    with tracker.parent_run("sweep task_arithmetic", params={...}) as parent_id:
        tracker.log_merge_run(..., parent_run_id=parent_id)

What a merge run holds:
- params: `method`, `hparams.<name>` and every leaf of `params` flattened with dots
  (`zoo.spec.steps`, `evaluation.split`); lists and empty dicts as JSON;
- metrics: `accuracy/<task>`, `accuracy_avg`, `normalized_accuracy/<task>`,
  `normalized_accuracy_avg` (merged / expert, per task, averaged), and the baselines
  `expert_accuracy/<task>`, `pretrained_accuracy/<task>` (+ `_avg`);
- artifacts: `per_task_accuracy.png` (bars: pretrained, the merge, experts, per task and on
  average) and `report.json`;
- tags: `mergeflow.version`, `mergeflow.method`, `mergeflow.git_commit` (+ `mlflow.source.git.commit`),
  `mergeflow.git_dirty`, `mergeflow.dvc_lock_hash` (sha256 of the project's dvc.lock when there is
  one: the lock the run started from, as DVC writes a stage's lock after it), under DVC the
  stage and, for `dvc exp run`, the experiment's name and baseline commit (`mergeflow.dvc_stage`,
  `mergeflow.dvc_exp_name`, `mergeflow.dvc_exp_baseline_rev`), `mergeflow.input_hash.<name>`,
  `mergeflow.output_hash`.

Store: `tracking_uri` if given, else env `MLFLOW_TRACKING_URI`, else `sqlite:///<project>/mlflow.db`.
Artifacts of a new experiment in a local store go to `artifact_root` (default `<project>/mlartifacts`):
both are set explicitly because MLflow 3 otherwise puts them under the current directory. A
server URI (http...) keeps the server's own artifact settings unless `artifact_root` is given.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

CHART_FILE = "per_task_accuracy.png"
REPORT_FILE = "report.json"
TAG_PREFIX = "mergeflow."
_BATCH = 100  # MLflow's limit of params/tags per log_batch call
_MAX_PARAM_LEN = 6000


def default_tracking_uri(project_dir: str | Path = ".") -> str:
    """Env `MLFLOW_TRACKING_URI`, else the embedded sqlite store inside the project."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(project_dir).resolve() / 'mlflow.db'}"


class Tracker:
    """An MLflow client bound to one store and one experiment (created on first use)."""

    def __init__(
        self,
        experiment: str = "mergeflow",
        *,
        tracking_uri: str | None = None,
        artifact_root: str | Path | None = None,
        project_dir: str | Path = ".",
    ) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow import MlflowClient

        self.project_dir = Path(project_dir).resolve()
        self.tracking_uri = tracking_uri or default_tracking_uri(self.project_dir)
        local_store = not self.tracking_uri.startswith(("http://", "https://", "databricks"))
        if artifact_root is None and local_store:
            artifact_root = self.project_dir / "mlartifacts"
        self.artifact_location = Path(artifact_root).resolve().as_uri() if artifact_root else None
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.experiment_id = self._experiment_id(experiment)

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=self.artifact_location)
        except MlflowException:  # created meanwhile by another process
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    # ---- runs ----
    def log_merge_run(
        self,
        *,
        method: str,
        hyperparams: Mapping[str, Any],
        accuracy: Mapping[str, float],
        expert_accuracy: Mapping[str, float] | None = None,
        pretrained_accuracy: Mapping[str, float] | None = None,
        params: Mapping[str, Any] | None = None,
        input_hashes: Mapping[str, str] | None = None,
        output_hash: str | None = None,
        report: Mapping[str, Any] | None = None,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Record one merge as a finished MLflow run; returns its run id."""
        if not accuracy:
            raise ValueError("log_merge_run needs the merged model's accuracy on at least one task")
        metrics = merge_metrics(accuracy, expert_accuracy, pretrained_accuracy)
        if report is None:
            report = {
                "method": method, "hyperparams": dict(hyperparams), "metrics": metrics,
                "inputs": dict(input_hashes or {}), "output_hash": output_hash,
            }
        all_tags = {
            **lineage_tags(self.project_dir, input_hashes, output_hash),
            TAG_PREFIX + "method": method,
            **(tags or {}),
        }
        flat = {"method": method, **flatten({"hparams": dict(hyperparams)}), **flatten(params or {})}
        name = run_name or method + _hparam_label(hyperparams)
        with self._run(name, parent_run_id, all_tags) as run_id:
            self._log_batches(run_id, flat, metrics)
            self.client.log_dict(run_id, json.loads(json.dumps(report, default=str)), REPORT_FILE)
            figure = per_task_chart(name, accuracy, expert_accuracy, pretrained_accuracy)
            self.client.log_figure(run_id, figure, CHART_FILE)
        return run_id

    @contextmanager
    def parent_run(
        self, run_name: str, *, params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> Iterator[str]:
        """A run that groups child runs (pass its id as `parent_run_id`); FAILED if the body raises."""
        all_tags = {**lineage_tags(self.project_dir), **(tags or {})}
        with self._run(run_name, None, all_tags) as run_id:
            self._log_batches(run_id, flatten(params or {}), {})
            yield run_id

    @contextmanager
    def _run(self, name: str, parent_run_id: str | None, tags: Mapping[str, str]) -> Iterator[str]:
        run_tags = {"mlflow.runName": name, **tags}
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=run_tags)
        run_id = run.info.run_id
        try:
            yield run_id
        except BaseException:
            self.client.set_terminated(run_id, status="FAILED")
            raise
        self.client.set_terminated(run_id, status="FINISHED")

    def _log_batches(self, run_id: str, params: Mapping[str, str], metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric, Param

        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, params=items[i:i + _BATCH])
        if metrics:
            self.client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in sorted(metrics.items())])


def log_merge_run(
    *,
    experiment: str = "mergeflow",
    tracking_uri: str | None = None,
    artifact_root: str | Path | None = None,
    project_dir: str | Path = ".",
    **run: Any,
) -> str:
    """`Tracker(experiment, ...).log_merge_run(**run)`: one call from a flow. Returns the run id."""
    tracker = Tracker(experiment, tracking_uri=tracking_uri, artifact_root=artifact_root,
                      project_dir=project_dir)
    return tracker.log_merge_run(**run)


# ---- what goes into a run ----

def merge_metrics(
    accuracy: Mapping[str, float],
    expert_accuracy: Mapping[str, float] | None = None,
    pretrained_accuracy: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """MLflow metric names -> values: per task, averages, normalized (merged / expert)."""
    from mergeflow.evaluation import normalized_accuracy

    out = _per_task("accuracy", accuracy)
    if expert_accuracy:
        out.update(_per_task("normalized_accuracy", normalized_accuracy(accuracy, expert_accuracy)))
        out.update(_per_task("expert_accuracy", {t: expert_accuracy[t] for t in accuracy}))
    if pretrained_accuracy:
        out.update(_per_task("pretrained_accuracy", {t: pretrained_accuracy[t] for t in accuracy
                                                     if t in pretrained_accuracy}))
    return out


def _per_task(name: str, values: Mapping[str, float]) -> dict[str, float]:
    out = {f"{name}/{task}": float(v) for task, v in values.items()}
    if values:
        out[f"{name}_avg"] = sum(values.values()) / len(values)
    return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts -> {"a.b.c": "value"}; lists, empty dicts and None as JSON; long values cut."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
            out[name] = text[:_MAX_PARAM_LEN]
    return out


# Environment variables DVC sets for the stage commands it runs (dvc repro, dvc exp run).
DVC_RUN_TAGS = {"DVC_STAGE": "dvc_stage", "DVC_EXP_NAME": "dvc_exp_name",
                "DVC_EXP_BASELINE_REV": "dvc_exp_baseline_rev"}


def lineage_tags(
    project_dir: str | Path,
    input_hashes: Mapping[str, str] | None = None,
    output_hash: str | None = None,
) -> dict[str, str]:
    """Where a run came from: code version, git commit, DVC lock, input and output hashes."""
    from mergeflow import __version__

    project = Path(project_dir)
    tags = {TAG_PREFIX + "version": __version__}
    commit = _git(project, "rev-parse", "HEAD")
    if commit:
        tags[TAG_PREFIX + "git_commit"] = tags["mlflow.source.git.commit"] = commit
        tags[TAG_PREFIX + "git_dirty"] = str(bool(_git(project, "status", "--porcelain", "--untracked-files=no")))
    lock = project / "dvc.lock"
    if lock.is_file():  # the lock the run started from: DVC writes this stage's only after it
        tags[TAG_PREFIX + "dvc_lock_hash"] = hashlib.sha256(lock.read_bytes()).hexdigest()
    for variable, tag in DVC_RUN_TAGS.items():  # set by DVC for a stage it runs
        if os.environ.get(variable):
            tags[TAG_PREFIX + tag] = os.environ[variable]
    for name, h in sorted((input_hashes or {}).items()):
        tags[f"{TAG_PREFIX}input_hash.{name}"] = h
    if output_hash:
        tags[TAG_PREFIX + "output_hash"] = output_hash
    return tags


def _git(cwd: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _hparam_label(hyperparams: Mapping[str, Any]) -> str:
    return f"({','.join(f'{k}={v}' for k, v in sorted(hyperparams.items()))})" if hyperparams else ""


def per_task_chart(
    label: str,
    accuracy: Mapping[str, float],
    expert_accuracy: Mapping[str, float] | None = None,
    pretrained_accuracy: Mapping[str, float] | None = None,
):
    """A grouped bar chart (matplotlib Figure, no GUI backend): per task and on average, in %."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg: no display needed

    tasks = list(accuracy)
    series = [("pretrained", pretrained_accuracy, "#9e9e9e"), (label, accuracy, "#1f77b4"),
              ("experts", expert_accuracy, "#2ca02c")]
    series = [(n, v, c) for n, v, c in series if v]
    columns = [*tasks, "average"]
    fig = Figure(figsize=(max(6.0, 1.3 * len(columns) + 2), 4.5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for i, (name, values, color) in enumerate(series):
        present = [t for t in tasks if t in values]
        heights = [100 * values[t] if t in values else 0.0 for t in tasks]
        heights.append(100 * sum(values[t] for t in present) / len(present) if present else 0.0)
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(columns))]
        bars = ax.bar(xs, heights, width, label=name, color=color)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(range(len(columns)), columns, rotation=20 if len(columns) > 5 else 0)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 120)  # headroom above 100 % for the value labels and the legend
    ax.set_title(f"Per-task accuracy: {label}")
    ax.legend(loc="upper center", ncols=len(series), fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


# A thin Prefect task for flows that want the call in their run graph; never cached, since every
# call must record a run.
track_merge = task(log_merge_run, name="log-merge-run", cache_policy=NO_CACHE, persist_result=False)
