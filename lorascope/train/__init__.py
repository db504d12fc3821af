"""A compact LoRA training core (Hu et al. 2021), in the spirit of loralib.

The public surface::

    LoRALinear, MergedLoRALinear            # the layers (nn.Linear / GPT-2 Conv1D, fused qkv)
    inject, mark_only_lora_as_trainable     # put LoRA into a model by module name; freeze the rest
    lora_state_dict, merge, unmerge         # the factors; fold ΔW into W and back
    save_adapter, load_adapter              # PEFT-format adapters on disk
    TrainConfig, load_config, train         # the training loop (DDP under torchrun)
    load_classifier                         # all-MiniLM-L6-v2 + a classifier head
"""

from lorascope.train.config import ConfigError, TrainConfig, load_config
from lorascope.train.inject import (
    count_parameters,
    inject,
    lora_layers,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge,
    unmerge,
)
from lorascope.train.layers import LoRALinear, MergedLoRALinear, lora_scale
from lorascope.train.model import BertConfig, BertEncoder, TextClassifier, load_classifier
from lorascope.train.save import adapter_tensors, load_adapter, save_adapter
from lorascope.train.trainer import evaluate, train

__all__ = [
    "LoRALinear",
    "MergedLoRALinear",
    "lora_scale",
    "inject",
    "lora_layers",
    "mark_only_lora_as_trainable",
    "lora_state_dict",
    "merge",
    "unmerge",
    "count_parameters",
    "save_adapter",
    "load_adapter",
    "adapter_tensors",
    "TrainConfig",
    "ConfigError",
    "load_config",
    "train",
    "evaluate",
    "BertConfig",
    "BertEncoder",
    "TextClassifier",
    "load_classifier",
]
