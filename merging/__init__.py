"""merging: task vectors, merge methods (task arithmetic, TIES, DARE, Breadcrumbs, DELLA, linear,
SLERP, Model Stock), AdaMerging, streamed tensor by tensor; ``modular merge`` reads mergekit's YAML.

>>> from merging import TaskVector, merge
>>> tvs = [TaskVector.from_models("base/", f"ft{i}/") for i in range(3)]
>>> merge("ties", "base/", tvs, density=0.2, out="merged/")
"""

from .adamerging import AdaMergingConfig, AdaMergingResult, EntropyTask, adamerge, adamerge_folders, entropy
from .config import MergeConfig, load_merge_config
from .engine import merge
from .methods import (
    Parameter,
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    drop_and_rescale,
    elect_sign,
    linear,
    merge_method_names,
    model_stock,
    register_merge_method,
    slerp,
    task_arithmetic,
    ties,
    ties_process,
    trim_magnitude,
)
from .run import run_merge
from .sources import DictSource
from .task_vector import TaskVector, is_task_vector, open_model, ties_processed

__all__ = [
    "AdaMergingConfig",
    "AdaMergingResult",
    "DictSource",
    "EntropyTask",
    "MergeConfig",
    "Parameter",
    "TaskVector",
    "adamerge",
    "adamerge_folders",
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "drop_and_rescale",
    "elect_sign",
    "entropy",
    "is_task_vector",
    "linear",
    "load_merge_config",
    "merge",
    "merge_method_names",
    "model_stock",
    "open_model",
    "register_merge_method",
    "run_merge",
    "slerp",
    "task_arithmetic",
    "ties",
    "ties_process",
    "ties_processed",
    "trim_magnitude",
]
