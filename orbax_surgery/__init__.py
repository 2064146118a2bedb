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
from orbax_surgery.huggingface import (
    Exported,
    FromPyTorch,
    ModuleLists,
    PeftAdapter,
    ToPyTorch,
    from_pytorch,
    read_peft_adapter,
    save_peft_adapter,
    save_safetensors,
    to_pytorch,
)
from orbax_surgery.lora import (
    LoraCheckpointableHandler,
    LoraCheckpointHandler,
    LoraLayout,
    LoraRestore,
    LoraSave,
    LoraSpec,
    LoraTarget,
    plan_lora_restore,
    read_lora_layout,
)
from orbax_surgery.orbax.surgery_handler import (
    SurgeryCheckpointHandler,
    SurgeryRestore,
    SurgerySave,
)
from orbax_surgery.orbax.v1_handler import SurgeryCheckpointableHandler
from orbax_surgery.plan.plan import Plan, Step
from orbax_surgery.plan.resolve import resolve
from orbax_surgery.read.materialize import apply_rules, materialize
from orbax_surgery.read.restore import plan_restore, restore
from orbax_surgery.rules.fused import Concatenate, Split
from orbax_surgery.rules.layers import Stack, Unstack
from orbax_surgery.rules.moves import Copy, Drop, Fallback, Rename
from orbax_surgery.rules.orbax_transforms import OrbaxTransforms
from orbax_surgery.rules.scopes import Unsuffixed
from orbax_surgery.rules.values import Cast, Combine, MapValue, Reshape, Slice, Transpose
from orbax_surgery.sources.orbax_checkpoint import OrbaxCheckpoint
from orbax_surgery.sources.pytorch_checkpoint import PyTorchCheckpoint
from orbax_surgery.sources.safetensors import SafetensorsCheckpoint
from orbax_surgery.sources.tree import TreeSource
from orbax_surgery.write.surgery_save import layer_save_args

__version__ = '0.1.0'

__all__ = [
    'AmbiguousRuleError',
    'Cast',
    'CheckpointNotFoundError',
    'ChecksumMismatchError',
    'Combine',
    'Concatenate',
    'Copy',
    'DestinationExistsError',
    'Drop',
    'DtypeMismatchError',
    'Exported',
    'Fallback',
    'FromPyTorch',
    'LoraCheckpointHandler',
    'LoraCheckpointableHandler',
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
    'PyTorchCheckpoint',
    'Rename',
    'Reshape',
    'RuleError',
    'SafetensorsCheckpoint',
    'ShapeMismatchError',
    'Slice',
    'SourceReadError',
    'Split',
    'Stack',
    'Step',
    'SurgeryCheckpointHandler',
    'SurgeryCheckpointableHandler',
    'SurgeryError',
    'SurgeryRestore',
    'SurgerySave',
    'ToPyTorch',
    'Transpose',
    'TreeSource',
    'UnfinalizedCheckpointError',
    'Unstack',
    'UnmatchedKeyError',
    'Unsuffixed',
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
