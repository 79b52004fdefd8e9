"""Evaluation: exact accuracy counts, per-task evaluation of a zoo, normalized accuracy, reports."""

from __future__ import annotations

import json

import fixtures_zoo
import pytest
import torch
from torch import nn

from mergeflow.checkpoint import load_state_dict
from mergeflow.datasets import Split
from mergeflow.evaluation import (
    EvaluationReport,
    accuracy,
    evaluate,
    format_accuracy_table,
    normalized_accuracy,
    print_zoo_table,
)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    return fixtures_zoo.tiny_zoo(tmp_path_factory)


def _constant_head(dim: int, classes: int, always: int) -> nn.Linear:
    head = nn.Linear(dim, classes)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[always] = 1.0
    return head


def test_constant_head_scores_the_class_frequency():
    labels = torch.tensor([0, 1, 2, 2, 1, 2, 0, 2])  # class 2: 4 of 8
    split = Split(torch.rand(8, 1, 28, 28), labels)
    encoder = nn.Flatten()
    head = _constant_head(784, 3, always=2)
    assert accuracy(encoder, head, split, batch_size=3) == 0.5
    assert accuracy(encoder, _constant_head(784, 3, always=0), split) == 0.25
    assert accuracy(encoder, head, split, limit=4) == 0.5  # first four: 0,1,2,2
    assert accuracy(encoder, head, split, limit=3) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="empty"):
        accuracy(encoder, head, split, limit=0)


def test_accuracy_counts_exactly_across_batches():
    # Encoder is the identity on 1-pixel "images"; the head reads the class off the pixel value.
    labels = torch.tensor([0, 1, 1, 0, 1])
    images = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0]).reshape(5, 1, 1, 1)
    head = nn.Linear(1, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        head.bias.zero_()
    # predictions 0,1,0,0,1 (ties at 0 go to class 0) vs labels 0,1,1,0,1: 4 of 5 right
    assert accuracy(nn.Flatten(), head, Split(images, labels), batch_size=2) == 0.8


@pytest.fixture
def build_threads(tiny_zoo):
    """The build's torch thread count, so float sums (and so every argmax) are bit-identical."""
    threads = torch.get_num_threads()
    torch.set_num_threads(tiny_zoo.summary["spec"]["threads"])
    yield
    torch.set_num_threads(threads)


def test_evaluate_matches_build_time_numbers(tiny_zoo, build_threads):
    limit = tiny_zoo.summary["spec"]["eval_limit"]
    task = tiny_zoo.tasks[0]
    from_dir = evaluate(tiny_zoo.expert_dir(task), tiny_zoo, tasks=[task], limit=limit)
    from_state = evaluate(load_state_dict(tiny_zoo.expert_dir(task)), tiny_zoo, tasks=[task], limit=limit)
    assert from_dir == from_state == {task: tiny_zoo.expert_accuracy("test")[task]}
    pretrained = evaluate(tiny_zoo.pretrained_dir, tiny_zoo, split="val", limit=limit, batch_size=100)
    assert pretrained == tiny_zoo.pretrained_accuracy("val")


def test_evaluate_rejects_bad_arguments(tiny_zoo):
    with pytest.raises(ValueError, match="not in this zoo"):
        evaluate(tiny_zoo.pretrained_dir, tiny_zoo, tasks=["cifar10"])
    with pytest.raises(ValueError, match="unknown split"):
        evaluate(tiny_zoo.pretrained_dir, tiny_zoo, split="dev")


def test_normalized_accuracy_and_report():
    acc = {"a": 0.5, "b": 0.9}
    experts = {"a": 1.0, "b": 0.9, "c": 0.7}
    assert normalized_accuracy(acc, experts) == {"a": 0.5, "b": 1.0}
    with pytest.raises(ValueError, match="no expert accuracy"):
        normalized_accuracy({"d": 0.1}, experts)
    report = EvaluationReport.build(acc, experts)
    assert report.average == pytest.approx(0.7)
    assert report.normalized_average == pytest.approx(0.75)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["accuracy"] == acc and d["normalized"] == {"a": 0.5, "b": 1.0}
    bare = EvaluationReport.build(acc)
    assert bare.normalized_average is None and "normalized" not in bare.to_dict()


def test_tables(tiny_zoo, capsys):
    table = format_accuracy_table({"merged": {"a": 0.5, "b": 0.25}, "half": {"a": 1.0}}, ["a", "b"])
    lines = table.splitlines()
    assert lines[0].split() == ["model", "a", "b", "avg"]
    assert lines[2].split() == ["merged", "50.00", "25.00", "37.50"]
    assert lines[3].split() == ["half", "100.00", "-", "100.00"]
    with_norm = format_accuracy_table({"merged": {"a": 0.5, "b": 0.25}, "long_task_name": {"a": 1.0}}, ["a", "b"],
                                      normalized={"merged": 0.625})
    lines = with_norm.splitlines()
    assert lines[0].split() == ["model", "a", "b", "avg", "norm"] and lines[2].split()[-1] == "62.50"
    assert lines[3].split()[-1] == "-" and len({len(line) for line in lines}) == 1  # every row as wide
    print_zoo_table(tiny_zoo)
    out = capsys.readouterr().out
    assert "pretrained+head" in out and "experts" in out and "task_arithmetic(0.3)" in out
