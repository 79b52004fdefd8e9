"""`mergeflow methods`: every registered method with its hyperparameters, defaults and paper."""

from __future__ import annotations

from mergeflow.methods.registry import all_methods


def describe() -> str:
    lines = []
    for m in all_methods():
        lines.append(f"{m.name}: {m.summary}")
        lines.append(f"    paper: {m.paper}")
        for name, field in m.hyperparams.model_fields.items():
            default = "required" if field.is_required() else f"default {field.default!r}"
            doc = f"  {field.description}" if field.description else ""
            lines.append(f"    {name} ({default}){doc}")
    from mergeflow.mudsc.registry import MODEL_METHODS  # model-level: need the graph and data

    lines.append("\nmodel-level methods (models from different initialisations; python -m flows.mudsc):")
    for m in MODEL_METHODS.values():
        lines.append(f"{m.name}: {m.summary}")
        lines.append(f"    paper: {m.paper}")
        for name, field in m.hyperparams.model_fields.items():
            doc = f"  {field.description}" if field.description else ""
            lines.append(f"    {name} (default {field.default!r}){doc}")
    return "\n".join(lines)


def main(args=None) -> int:
    print(describe())
    return 0
