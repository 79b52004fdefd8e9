"""The coefficient search as a step of the merge pipeline (`search:` in a merge entry).

One tiny project is run twice: the first run searches (budget 4, on validation), merges pcb with
the chosen per-task lams and records where they came from; the second run is Cached throughout.
Bad `search` blocks are refused by params validation, before anything runs.
"""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import yaml
from test_pipeline import TINY, _run

from flows.params import ParamsError, validate_params

# Bounds that exclude pcb's default lam (1.0): a merge that ignored the search would differ.
SEARCH = {"budget": 4, "workers": 2, "lower": 0.5, "upper": 0.9, "init": 0.7, "limit": 64}
SEARCHED_LABEL = "pcb(clip=0.01,ratio=0.1,variant=vision_es)+search(budget=4,lower=0.5,upper=0.9,init=0.7,limit=64)"
PLAIN_LABEL = "pcb(clip=0.01,lam=1.0,ratio=0.1,variant=vision_es)"
# zoo 1, fetch 3, task vectors 1, search 1, merges 2, evaluations 1 + 2 + 2, MLflow records 2
EXPECTED_TASK_RUNS = 15


def _raw() -> dict:
    return {
        "zoo": {"spec": TINY},
        "merge": {"method": "pcb", "variant": "vision_es", "search": SEARCH},
        "compare": [{"method": "pcb", "variant": "vision_es"}],  # the same method without the search
        "evaluation": {"split": "test", "batch_size": 64, "limit": 64},
        "device": "cpu",
    }


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, prefect_api):
    project = tmp_path_factory.mktemp("search_project")
    params = validate_params(_raw(), project=project)
    report, states = _run(params, expected=EXPECTED_TASK_RUNS)
    return project, params, report, states


def _search_artifact(params) -> dict:
    from tasks.artifacts import ArtifactStore

    store = ArtifactStore(params.path(params.artifacts))
    [found] = list((store.root / "coefficient_search").iterdir())
    return json.loads((found / "manifest.json").read_text())["summary"]


def test_pipeline_merges_with_the_searched_lams(first_run):
    from mergeflow.checkpoint import load_state_dict
    from mergeflow.merging import merge

    project, params, report, states = first_run
    assert states["search_coefficients"] == ["Completed"]
    assert [m["label"] for m in report["merges"]] == [SEARCHED_LABEL, PLAIN_LABEL]
    search = _search_artifact(params)
    lams, tasks = search["lams"], report["tasks"]
    assert search["evaluations"] == 4 and len(lams) == len(tasks) == 2
    assert all(0.5 <= lam <= 0.9 for lam in lams)

    # The published primary merge is exactly pcb with those lams (in sorted task order) ...
    zoo = project / "outputs" / "zoo"
    base = load_state_dict(zoo / "pretrained")
    experts = [load_state_dict(zoo / "experts" / t) for t in sorted(tasks)]
    expected = merge("pcb", base, experts, variant="vision_es", ratio=0.1, lam=lams)
    merged = load_state_dict(project / "outputs" / "merged")
    assert sorted(merged) == sorted(expected)
    for name in expected:
        assert torch.equal(merged[name], expected[name]), name
    manifest = json.loads((project / "outputs" / "merged" / "mergeflow_manifest.json").read_text())
    assert manifest["hyperparameters"]["lam"] == lams
    # The report says which lams the merge used, and that the compared entry had none prepared.
    assert report["merges"][0]["prepared"] == {"lam": lams} and report["merges"][1]["prepared"] == {}
    assert json.loads((project / "outputs" / "report.json").read_text())["merges"][0]["prepared"] == {"lam": lams}
    # ... and not the same method at its default lam (the compared entry).
    assert report["merges"][0]["output_hash"] != report["merges"][1]["output_hash"]


def test_search_objective_is_validation(first_run):
    from mergeflow.evaluation import evaluate
    from mergeflow.zoo import Zoo

    project, params, report, _ = first_run
    search = _search_artifact(params)
    assert search["objective_split"] == "val"
    zoo = Zoo.open(project / "outputs" / "zoo")
    merged = project / "outputs" / "merged"
    val = evaluate(merged, zoo, split="val", limit=SEARCH["limit"])
    test = evaluate(merged, zoo, split="test", limit=SEARCH["limit"])
    assert val != test  # otherwise this test could not tell the splits apart
    assert search["val_accuracy"] == val
    assert report["merges"][0]["accuracy"] == test  # the report itself is on evaluation.split


