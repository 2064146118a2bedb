"""LoRA: save only what trains, restore onto a frozen base, merge per shard."""

from orbax_surgery.lora.checkpoint import (
    LoraCheckpointHandler,
    LoraRestore,
    LoraSave,
    plan_lora_restore,
    read_lora_layout,
)
from orbax_surgery.lora.layout import Adapter, LoraLayout
from orbax_surgery.lora.merge import LowRankUpdate, MergeAdapters
from orbax_surgery.lora.peft import PeftAdapter, read_peft_adapter
from orbax_surgery.lora.peft_save import save_peft_adapter
from orbax_surgery.lora.spec import LoraSpec, LoraTarget

__all__ = [
    'Adapter',
    'LoraCheckpointHandler',
    'LoraLayout',
    'LoraRestore',
    'LoraSave',
    'LoraSpec',
    'LoraTarget',
    'LowRankUpdate',
    'MergeAdapters',
    'PeftAdapter',
    'plan_lora_restore',
    'read_lora_layout',
    'read_peft_adapter',
    'save_peft_adapter',
]
