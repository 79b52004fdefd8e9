"""params.yaml: the experiment, validated (pydantic) before any work starts.

Every error names the field (`merge.lam`, `compare[1].method`) and says how to fix it.
Relative paths are resolved against the folder of the params file (the project root).

`merge` holds the method and its hyperparameters flat (`merge.method`, `merge.lam`, `merge.k`),
so that `dvc exp run -S merge.lam=0.5` works. Only the keys the chosen method declares are
passed to it; a key that no registered method declares is an error (a typo, not a setting).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS = "params.yaml"


class ParamsError(ValueError):
    """params.yaml (or a --set override) is invalid; the message lists every bad field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ZooParams(_Section):
    dir: str = Field("outputs/zoo", description="where the built zoo is published (a DVC out)")
    spec: dict[str, Any] = Field(default_factory=dict,
                                 description="ZooSpec fields; {} is the embedded default zoo")

    @field_validator("spec")
    @classmethod
    def _spec_is_valid(cls, spec: dict[str, Any]) -> dict[str, Any]:
        from mergeflow.zoo import ZooSpec

        try:
            ZooSpec(**spec)
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"[{field}] {first['msg']} (see mergeflow.zoo.ZooSpec for the fields)") from None
        return spec

    def zoo_spec(self) -> dict[str, Any]:
        """The full spec with defaults filled in: what the zoo's cache key covers."""
        from mergeflow.zoo import ZooSpec

        return ZooSpec(**self.spec).to_json()


LABEL_MAX_HPARAMS = 5  # a label lists at most this many defaults


def _json(value: Any) -> Any:
    """A default as model_dump(mode="json") gives it (tuples become lists)."""
    return list(value) if isinstance(value, tuple) else value


class SearchSettings(_Section):
    """`search:` in a merge entry: tune one lam per task by PCB's evolutionary search on the
    VALIDATION split, then merge with the best (flows/coefficient_search.py). For methods whose
    `lam` may be a per-task list: pcb (variant vision or vision_es), task_arithmetic, ties."""

    budget: int = Field(100, gt=0, description="candidates evaluated (official: 100)")
    lower: float = Field(0.8, description="lower bound of every lam (official: 0.8)")
    upper: float = Field(1.3, description="upper bound of every lam (official: 1.3)")
    init: float = Field(1.0, description="starting lam of every task (official: 1.0)")
    workers: int = Field(2, gt=0, description="candidates evaluated in parallel")
    seed: int = Field(0, description="the optimiser's seed: same seed, same candidates")
    limit: int | None = Field(None, gt=0, description="validation examples per task per candidate; "
                                                      "null = evaluation.limit")

    @model_validator(mode="after")
    def _bounds(self) -> SearchSettings:
        if not self.lower < self.upper:
            raise ValueError(f"[upper] must be above lower ({self.lower}), got {self.upper}")
        if not self.lower <= self.init <= self.upper:
            raise ValueError(f"[init] {self.init} is outside [lower, upper] = [{self.lower}, {self.upper}]")
        return self

    def label(self) -> str:
        """`search(budget=100)`, plus every setting that differs from its default."""
        shown = {k: v for k, v in self.model_dump().items()
                 if k == "budget" or v != type(self).model_fields[k].default}
        return f"search({','.join(f'{k}={v}' for k, v in shown.items())})"


