"""The run's report: the accuracy table printed at the end, and the DVC metrics/plots files."""

from __future__ import annotations

import csv
import io
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.params import Params
from tasks.artifacts import ArtifactRef


@dataclass(frozen=True)
class MergeResult:
    label: str  # e.g. task_arithmetic(lam=0.3)
    method: str
    hparams: dict[str, Any]
    accuracy: dict[str, float]
    merged: ArtifactRef
    # What the method-specific steps handed to the merge (flows/preparation.py): a coefficient
    # search's {"lam": [...]}, AdaMerging's coefficients artifact; {} for most methods.
    prepared: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Report:
    tasks: list[str]
    split: str
    pretrained: dict[str, float]
    experts: dict[str, float]
    merges: list[MergeResult]  # the primary merge first

    def rows(self) -> dict[str, dict[str, float]]:
        """Table rows: model label -> {task: accuracy}."""
        return {"pretrained": self.pretrained, "experts": self.experts,
                **{m.label: m.accuracy for m in self.merges}}

    def normalized(self, accuracy: dict[str, float]) -> float:
        """Mean over tasks of accuracy / expert accuracy."""
        return sum(accuracy[t] / self.experts[t] for t in self.tasks) / len(self.tasks)

    def to_dict(self) -> dict[str, Any]:
        def summary(acc: dict[str, float]) -> dict[str, Any]:
            return {"accuracy": {t: acc[t] for t in self.tasks},
                    "average": sum(acc[t] for t in self.tasks) / len(self.tasks),
                    "normalized_average": self.normalized(acc)}

        return {
            "split": self.split,
            "tasks": self.tasks,
            "pretrained": summary(self.pretrained),
            "experts": summary(self.experts),
            "merges": [{"label": m.label, "method": m.method, "hparams": m.hparams,
                        "prepared": {k: _described(v) for k, v in m.prepared.items()},
                        "output_hash": m.merged.content_hash, **summary(m.accuracy)}
                       for m in self.merges],
        }

    def metrics(self) -> dict[str, Any]:
        """DVC metrics: the primary merge at the top level, every model under `models`."""
        primary = self.merges[0]
        d = self.to_dict()
        return {"split": self.split, "method": primary.label,
                "average": d["merges"][0]["average"],
                "normalized_average": d["merges"][0]["normalized_average"],
                "per_task": {t: primary.accuracy[t] for t in self.tasks},
                "models": {m["label"]: {"average": m["average"], "normalized_average": m["normalized_average"]}
                           for m in d["merges"]}}

    def per_task_csv(self) -> str:
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["task", "model", "accuracy"])
        for model, acc in self.rows().items():
            for t in self.tasks:
                w.writerow([t, model, f"{acc[t]:.6f}"])
        return out.getvalue()

    def write(self, params: Params) -> None:
        out = params.outputs
        _write_atomic(params.path(out.metrics), json.dumps(self.metrics(), indent=2, sort_keys=True) + "\n")
        _write_atomic(params.path(out.per_task), self.per_task_csv())
        _write_atomic(params.path(out.report), json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def _described(value: Any) -> Any:
    """A prepared input as the report shows it: an artifact by its path and content hash."""
    if hasattr(value, "content_hash") and hasattr(value, "path"):
        return {"path": str(value.path), "content_hash": value.content_hash}
    return value


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.read_text() == text:
        return  # unchanged: keep the file (and its mtime) as it is
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text)
    os.replace(tmp, path)


def format_report_table(report: dict[str, Any]) -> str:
    """The per-task accuracy table (%) of a report dict: pretrained, experts, each merge."""
    from mergeflow.evaluation import format_accuracy_table

    rows = {"pretrained": report["pretrained"], "experts": report["experts"],
            **{m["label"]: m for m in report["merges"]}}
    return format_accuracy_table({name: row["accuracy"] for name, row in rows.items()}, report["tasks"],
                                 normalized={name: row["normalized_average"] for name, row in rows.items()})
