"""MuDSC: merging models trained from different initialisations by matching their units.

    from mergeflow.mudsc import mudsc, zipit, weight_matching
    merged = mudsc([model_a, model_b], images, matcher="zip", alpha=0.5)
    merged.model(images)  # merged backbone + every model's own head, logits concatenated

Units (neurons, channels, heads) are put into correspondence per merge point of the model graph
(`graph.py`), with a similarity mixing weight space and activation space (`similarity.py`),
matched by ZipIt!'s greedy zip or Hungarian alignment (`matching.py`), refined iteratively
(`refine.py`), applied (`apply.py`), then BatchNorm statistics are re-estimated (`bn_reset.py`).
See ../../shared/reference/algorithms.md section 6. Pure PyTorch; no orchestration imports.
"""

_PUBLIC = ("MergeResult", "merge_models", "mudsc", "weight_matching", "zipit")
__all__ = list(_PUBLIC)  # noqa: F822 (resolved lazily: `mergeflow methods` stays fast)


def __getattr__(name: str):
    if name in _PUBLIC:
        from mergeflow.mudsc import merge

        return getattr(merge, name)
    raise AttributeError(f"module 'mergeflow.mudsc' has no attribute {name!r}")
