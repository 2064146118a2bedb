"""LoRA: save only what trains, restore onto a frozen base, merge per shard."""

from orbax_surgery.lora.adapter import Adapter
from orbax_surgery.lora.handler import (
    LoraCheckpointHandler,
    LoraRestore,
    LoraSave,
    plan_lora_restore,
    read_lora_layout,
)
from orbax_surgery.lora.layout import LoraLayout
from orbax_surgery.lora.merge import LowRankUpdate, MergeAdapters
from orbax_surgery.lora.spec import LoraSpec, LoraTarget
from orbax_surgery.lora.v1_handler import LoraCheckpointableHandler

__all__ = [
    'Adapter',
    'LoraCheckpointHandler',
    'LoraCheckpointableHandler',
    'LoraLayout',
    'LoraRestore',
    'LoraSave',
    'LoraSpec',
    'LoraTarget',
    'LowRankUpdate',
    'MergeAdapters',
    'plan_lora_restore',
    'read_lora_layout',
]
