"""finetune part of modular-llm: the LISA callback, 1-bit Adam with its compressed all-reduce, the
AdaMoE aux-loss callback, packaged DeepSpeed configs and launcher helpers (``docs/methods.md``)."""

from .aux_loss import MoEAuxLossCallback
from .comm import CommStats, Communicator, local_gradients_hook, skip_host_allreduce
from .deepspeed_configs import deepspeed_config, deepspeed_config_path
from .launch import close_process_group, cpu_deepspeed_state, free_port
from .lisa import LisaCallback, LisaConfig
from .onebit_adam import OneBitAdam, SkipHostAllReduceCallback

__all__: list[str] = [
    "CommStats", "Communicator", "LisaCallback", "LisaConfig", "MoEAuxLossCallback", "OneBitAdam",
    "SkipHostAllReduceCallback", "close_process_group", "cpu_deepspeed_state", "deepspeed_config", "deepspeed_config_path",
    "free_port", "local_gradients_hook", "skip_host_allreduce",
]
