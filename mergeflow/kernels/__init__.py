"""Fused CPU kernels for the streaming engine's hot loops, compiled with numba.

torch's CPU ops each make a full pass over memory with a float32 temporary, so a TIES merge of
3 bf16 fine-tunes spends ~15 passes per entry. These kernels read the stored bf16 or float32
values once per row, keep their scratch in float32 and write the stored dtype directly. Each
does exactly the float32 operations of the method's torch code in the same order, so the
engine's output is bitwise the same with or without them (tests/test_kernels.py); the torch
code stays the reference and serves every other case (CUDA, float16, mixed precisions).

numba is imported only here, lazily: `mergeflow --help` and `import mergeflow` do not pay for
it. Its import and first kernel call cost ~0.6 s per process, and compiling every kernel takes
a few seconds on a machine's first merge (the code is then cached next to these files), so the
engine calls `prepare` at its start: that work runs on a background thread and, until it is
done, `ready` is False and the engine runs the torch code, which gives the same bytes.
"""

from __future__ import annotations

import atexit
import importlib.abc
import sys
import threading

import numpy as np
import torch

STORAGE_DTYPES = (torch.bfloat16, torch.float32)


_prepared: dict[tuple[torch.dtype, torch.dtype], threading.Event] = {}
_prepared_lock = threading.Lock()
_loaders: list[threading.Thread] = []
EXIT_WAIT_SECONDS = 120  # at most, for a load still running when the process exits


def prepare(pairs: set[tuple[torch.dtype, torch.dtype]]) -> None:
    """Load or compile, on a background thread, the kernels for these (stored, output) dtypes."""
    with _prepared_lock:
        todo = [p for p in pairs if p not in _prepared and set(p) <= set(STORAGE_DTYPES)]
        for p in todo:
            _prepared[p] = threading.Event()
        if not todo:
            return
        loader = threading.Thread(target=_warm_up, args=(todo,), name="mergeflow-kernels", daemon=True)
        if not _loaders:
            atexit.register(_wait_for_loaders)
        _loaders.append(loader)
    loader.start()


def _wait_for_loaders() -> None:
    """At exit, let a kernel load still running finish first. A merge of small models ends before
    numba has loaded (~0.6 s), and a daemon thread left inside LLVM while the interpreter shuts
    down can abort the process after the merge was written ("terminate called without an active
    exception", exit 134: 1 run in 40 of a small merge under load)."""
    for loader in _loaders:
        loader.join(EXIT_WAIT_SECONDS)


def ready(stored: torch.dtype, output: torch.dtype) -> bool:
    """Whether the kernels for these dtypes are loaded (see `prepare`)."""
    event = _prepared.get((stored, output))
    return event is not None and event.is_set()


def wait_ready(stored: torch.dtype, output: torch.dtype, timeout: float | None = None) -> bool:
    """Block until `prepare`'s work for these dtypes is done (tests, benchmarks)."""
    event = _prepared.get((stored, output))
    return event is not None and event.wait(timeout)


class _NoScipyInThisThread(importlib.abc.MetaPathFinder):
    """Makes `import scipy` fail in one thread, while the kernels load.

    numba's first kernel call imports numba.np.arraymath, which imports scipy.linalg only to
    learn whether np.correlate / np.convolve may call BLAS (numba falls back to a plain loop
    without it). That import took 0.25 s of the 0.5 s first call here, holding the GIL while the
    merge had started. The kernels call neither function. Other threads import scipy as usual,
    and so does this process later: numba's np.dot and linalg import it when they are compiled.
    """

    def __init__(self) -> None:
        self.thread = threading.current_thread()

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if threading.current_thread() is self.thread and name.split(".")[0] == "scipy":
            raise ModuleNotFoundError(f"no scipy while mergeflow's kernels load ({name})", name=name)
        return None

    def __enter__(self) -> _NoScipyInThisThread:
        if "scipy" not in sys.modules:  # else the import costs nothing: leave it alone
            sys.meta_path.insert(0, self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def _warm_up(pairs: list[tuple[torch.dtype, torch.dtype]]) -> None:
    try:
        with _NoScipyInThisThread():
            _load(pairs)
    except Exception as e:  # the torch code serves every unit instead: slower, same bytes
        print(f"mergeflow: note: the fused CPU kernels are unavailable ({type(e).__name__}: {e}); "
              "merging with the torch code", file=sys.stderr)
        return
    for pair in pairs:  # only now: the scipy guard has left sys.meta_path
        _prepared[pair].set()


def _load(pairs: list[tuple[torch.dtype, torch.dtype]]) -> None:
    from mergeflow.kernels import dare, pcb, rows, task_arithmetic, ties, window

    for stored, output in pairs:  # each call compiles (or loads) one specialisation
        raw, out = torch.zeros((3, 8), dtype=stored), torch.empty(8, dtype=output)
        task_arithmetic.merge(raw, out, 1.0)
        task_arithmetic.merge(raw, out, [1.0, 1.0])
        ties.merge(raw, out, torch.zeros(2), 1.0, "mean")
        ties.dare_ties_merge(raw, out, np.zeros(2, dtype=np.uint64), 0, 0, 0.5, 1.0, "mean")
        dare.merge(raw, out, np.zeros(2, dtype=np.uint64), 0, 0, 0.5, 1.0)
        rows.count_nonfinite(storage_array(raw))
        window.abs_delta_windows(raw, [(torch.zeros(2), torch.ones(2))])
        pcb.score_arguments(raw, torch.zeros(2), torch.ones(2), 1.0)
        pcb.ScoreWindow(2, 8, torch.zeros(2), torch.ones(2)).add(torch.ones(2, 8), torch.ones(2, 8), 0)
        pcb.merge_nlp(raw, out, torch.arange(8), (torch.zeros(2), torch.ones(2)) * 2, 1.0, torch.tanh_, 1.0)


def storage_array(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor's stored values: bf16 as its uint16 bits, float32 as is."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.float32:
        return t.numpy()
    raise TypeError(f"the fused kernels take bfloat16 or float32 values, not {t.dtype}")


def row_floats(values: torch.Tensor, rows: int) -> np.ndarray:
    """One float32 per row as a contiguous numpy array, for a kernel: a per-task bound (rows,), or
    one value for every row (a window's (1,) ends)."""
    return np.ascontiguousarray(np.broadcast_to(values.to(torch.float32).reshape(-1).numpy(), (rows,)))


def count_nonfinite(t: torch.Tensor) -> int:
    """How many values of the CPU tensor `t` (bfloat16 or float32) are NaN or infinite."""
    from mergeflow.kernels.rows import count_nonfinite as count_rows

    flat = storage_array(t.contiguous().reshape(-1))
    step = 1 << 30  # count_rows keeps an int32 count per row
    return sum(int(count_rows(flat[i:i + step].reshape(1, -1))) for i in range(0, flat.size, step))


_scratch = threading.local()


def thread_scratch(name: str, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    """A reusable buffer of this shape, one per thread and name: the kernels' scratch and outputs
    are a unit's size, and taking them fresh for every unit costs page faults."""
    size = int(np.prod(shape))
    buffer = getattr(_scratch, name, None)
    if buffer is None or buffer.size < size or buffer.dtype != dtype:
        buffer = np.empty(size, dtype=dtype)
        setattr(_scratch, name, buffer)
    return buffer[:size].reshape(shape)
