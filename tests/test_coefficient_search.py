"""Per-task coefficient search: the candidates (library) and the flow end to end on the tiny zoo."""

from __future__ import annotations

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
