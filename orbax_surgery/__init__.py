"""orbax-surgery: model surgery while an Orbax checkpoint is restored, shard by shard."""

# The API is imported on first use of any of its names (PEP 562), all of it at once, so the
# command line's `--help` and start-up message come before JAX loads. Orbax learns the
# handlers then, before any args can be passed; and at once where Orbax is already imported,
# so that `CheckpointManager.restore(step)` without args finds them by typestr.
from __future__ import annotations

import ast
import functools
import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # The public API, and where each name lives; `_import_api` reads this block.
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


def __getattr__(name: str) -> Any:
    """A public name (or subpackage), importing the whole API the first time."""
    if name.startswith('__'):  # Probes by tools (doctest's `__test__`, ...), not the API.
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    _import_api()
    if name not in globals():
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    return globals()[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


@functools.cache
def _import_api() -> None:
    """Runs the `TYPE_CHECKING` block's imports: the API's names join this module's."""
    tree = ast.parse(Path(__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If))
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.module, ast.dump(node)
        module = importlib.import_module(node.module)
        globals().update({a.name: getattr(module, a.name) for a in node.names})


if 'orbax.checkpoint' in sys.modules:  # Nothing to save: JAX and Orbax are loaded already.
    _import_api()