class MethodChoice(BaseModel):
    """A merge method plus its hyperparameters, flat: {method: ties, k: 0.2, lam: 1.0}.

    `search` (optional) replaces `lam` by a per-task list chosen by a coefficient search."""

    model_config = ConfigDict(extra="allow")
    method: str
    search: SearchSettings | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_lam_is_left_to_the_search(cls, data: Any) -> Any:
        """`lam: null` next to a `search:` block means "the search chooses it", so a params.yaml
        with a lam switches to a search from the command line (-S merge.lam=null -S
        merge.search.budget=6)."""
        if isinstance(data, dict) and data.get("search") is not None and "lam" in data and data["lam"] is None:
            data = {k: v for k, v in data.items() if k != "lam"}
        return data

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        from mergeflow.methods import get_method

        get_method(name)  # its error lists the available methods
        return name

    @model_validator(mode="after")
    def _known_hyperparams(self) -> MethodChoice:
        from mergeflow.methods import all_methods
        from mergeflow.methods.base import closest_key

        known = sorted({f for m in all_methods() for f in m.hyperparams.model_fields})
        for key in self.model_extra or {}:
            if key not in known:
                close = closest_key(key, known)
                raise ValueError(
                    f"[{key}] unknown hyperparameter{f' (did you mean {close}?)' if close else ''}; "
                    f"hyperparameters of the registered methods: {', '.join(known)} (`mergeflow "
                    "methods` lists them per method)")
        self.hparams()  # validate the chosen method's own values now, not at merge time
        if self.search is not None:
            self._check_searchable()
        return self

    def _check_searchable(self) -> None:
        from mergeflow.coefficient_search import SEARCHABLE, candidate_hparams

        if self.method not in SEARCHABLE:
            raise ValueError(f"[search] {self.method!r} has no per-task lam to search; methods with "
                             f"a search: {', '.join(SEARCHABLE)} (or remove `search`)")
        if "lam" in (self.model_extra or {}):
            raise ValueError("[lam] is set together with `search`, which chooses it; remove one of them "
                             "(or set it to null)")
        try:
            candidate_hparams(self.method, self.hparams(), [self.search.init])
        except ValueError as e:
            raise ValueError(f"[variant] {e}" if self.method == "pcb" else f"[search] {e}") from None

    def hparams(self) -> dict[str, Any]:
        """The validated hyperparameters of `method`, with its defaults filled in."""
        from mergeflow.methods import get_method

        m = get_method(self.method)
        own = {k: v for k, v in (self.model_extra or {}).items() if k in m.hyperparams.model_fields}
        try:
            hp = m.params(**own).model_dump(mode="json")
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            where = f"[{field}] " if field else ""  # joined onto the section's location by _format_errors
            raise ValueError(
                f"{where}{first['msg'].removeprefix('Value error, ')} (method {self.method!r}; "
                "`mergeflow methods` lists valid values)") from None
        if self.search is not None:
            hp.pop("lam", None)  # the search supplies it (flows/preparation.py)
        return hp

    @property
    def label(self) -> str:
        """A short, stable name for tables and MLflow runs: `ties(k=0.2,lam=1.0)`.

        Methods with many hyperparameters (AdaMerging has twenty) show only those set in
        params.yaml or differing from the default; the full set is logged as the run's params.
        """
        from mergeflow.methods import get_method

        hp, given = self.hparams(), self.model_extra or {}
        if len(hp) > LABEL_MAX_HPARAMS:
            fields = get_method(self.method).hyperparams.model_fields
            hp = {k: v for k, v in hp.items() if k in given or v != _json(fields[k].default)}
        shown = {k: v for k, v in sorted(hp.items()) if v is not None or k in given}  # an unset option says nothing
        label = self.method + (f"({','.join(f'{k}={v}' for k, v in shown.items())})" if shown else "")
        return label + (f"+{self.search.label()}" if self.search is not None else "")


class EvaluationParams(_Section):
    split: Literal["val", "test"] = "test"
    batch_size: int = Field(512, gt=0)
    tasks: list[str] | None = Field(None, description="subset of the zoo's tasks; null = all")
    limit: int | None = Field(None, gt=0, description="first N examples per split (quick runs)")


class TrackingParams(_Section):
    uri: str | None = Field(None, description="MLflow tracking URI; null = sqlite:///<project>/mlflow.db "
                                              "(env MLFLOW_TRACKING_URI overrides)")
    artifact_root: str | None = Field(None, description="artifact folder; null = <project>/mlartifacts")
    experiment: str = "mergeflow"
    enabled: bool = True


class OutputParams(_Section):
    merged: str = "outputs/merged"
    metrics: str = "outputs/metrics.json"
    per_task: str = "outputs/per_task.csv"
    report: str = "outputs/report.json"


