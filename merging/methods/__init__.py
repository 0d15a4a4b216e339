"""Merge methods, one file per method, registered by name with their parameters
(:mod:`merging.methods.registry`); shared tensor operations in :mod:`merging.methods.common`."""

from .common import COMBINES, drop_and_rescale, elect_sign, trim_magnitude
from .dare import dare_linear, dare_ties
from .registry import (
    MergeMethod,
    Parameter,
    finite,
    get_merge_method,
    in_range,
    is_bool,
    merge_method_names,
    one_of,
    register_merge_method,
)
from .task_arithmetic import task_arithmetic
from .ties import ties, ties_process

__all__ = [
    "COMBINES", "MergeMethod", "Parameter", "dare_linear", "dare_ties", "drop_and_rescale", "elect_sign", "finite",
    "get_merge_method", "in_range", "is_bool", "merge_method_names", "one_of", "register_merge_method",
    "task_arithmetic", "ties", "ties_process", "trim_magnitude",
]
