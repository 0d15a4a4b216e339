"""finetune part of modular-llm (see DESIGN.md)."""

from finetune.aux_loss import MoEAuxLossCallback
from finetune.comm import CommStats, Communicator, close_process_group, local_gradients_hook, skip_host_allreduce
from finetune.deepspeed_configs import deepspeed_config, deepspeed_config_path
from finetune.lisa import LisaCallback
from finetune.onebit_adam import OneBitAdam, SkipHostAllReduceCallback

__all__: list[str] = [
    "CommStats", "Communicator", "close_process_group", "LisaCallback", "deepspeed_config", "deepspeed_config_path", "MoEAuxLossCallback", "OneBitAdam", "SkipHostAllReduceCallback", "local_gradients_hook", "skip_host_allreduce",
]