class SweepParams(_Section):
    """Grid per method: {method: {hyperparameter: [values]}}; chosen on the validation split."""

    grid: dict[str, dict[str, list[Any]]] = Field(default_factory=dict)
    workers: int = Field(2, gt=0, description="merges evaluated in parallel")

    @field_validator("grid")
    @classmethod
    def _grid_is_valid(cls, grid: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        for method, axes in grid.items():
            for key, values in axes.items():
                if not values:
                    raise ValueError(f"{method}.{key}: empty list of values; give at least one")
            for point in expand_grid(method, axes):
                MethodChoice(**point)
        return grid


class Params(_Section):
    zoo: ZooParams = Field(default_factory=ZooParams)
    merge: MethodChoice = Field(default_factory=lambda: MethodChoice(method="task_arithmetic"))
    compare: list[MethodChoice] = Field(default_factory=lambda: [
        MethodChoice(method="average"), MethodChoice(method="task_arithmetic")])
    evaluation: EvaluationParams = Field(default_factory=EvaluationParams)
    device: Literal["cpu", "cuda", "auto"] = "auto"
    tracking: TrackingParams = Field(default_factory=TrackingParams)
    outputs: OutputParams = Field(default_factory=OutputParams)
    artifacts: str = Field(".artifacts", description="content-addressed artifact store (scratch)")
    sweep: SweepParams = Field(default_factory=SweepParams)

    # Not a field of the file: the folder relative paths are resolved against.
    project: str = Field("", exclude=True)

    @model_validator(mode="after")
    def _methods_take_the_zoo_experts(self) -> Params:
        """Every merge takes all the zoo's experts: a method for another number of models (slerp
        takes 2) is refused here, not after the zoo is built."""
        from mergeflow.methods import get_method
        from mergeflow.zoo import ZooSpec

        tasks = ZooSpec(**self.zoo.spec).tasks
        n = len(tasks)
        for where, choice in [("merge", self.merge), *((f"compare[{i}]", c) for i, c in enumerate(self.compare))]:
            m = get_method(choice.method)
            if not m.takes(n):
                raise ValueError(f"[{where}.method] {choice.method!r} merges {m.models_wanted} fine-tuned model(s), but every "
                                 f"merge takes the zoo's {n} experts ({', '.join(tasks)}); choose another method, "
                                 "or set zoo.spec.tasks")
        return self

    def path(self, p: str) -> Path:
        """`p` resolved against the project folder."""
        path = Path(os.path.expanduser(p))
        return path if path.is_absolute() else Path(self.project) / path

    def methods(self) -> list[MethodChoice]:
        """The primary merge first, then the compared ones, without duplicates."""
        out: list[MethodChoice] = []
        for choice in [self.merge, *self.compare]:
            if all((c.method, c.hparams(), c.search) != (choice.method, choice.hparams(), choice.search)
                   for c in out):
                out.append(choice)
        return out

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def tracking_uri(self) -> str:
        return (os.environ.get("MLFLOW_TRACKING_URI") or self.tracking.uri
                or f"sqlite:///{self.path('mlflow.db').resolve()}")

    def artifact_root(self) -> Path:
        return self.path(self.tracking.artifact_root or "mlartifacts").resolve()


def expand_grid(method: str, axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the axes, as {method, hparam: value} dicts, in a stable order."""
    points: list[dict[str, Any]] = [{"method": method}]
    for key in sorted(axes):
        points = [{**p, key: v} for p in points for v in axes[key]]
    return points


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read, override (`key.sub=value`, values parsed as YAML) and validate a params file."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {str(path)!r} not found; pass the path of a params.yaml "
                          "(the project's default is ./params.yaml)")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections (zoo, merge, ...), got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return validate_params(raw, project=path.resolve().parent, source=str(path))


def validate_params(raw: dict[str, Any], *, project: str | Path = ".", source: str = "params") -> Params:
    try:
        params = Params(**raw)
    except ValidationError as e:
        raise ParamsError(_format_errors(e, source)) from None
    params.project = str(Path(project).resolve())
    return params


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply `a.b.c=value` to nested dicts (the CLI's --set, like `dvc exp run -S`)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ParamsError(f"--set {item!r}: expected KEY=VALUE, e.g. --set merge.method=ties")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ParamsError(f"--set {item!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(value)


_FIXES = {
    "extra_forbidden": "remove it or check its spelling",
    "literal_error": "use one of the listed values",
    "missing": "add it",
}


def _format_errors(e: ValidationError, source: str) -> str:
    lines = [f"{source}: {e.error_count()} invalid setting(s):"]
    for err in e.errors():
        loc = _dotted(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if m := re.match(r"\[([\w.\[\]]+)\] ", msg):  # a field named inside a section's check
            loc, msg = (m.group(1) if not err["loc"] else f"{loc}.{m.group(1)}"), msg[m.end():]
        fix = _FIXES.get(err["type"], "")
        lines.append(f"  {loc}: {msg}" + (f" ({fix})" if fix else ""))
    return "\n".join(lines)


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"
