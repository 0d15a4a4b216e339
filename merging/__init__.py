"""merging: task vectors, merge methods (task arithmetic, TIES, DARE...), AdaMerging, streamed
tensor by tensor.

>>> from merging import TaskVector, merge
>>> tvs = [TaskVector.from_models("base/", f"ft{i}/") for i in range(3)]
>>> merge("ties", "base/", tvs, density=0.2, out="merged/")
"""

from .adamerging import AdaMergingConfig, AdaMergingResult, EntropyTask, adamerge, adamerge_folders, entropy
from .config import MergeConfig, load_merge_config
from .engine import merge
from .methods import (
    Parameter,
    dare_linear,
    dare_ties,
    drop_and_rescale,
    elect_sign,
    merge_method_names,
    register_merge_method,
    task_arithmetic,
    ties,
    ties_process,
    trim_magnitude,
)
from .run import run_merge
from .sources import DictSource
from .task_vector import TaskVector, ties_processed

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
    "dare_linear",
    "dare_ties",
    "drop_and_rescale",
    "elect_sign",
    "entropy",
    "load_merge_config",
    "merge",
    "merge_method_names",
    "register_merge_method",
    "run_merge",
    "task_arithmetic",
    "ties",
    "ties_process",
    "ties_processed",
    "trim_magnitude",
]
