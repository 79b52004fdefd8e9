"""Per-task evaluation of encoder weights with each task's own (frozen, never merged) head.

    acc = evaluate(merged_state, zoo)                     # {"mnist": 0.93, ...} on the test split
    report = EvaluationReport.build(acc, zoo.expert_accuracy("test"))
    print(format_accuracy_table({"merged": acc, "experts": zoo.expert_accuracy()}, zoo.tasks))

Accuracy is an exact count ratio (correct / total) from batched inference, so the same weights
always give the same numbers.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm import tqdm

from mergeflow.datasets import Split

if TYPE_CHECKING:  # pragma: no cover
    from mergeflow.zoo import Zoo

SPLITS = ("train", "val", "test")


@torch.inference_mode()
def accuracy(encoder: nn.Module, head: nn.Module, split: Split, *, batch_size: int = 1024,
             device: str = "cpu", limit: int | None = None, bar: tqdm | None = None) -> float:
    """Fraction of `split` (its first `limit` examples) that `head(encoder(x))` classifies right;
    `bar` (a progress bar over images) advances batch by batch."""
    n = len(split) if limit is None else min(limit, len(split))
    if n == 0:
        raise ValueError("cannot compute accuracy on an empty split (check `limit`)")
    encoder.eval()
    head.eval()
    correct = 0
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        logits = head(encoder(split.images[start:stop].to(device)))
        correct += int((logits.argmax(dim=1).cpu() == split.labels[start:stop]).sum())
        if bar is not None:
            bar.update(stop - start)
    return correct / n


def evaluate(encoder_state: Mapping[str, torch.Tensor] | str | Path, zoo: Zoo, tasks: Sequence[str] | None = None,
             split: str = "test", device: str = "cpu", batch_size: int = 1024,
             limit: int | None = None, progress: bool = False) -> dict[str, float]:
    """Per-task accuracy of encoder weights (a state dict or a checkpoint path) on a zoo's tasks;
    `progress` shows a bar over all the images evaluated."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    tasks = list(zoo.tasks if tasks is None else tasks)
    unknown = [t for t in tasks if t not in zoo.tasks]
    if unknown:
        raise ValueError(f"task(s) {unknown} are not in this zoo; its tasks: {list(zoo.tasks)}")
    if isinstance(encoder_state, (str, Path)):
        from mergeflow.checkpoint import load_state_dict

        encoder_state = load_state_dict(encoder_state)
    encoder = zoo.encoder(encoder_state).to(device)
    results = {}
    with tqdm(total=0, desc=f"evaluate ({split})", unit="img", leave=False, disable=not progress,
              file=sys.stderr) as bar:
        for task in tasks:  # one task's data in memory at a time: the bar grows as each is loaded
            data = getattr(zoo.load_task(task), split)
            bar.total += len(data) if limit is None else min(limit, len(data))
            results[task] = accuracy(encoder, zoo.head(task).to(device), data, batch_size=batch_size,
                                     device=device, limit=limit, bar=bar)
    return results


def normalized_accuracy(acc: Mapping[str, float], expert_acc: Mapping[str, float]) -> dict[str, float]:
    """Merged accuracy divided by the task's expert accuracy, per task of `acc`."""
    missing = [t for t in acc if t not in expert_acc]
    if missing:
        raise ValueError(f"no expert accuracy for task(s) {missing}")
    zero = [t for t in acc if expert_acc[t] == 0]
    if zero:
        raise ValueError(f"expert accuracy is 0 for task(s) {zero}: cannot normalize")
    return {t: acc[t] / expert_acc[t] for t in acc}


def _mean(values: Mapping[str, float]) -> float:
    return sum(values.values()) / len(values)


@dataclass(frozen=True)
class EvaluationReport:
    """Per-task accuracy, its average and (given expert accuracy) normalized accuracy."""

    accuracy: dict[str, float]
    normalized: dict[str, float] | None = None

    @classmethod
    def build(cls, acc: Mapping[str, float], expert_acc: Mapping[str, float] | None = None) -> EvaluationReport:
        if not acc:
            raise ValueError("an evaluation report needs at least one task")
        normalized = None if expert_acc is None else normalized_accuracy(acc, expert_acc)
        return cls(dict(acc), normalized)

    @property
    def average(self) -> float:
        return _mean(self.accuracy)

    @property
    def normalized_average(self) -> float | None:
        return None if self.normalized is None else _mean(self.normalized)

    def to_dict(self) -> dict:
        out: dict = {"accuracy": dict(self.accuracy), "average": self.average}
        if self.normalized is not None:
            out["normalized"] = dict(self.normalized)
            out["normalized_average"] = self.normalized_average
        return out


def format_accuracy_table(rows: Mapping[str, Mapping[str, float]], tasks: Sequence[str] | None = None,
                          normalized: Mapping[str, float] | None = None) -> str:
    """A plain-text table: one row per model, one column per task, then the average (percent),
    and with `normalized` (model -> normalized average accuracy) a last `norm` column."""
    if not rows:
        raise ValueError("no rows to format")
    tasks = list(tasks) if tasks is not None else list(next(iter(rows.values())))
    name_width = max(len("model"), *(len(r) for r in rows))
    widths = [max(7, len(t)) for t in tasks]
    header = ["model".ljust(name_width), *(t.rjust(w) for t, w in zip(tasks, widths, strict=True)), "    avg"]
    header += ["   norm"] if normalized is not None else []
    lines = ["  ".join(header), "-" * len("  ".join(header))]
    for name, acc in rows.items():
        cells = [f"{100 * acc[t]:.2f}".rjust(w) if t in acc else "-".rjust(w) for t, w in zip(tasks, widths, strict=True)]
        present = [acc[t] for t in tasks if t in acc]
        cells.append(f"{100 * sum(present) / len(present):7.2f}" if present else "-".rjust(7))
        if normalized is not None:
            cells.append(f"{100 * normalized[name]:7.2f}" if name in normalized else "-".rjust(7))
        lines.append("  ".join([name.ljust(name_width), *cells]))
    return "\n".join(lines)


def print_zoo_table(zoo: Zoo, split: str = "test", extra: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """Print (and return) the zoo's build-time accuracy table, plus any `extra` rows (e.g. merges)."""
    rows = dict(zoo.accuracy_rows(split))
    rows.update(extra or {})
    table = format_accuracy_table(rows, zoo.tasks)
    print(f"accuracy on the {split} split (%)\n{table}")
    return table
