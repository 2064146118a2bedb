"""Opening the source a path names: an Orbax item, Hugging Face safetensors or PyTorch files."""

from __future__ import annotations

from etils import epath

from orbax_surgery import locations
from orbax_surgery.sources.orbax_checkpoint import OrbaxCheckpoint
from orbax_surgery.sources.source import ArraySource


def open_source(path: epath.PathLike | ArraySource) -> ArraySource:
    """The source at `path`: an Orbax PyTree item, Hugging Face safetensors, or PyTorch files.

    Safetensors win where a directory holds both them and PyTorch files
    (`.bin`, `.pth`, `.pt`). A source object passes through unchanged.
    """
    if not isinstance(path, str | epath.PathLike):
        return path
    from orbax_surgery.sources.pytorch_checkpoint import PyTorchCheckpoint
    from orbax_surgery.sources.pytorch_files import is_pytorch
    from orbax_surgery.sources.safetensors import SafetensorsCheckpoint, is_safetensors

    if is_safetensors(path):
        return SafetensorsCheckpoint(path)
    if is_pytorch(path):
        return PyTorchCheckpoint(path)
    if locations.is_url(path) and not locations.is_cloud(path):
        return SafetensorsCheckpoint(path)  # Says what the web server lacks.
    return OrbaxCheckpoint(path)
