"""merging: task vectors, TIES / DARE / task arithmetic, AdaMerging, streamed tensor by tensor.

>>> from merging import TaskVector, merge
>>> tvs = [TaskVector.from_models("base/", f"ft{i}/") for i in range(3)]
>>> merge("ties", "base/", tvs, density=0.2, out="merged/")
"""

from .adamerging import AdaMergingConfig, AdaMergingResult, EntropyTask, adamerge, entropy
from .config import MergeConfig, load_merge_config
from .merge import merge, write_model_card
from .methods import (
    MERGE_METHODS,
    dare_linear,
    dare_ties,
    drop_and_rescale,
    elect_sign,
    register_merge_method,
    task_arithmetic,
    ties,
    ties_process,
    trim_magnitude,
)
from .streaming import CheckpointSource, DictSource, ShardedWriter
from .task_vector import TaskVector, ties_processed

__all__ = [
    "MERGE_METHODS",
    "AdaMergingConfig",
    "AdaMergingResult",
    "CheckpointSource",
    "DictSource",
    "EntropyTask",
    "MergeConfig",
    "ShardedWriter",
    "TaskVector",
    "adamerge",
    "dare_linear",
    "dare_ties",
    "drop_and_rescale",
    "elect_sign",
    "entropy",
    "load_merge_config",
    "merge",
    "register_merge_method",
    "task_arithmetic",
    "ties",
    "ties_process",
    "ties_processed",
    "trim_magnitude",
    "write_model_card",
]