def test_merge_run_records_that_its_lams_came_from_the_search(first_run):
    from mlflow import MlflowClient

    _, params, report, _ = first_run
    search = _search_artifact(params)
    client = MlflowClient(params.tracking_uri())
    exp = client.get_experiment_by_name(params.tracking.experiment)
    [merge_run] = client.search_runs([exp.experiment_id], f"attributes.run_name = '{SEARCHED_LABEL}'")
    tags = merge_run.data.tags
    assert tags["mergeflow.lam_source"] == "search"
    assert json.loads(tags["mergeflow.search.lams"]) == search["lams"]
    assert tags["mergeflow.search.budget"] == "4"
    assert tags["mergeflow.search.run_id"] == search["run_id"]
    assert "hparams.lam" not in merge_run.data.params  # no default lam pretending to be used
    search_run = client.get_run(search["run_id"])
    assert search_run.data.tags["mergeflow.kind"] == "coefficient_search"
    assert search_run.data.params["objective"] == "mean validation accuracy"
    assert len(client.get_metric_history(search["run_id"], "search/val_mean")) == 4
    [plain_run] = client.search_runs([exp.experiment_id], f"attributes.run_name = '{PLAIN_LABEL}'")
    assert "mergeflow.lam_source" not in plain_run.data.tags


def test_second_run_is_cached_and_does_not_search_again(first_run):
    from mlflow import MlflowClient

    _, params, report, _ = first_run
    again, states = _run(params, expected=EXPECTED_TASK_RUNS)
    assert states["search_coefficients"] == ["Cached"]
    assert all(s == "Cached" for s in states["merge"])
    assert again == report
    client = MlflowClient(params.tracking_uri())
    exp = client.get_experiment_by_name(params.tracking.experiment)
    assert len(client.search_runs([exp.experiment_id], "tags.`mergeflow.kind` = 'coefficient_search'")) == 1


@pytest.mark.parametrize(("merge", "field", "words"), [
    ({"method": "average", "search": {}}, "merge.search", "no per-task lam"),
    ({"method": "pcb", "search": {}}, "merge.variant", "vision_es"),  # nlp applies lam after the mean
    ({"method": "ties", "lam": 1.0, "search": {}}, "merge.lam", "remove"),
    ({"method": "ties", "search": {"budgt": 10}}, "merge.search.budgt", "spelling"),
    ({"method": "ties", "search": {"budget": 0}}, "merge.search.budget", "greater than 0"),
    ({"method": "task_arithmetic", "search": {"lower": 1.0, "upper": 0.5}}, "merge.search.upper", "above"),
    ({"method": "task_arithmetic", "search": {"init": 2.0}}, "merge.search.init", "outside"),
])
def test_bad_search_blocks_name_the_field(merge, field, words):
    with pytest.raises(ParamsError) as e:
        validate_params({"merge": merge})
    assert f"{field}:" in str(e.value) and words in str(e.value)


def test_a_bad_search_in_compare_stops_the_run_before_any_work(tmp_path, capsys):
    from flows.cli import run

    raw = {**_raw(), "compare": [{"method": "ties", "search": {"budget": -1}}]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert run(Namespace(params=str(tmp_path / "params.yaml"), set=[])) == 2
    assert "compare[0].search.budget" in capsys.readouterr().err
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["params.yaml"]  # nothing built


def test_a_null_lam_leaves_it_to_the_search(tmp_path):
    """params.yaml sets a lam; `-S merge.lam=null` next to a search block hands it to the search."""
    from flows.params import load_params

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"merge": {"method": "task_arithmetic", "lam": 0.3}}))
    params = load_params(path, ["merge.lam=null", "merge.search.budget=6"])
    assert params.merge.search.budget == 6 and "lam" not in params.merge.hparams()
    with pytest.raises(ParamsError, match="merge.lam"):
        load_params(path, ["merge.search.budget=6"])  # a lam and a search: still refused
