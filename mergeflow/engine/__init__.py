"""The streaming merge engine: checkpoints of any size, exact global statistics, bounded memory.

    from mergeflow.engine import merge_checkpoints
    result = merge_checkpoints("ties", base_dir, [ft_dir_1, ft_dir_2], out_dir,
                               {"k": 0.2, "lam": 1.0}, device="cpu")

See `run.py` for the order of work, `stat_passes.py` and `selection.py` for the exact streaming
statistics, `units.py` for reading and scheduling units, `memory.py` for the malloc settings.
"""

# the NonFinite errors are shared with the in-memory merge
from mergeflow.compatibility import NonFiniteInput, NonFiniteOutput
from mergeflow.engine.plan import MergeConfigError, MergePlan, plan_merge
from mergeflow.engine.run import MergeResult, merge_checkpoints
from mergeflow.engine.stat_passes import compute_global_stats

__all__ = ["MergeConfigError", "MergePlan", "MergeResult", "NonFiniteInput", "NonFiniteOutput", "compute_global_stats",
           "merge_checkpoints", "plan_merge"]
