"""Per-task coefficient search: the candidates (library) and the flow end to end on the tiny zoo."""

from __future__ import annotations

import fixtures_zoo
import pytest
import torch

from mergeflow.coefficient_search import (
    candidate_hparams,
    load_pcb_components,
    merge_candidate,
    merge_pcb_components,
    pcb_components,
    save_pcb_components,
)
from mergeflow.merging import merge


def _models(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(7, generator=g), "steps": torch.tensor([3])}
    finetuned = []
    for i in range(n):
        sd = {k: v + 0.05 * (i + 1) * torch.randn(v.shape, generator=g) for k, v in base.items() if k != "steps"}
        sd["steps"] = torch.tensor([9])
        finetuned.append(sd)
    return base, finetuned


@pytest.mark.parametrize("variant", ["vision", "vision_es"])
def test_cached_pcb_components_give_the_registered_method_bitwise(tmp_path, variant):
    base, finetuned = _models()
    components = pcb_components(base, finetuned, ratio=0.2, variant=variant)
    save_pcb_components(components, tmp_path / "scores.safetensors", variant)
    loaded = load_pcb_components(tmp_path / "scores.safetensors")
    for lams in ([1.0, 1.0, 1.0], [0.8, 1.3, 1.1]):
        ours = merge_pcb_components(base, loaded, lams, variant)
        ref = merge("pcb", base, finetuned, ratio=0.2, variant=variant, lam=lams)
        assert sorted(ours) == sorted(ref)
        for k in ref:
            assert torch.equal(ours[k], ref[k]), k
    assert torch.equal(ours["steps"], torch.tensor([3]))  # integer buffers from the base


def test_task_arithmetic_per_task_lams_by_hand():
    base, finetuned = _models(2)
    out = merge_candidate("task_arithmetic", base, finetuned, {}, [0.5, 2.0])
    for k in ("w", "b"):
        expect = base[k] + 0.5 * (finetuned[0][k] - base[k]) + 2.0 * (finetuned[1][k] - base[k])
        assert torch.allclose(out[k], expect, atol=1e-6)
    # a scalar lam is unchanged behaviour: lam * sum of the task vectors
    scalar = merge("task_arithmetic", base, finetuned, lam=0.3)
    expect = base["w"] + 0.3 * ((finetuned[0]["w"] - base["w"]) + (finetuned[1]["w"] - base["w"]))
    assert torch.allclose(scalar["w"], expect, atol=1e-6)
    with pytest.raises(ValueError, match="3 lam values for 2"):
        merge("task_arithmetic", base, finetuned, lam=[1.0, 1.0, 1.0])


def test_ties_candidate_uses_per_task_lams():
    base, finetuned = _models(2)
    equal = merge_candidate("ties", base, finetuned, {"k": 0.5}, [1.0, 1.0])
    scalar = merge("ties", base, finetuned, k=0.5, lam=1.0)
    for k in ("w", "b"):
        assert torch.allclose(equal[k], scalar[k], atol=1e-6)
    skewed = merge_candidate("ties", base, finetuned, {"k": 0.5}, [1.3, 0.8])
    assert not torch.equal(skewed["w"], equal["w"])


def test_candidate_errors_name_the_problem():
    with pytest.raises(ValueError, match="searchable"):
        candidate_hparams("average", {}, [1.0])
    with pytest.raises(ValueError, match="variant='vision_es'"):
        candidate_hparams("pcb", {"variant": "nlp"}, [1.0, 1.0])
    with pytest.raises(ValueError, match="do not set lam"):
        candidate_hparams("ties", {"lam": 1.0}, [1.0, 1.0])
    assert candidate_hparams("pcb", {"variant": "vision_es"}, [1, 1.2])["lam"] == [1.0, 1.2]


# ---- the flow, end to end on a tiny zoo ----------------------------------------------------------

EVAL_LIMIT = 128


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    return fixtures_zoo.tiny_zoo(tmp_path_factory)  # built once per session, shared with other modules


