"""orbax-surgery: model surgery while an Orbax checkpoint is restored, shard by shard."""

from orbax_surgery.errors import (
    AmbiguousRuleError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    DestinationExistsError,
    DtypeMismatchError,
    LoraMismatchError,
    PeerTimeoutError,
    RuleError,
    ShapeMismatchError,
    SourceReadError,
    SurgeryError,
    UnfinalizedCheckpointError,
    UnmatchedKeyError,
    UnusedKeyError,
)
from orbax_surgery.export import Exported, save_safetensors
from orbax_surgery.handler import (
    SurgeryCheckpointHandler,
    SurgeryRestore,
    SurgerySave,
    plan_restore,
    restore,
)
from orbax_surgery.lora import (
    LoraCheckpointHandler,
    LoraLayout,
    LoraRestore,
    LoraSave,
    LoraSpec,
    LoraTarget,
    PeftAdapter,
    plan_lora_restore,
    read_lora_layout,
    read_peft_adapter,
    save_peft_adapter,
)
from orbax_surgery.materializer import apply_rules, materialize
from orbax_surgery.orbax_transforms import OrbaxTransforms
from orbax_surgery.plan import Plan, Step, resolve
from orbax_surgery.pytorch import FromPyTorch, ModuleLists, ToPyTorch, from_pytorch, to_pytorch
from orbax_surgery.rules import (
    Cast,
    Combine,
    Copy,
    Drop,
    Fallback,
    MapValue,
    Rename,
    Reshape,
    Slice,
    Transpose,
)
from orbax_surgery.safetensors import SafetensorsCheckpoint
from orbax_surgery.saving import layer_save_args
from orbax_surgery.sources import OrbaxCheckpoint, TreeSource
from orbax_surgery.stacking import Stack, Unstack

__version__ = '0.1.0'

__all__ = [
    'AmbiguousRuleError',
    'Cast',
    'CheckpointNotFoundError',
    'ChecksumMismatchError',
    'Combine',
    'Copy',
    'DestinationExistsError',
    'Drop',
    'DtypeMismatchError',
    'Exported',
    'Fallback',
    'FromPyTorch',
    'LoraCheckpointHandler',
    'LoraLayout',
    'LoraMismatchError',
    'LoraRestore',
    'LoraSave',
    'LoraSpec',
    'LoraTarget',
    'MapValue',
    'ModuleLists',
    'OrbaxCheckpoint',
    'OrbaxTransforms',
    'PeerTimeoutError',
    'PeftAdapter',
    'Plan',
    'Rename',
    'Reshape',
    'RuleError',
    'SafetensorsCheckpoint',
    'ShapeMismatchError',
    'Slice',
    'SourceReadError',
    'Stack',
    'Step',
    'SurgeryCheckpointHandler',
    'SurgeryError',
    'SurgeryRestore',
    'SurgerySave',
    'ToPyTorch',
    'Transpose',
    'TreeSource',
    'UnfinalizedCheckpointError',
    'Unstack',
    'UnmatchedKeyError',
    'UnusedKeyError',
    'apply_rules',
    'from_pytorch',
    'layer_save_args',
    'materialize',
    'plan_lora_restore',
    'plan_restore',
    'read_lora_layout',
    'read_peft_adapter',
    'resolve',
    'restore',
    'save_peft_adapter',
    'save_safetensors',
    'to_pytorch',
]
