"""Merge methods. Each module registers one method; importing this package registers them all."""

from mergeflow.methods import adamerging, average, dare, pcb, slerp, task_arithmetic, ties  # noqa: F401
from mergeflow.methods.base import (
    GlobalStats,
    Hyperparams,
    MergeMethod,
    Reduce,
    StatPass,
    TensorGroup,
)
from mergeflow.methods.registry import all_methods, get_method, register

__all__ = [
    "GlobalStats",
    "Hyperparams",
    "MergeMethod",
    "Reduce",
    "StatPass",
    "TensorGroup",
    "all_methods",
    "get_method",
    "register",
]
