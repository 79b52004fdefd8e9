"""The one registry of merge methods. A method registers itself once, at import of its module."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mergeflow.methods.base import CpuKernel, FusedLastPass, Hyperparams, MergeMethod, StatPass

_REGISTRY: dict[str, MergeMethod] = {}


def register(
    name: str,
    *,
    hyperparams: type[Hyperparams],
    paper: str,
    summary: str,
    stat_passes: tuple[StatPass, ...] = (),
    min_models: int = 1,
    max_models: int | None = None,
    elementwise: bool | Callable[[Hyperparams], bool] = False,
    fused_last_pass: FusedLastPass | None = None,
    cpu_kernel: CpuKernel | None = None,
    task_vectors: bool = True,
    check_inputs: Callable[[Hyperparams, int, Sequence[str]], None] | None = None,
) -> Callable:
    """Decorator: register `fn(group, params, stats) -> Tensor` as merge method `name`."""

    def wrap(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} is registered twice")
        _REGISTRY[name] = MergeMethod(
            name=name,
            merge_tensor=fn,
            hyperparams=hyperparams,
            paper=paper,
            summary=summary,
            stat_passes=stat_passes,
            min_models=min_models,
            max_models=max_models,
            elementwise=elementwise,
            fused_last_pass=fused_last_pass,
            cpu_kernel=cpu_kernel,
            task_vectors=task_vectors,
            check_inputs=check_inputs,
        )
        return fn

    return wrap


def get_method(name: str) -> MergeMethod:
    _load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        from mergeflow.mudsc.registry import MODEL_METHODS

        if name in MODEL_METHODS:
            raise ValueError(
                f"{name!r} is a model-level method: it merges models with different initialisations "
                "from their graphs and activations, not from checkpoints of one base. Run it with "
                "`python -m flows.mudsc`, or call mergeflow.mudsc from Python") from None
        raise ValueError(
            f"unknown merge method {name!r}; available: {', '.join(sorted(_REGISTRY))} "
            "(`mergeflow methods` lists them with their hyperparameters)"
        ) from None


def all_methods() -> list[MergeMethod]:
    _load_builtin_methods()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def _load_builtin_methods() -> None:
    # Importing the package imports every method module, each of which registers itself.
    import mergeflow.methods  # noqa: F401
