"""Hugging Face formats: safetensors export, PyTorch naming and layouts, PEFT adapters.

Imports every lower stage (`lora` included); only `cli` imports it.
"""

from orbax_surgery.huggingface.export import Exported, save_safetensors
from orbax_surgery.huggingface.load import load
from orbax_surgery.huggingface.peft_adapter import PeftAdapter, read_peft_adapter
from orbax_surgery.huggingface.peft_save import save_peft_adapter
from orbax_surgery.huggingface.presets import Preset, preset
from orbax_surgery.huggingface.pytorch_rules import (
    FromPyTorch,
    ModuleLists,
    ToPyTorch,
    from_pytorch,
    to_pytorch,
)
from orbax_surgery.sources.safetensors import SafetensorsCheckpoint

__all__ = [
    'Exported',
    'FromPyTorch',
    'ModuleLists',
    'PeftAdapter',
    'Preset',
    'SafetensorsCheckpoint',
    'ToPyTorch',
    'from_pytorch',
    'load',
    'preset',
    'read_peft_adapter',
    'save_peft_adapter',
    'save_safetensors',
    'to_pytorch',
]