def test_search_flow_logs_every_point_and_chooses_on_validation(prefect_api, tiny_zoo, tmp_path):
    from mlflow import MlflowClient

    from flows.coefficient_search import coefficient_search
    from mergeflow.checkpoint import load_state_dict
    from mergeflow.evaluation import evaluate

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = tmp_path / "store"
    result = coefficient_search(zoo_dir=str(tiny_zoo.root), store=str(store), method="pcb", budget=6, workers=2,
                                eval_limit=EVAL_LIMIT, tracking_uri=uri, project_dir=str(tmp_path), test=True)
    points = result["points"]
    assert len(points) == 6
    assert all(0.8 <= lam <= 1.3 for p in points for lam in p["lams"])
    # The choice is the best validation point, and its number really is validation accuracy.
    best = max(points, key=lambda p: p["val_mean"])
    assert result["lams"] == best["lams"] and result["val_mean"] == best["val_mean"]
    tasks = sorted(tiny_zoo.tasks)
    base = load_state_dict(tiny_zoo.pretrained_dir)
    experts = [load_state_dict(tiny_zoo.expert_dir(t)) for t in tasks]
    chosen = merge("pcb", base, experts, variant="vision_es", ratio=0.05, lam=result["lams"])
    assert evaluate(chosen, tiny_zoo, split="val", limit=EVAL_LIMIT) == result["val_accuracy"]
    assert evaluate(chosen, tiny_zoo, split="test", limit=EVAL_LIMIT) == result["test_accuracy"]

    # MLflow: one point per evaluation (a metric curve), the plot and the table.
    client = MlflowClient(uri)
    history = client.get_metric_history(result["run_id"], "search/val_mean")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(6))
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [p["val_mean"] for p in points]
    best_curve = client.get_metric_history(result["run_id"], "search/best_val_mean")
    assert max(m.value for m in best_curve) == result["val_mean"]
    lam_curve = client.get_metric_history(result["run_id"], f"search/lam/{tasks[0]}")
    assert len(lam_curve) == 6
    artifacts = {a.path for a in client.list_artifacts(result["run_id"])}
    assert {"search.png", "search_points.json"} <= artifacts
    assert client.get_run(result["run_id"]).data.params["objective"] == "mean validation accuracy"

    # The PCB scores are computed once: a second search (other budget, seed) reuses the artifact.
    again = coefficient_search(zoo_dir=str(tiny_zoo.root), store=str(store), method="pcb", budget=2, workers=2,
                               seed=1, eval_limit=EVAL_LIMIT, track=False)
    assert len(again["points"]) == 2
    assert len(list((store / "pcb_scores").iterdir())) == 1


def test_search_flow_tunes_task_arithmetic_lams(prefect_api, tiny_zoo, tmp_path):
    from flows.coefficient_search import coefficient_search

    result = coefficient_search(zoo_dir=str(tiny_zoo.root), store=str(tmp_path / "store"), method="task_arithmetic",
                                budget=3, workers=2, lower=0.1, upper=0.6, init=0.3, eval_limit=EVAL_LIMIT,
                                track=False)
    assert len(result["points"]) == 3
    assert set(result["lams_by_task"]) == set(tiny_zoo.tasks)
    assert all(0.1 <= lam <= 0.6 for lam in result["lams"])


def test_a_failing_candidate_fails_the_search_with_its_error(prefect_api, tiny_zoo, tmp_path, monkeypatch):
    # One evaluation that raises (a broken candidate merge) must end the search with that error,
    # not hang on the other evaluations in flight nor choose from the points it has.
    import tasks.coefficient_search as candidate_tasks
    from flows.coefficient_search import coefficient_search

    real, calls = candidate_tasks._candidate_state, []

    def third_one_breaks(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("candidate 3 broke")
        return real(*args, **kwargs)
    monkeypatch.setattr(candidate_tasks, "_candidate_state", third_one_breaks)
    with pytest.raises(RuntimeError, match="candidate 3 broke"):
        coefficient_search(zoo_dir=str(tiny_zoo.root), store=str(tmp_path / "store"), method="pcb", budget=6,
                           workers=2, eval_limit=EVAL_LIMIT, track=False)
    assert len(calls) <= 4  # the batch after the failure was never asked


def test_the_search_optimiser_runs_past_its_metamodel_switch():
    """NGOpt picks a metamodel for 4 coefficients at the official budget of 100; from its 26th
    evaluation on it fits a model, which failed with numpy >= 2.4 (constraints.txt pins below).
    A toy objective with its optimum inside the bounds: every ask/tell must go through."""
    from flows.coefficient_search import make_optimizer

    optimizer = make_optimizer(4, 40, 0.8, 1.3, 1.0, 2, seed=0)
    target = torch.tensor([0.9, 1.1, 1.2, 1.0], dtype=torch.float64)
    told = 0
    while told < 40:
        asked = [optimizer.ask() for _ in range(2)]
        for candidate in asked:
            value = torch.as_tensor(candidate.value, dtype=torch.float64)
            assert ((0.8 <= value) & (value <= 1.3)).all()
            optimizer.tell(candidate, float(((value - target) ** 2).sum()))
            told += 1
    best = torch.as_tensor(optimizer.provide_recommendation().value, dtype=torch.float64)
    assert float(((best - target) ** 2).sum()) < float(((torch.ones(4, dtype=torch.float64) - target) ** 2).sum())
