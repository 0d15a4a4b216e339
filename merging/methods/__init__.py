"""Merge methods, one file per method, registered by name with their parameters
(:mod:`merging.methods.registry`); shared tensor operations in :mod:`merging.methods.common`,
the task-arithmetic family's parameters in :mod:`merging.methods.family`."""

from .breadcrumbs import breadcrumbs, breadcrumbs_ties
from .common import (
    COMBINES,
    apply_lambda,
    della_magprune,
    drop_and_rescale,
    elect_sign,
    magnitude_outliers,
    trim_magnitude,
)
from .dare import dare_linear, dare_ties
from .della import della, della_linear
from .linear import linear
from .model_stock import model_stock
from .registry import (
    REQUIRED,
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
from .slerp import slerp
from .task_arithmetic import task_arithmetic
from .ties import ties, ties_process

__all__ = [
    "COMBINES", "REQUIRED", "MergeMethod", "Parameter", "apply_lambda", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della",
    "della_linear", "della_magprune", "drop_and_rescale", "elect_sign", "finite", "get_merge_method", "in_range", "is_bool",
    "linear", "magnitude_outliers", "merge_method_names", "model_stock", "one_of", "register_merge_method", "slerp",
    "task_arithmetic", "ties", "ties_process", "trim_magnitude",
]
