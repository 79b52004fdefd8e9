"""Per-task merge coefficients: the candidates a coefficient search evaluates (no optimiser here).

A search (PCB's evolutionary search; `flows/coefficient_search.py` drives it with nevergrad)
tunes one coefficient lam_i per fine-tuned model. For every searchable method, a candidate is
the method's `lam` given as a list:

- `task_arithmetic`: theta_0 + sum_i lam_i tau_i;
- `ties`: lam_i scales task i's trimmed vector before the sign election (see methods/ties.py);
- `pcb`: the official vision placement, theta_0 + sum_i scale_i (lam_i T_c,i) / sum_i scale_i,
  so `variant` must be "vision" or "vision_es" (the official searched code is "vision_es").

PCB's scores do not depend on lam, so `pcb_components` computes the clipped task vectors and
their scales once (the official code's "PCB matrix"); `merge_pcb_components` then builds each
candidate with a weighted mean only, bitwise equal to `merge("pcb", ..., lam=lams)`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mergeflow.compatibility import check_compatible, is_mergeable, signature_of
from mergeflow.merging import global_stats, merge
from mergeflow.methods import TensorGroup, get_method
from mergeflow.methods.pcb import check_score_stats, clipped_and_scale, weighted_mean

StateDict = Mapping[str, torch.Tensor]
SEARCHABLE = ("pcb", "task_arithmetic", "ties")
PCB_SEARCH_VARIANTS = ("vision", "vision_es")
# Each tensor's two pieces are stored under "<name><SEP>clipped" and "<name><SEP>scale".
_SEP = "::pcb::"


def candidate_hparams(method: str, hparams: Mapping[str, Any], lams: Sequence[float]) -> dict[str, Any]:
    """`hparams` with `lam` replaced by the per-task coefficients `lams`; validated."""
    if method not in SEARCHABLE:
        raise ValueError(f"no per-task coefficient search for {method!r}; searchable: {', '.join(SEARCHABLE)}")
    if "lam" in hparams:
        raise ValueError(f"{method}: do not set lam for a coefficient search; it is what the search tunes")
    if method == "pcb" and hparams.get("variant", "nlp") not in PCB_SEARCH_VARIANTS:
        raise ValueError(
            "pcb coefficient search needs variant='vision_es' (official pcb_ES.py) or 'vision': "
            "per-task lam is applied before the weighted mean, as in the official searched code")
    out = {**hparams, "lam": [float(x) for x in lams]}
    get_method(method).params(**out)  # errors name the bad field now, not inside a worker
    return out


def merge_candidate(method: str, base: StateDict, finetuned: Sequence[StateDict], hparams: Mapping[str, Any],
                    lams: Sequence[float]) -> dict[str, torch.Tensor]:
    """The merged state dict for one candidate (methods without cached components)."""
    return merge(method, base, finetuned, **candidate_hparams(method, hparams, lams))


# ---- PCB: the lam-independent part, computed once ------------------------------------------------


def pcb_components(base: StateDict, finetuned: Sequence[StateDict], **hparams: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{tensor name: (clipped task vectors, scale)}, each (n, numel), for every float tensor."""
    m = get_method("pcb")
    params = m.params(**hparams)
    check_compatible(signature_of(base), [signature_of(sd) for sd in finetuned])
    names = [k for k in sorted(base) if is_mergeable(base[k].dtype)]

    def group(name: str) -> TensorGroup:
        return TensorGroup(name, base[name].to(torch.float32),
                           torch.stack([sd[name].to(torch.float32) for sd in finetuned]))

    stats = global_stats(m, params, lambda: (group(k) for k in names))
    check_score_stats(stats)
    return {k: clipped_and_scale(group(k), params, stats) for k in names}


def save_pcb_components(components: Mapping[str, tuple[torch.Tensor, torch.Tensor]], path: str | Path,
                        variant: str) -> None:
    tensors = {}
    for name, (clipped, scale) in components.items():
        tensors[f"{name}{_SEP}clipped"] = clipped.contiguous()
        tensors[f"{name}{_SEP}scale"] = scale.contiguous()
    save_file(tensors, str(path), metadata={"format": "pt", "pcb_variant": variant})


def load_pcb_components(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    tensors = load_file(str(path))
    names = sorted({k.rsplit(_SEP, 1)[0] for k in tensors})
    return {k: (tensors[f"{k}{_SEP}clipped"], tensors[f"{k}{_SEP}scale"]) for k in names}


def merge_pcb_components(base: StateDict, components: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                         lams: Sequence[float], variant: str = "vision_es") -> dict[str, torch.Tensor]:
    """theta_0 + the scale-weighted mean of lam_i T_c,i; non-float tensors copied from the base."""
    if variant not in PCB_SEARCH_VARIANTS:
        raise ValueError(f"per-task lams need a vision variant {PCB_SEARCH_VARIANTS}, got {variant!r}")
    lams = [float(x) for x in lams]
    merged = {}
    for name in sorted(base):
        if name not in components:
            if is_mergeable(base[name].dtype):
                raise ValueError(f"the PCB components have no tensor {name!r}: they were computed for another model")
            merged[name] = base[name].clone()
            continue
        clipped, scale = components[name]
        out = weighted_mean(base[name].to(torch.float32), clipped, scale, lams, variant)
        merged[name] = out.to(base[name].dtype)
    return merged
