"""Which files make a PyTorch checkpoint: one file, an index and its shards, or consolidated parts.

A directory is read as `pytorch_model.bin.index.json` (with the shards it
names), else `pytorch_model.bin`, else every `consolidated.NN.pth` in it (Meta's
model-parallel parts). Over http(s) nothing can be listed, so parts are found
by trying `consolidated.00.pth`, `.01`, ... until one is missing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from etils import epath

from orbax_surgery import locations
from orbax_surgery.errors import CheckpointNotFoundError, SourceReadError
from orbax_surgery.keys import did_you_mean
from orbax_surgery.sources.file_reads import open_file

INDEX_FILE = 'pytorch_model.bin.index.json'
SINGLE_FILE = 'pytorch_model.bin'
SUFFIXES = ('.bin', '.pth', '.pt')
CONSOLIDATED = re.compile(r'consolidated\.\d+\.pth')


def is_pytorch(path: epath.PathLike) -> bool:
    """Whether `path` names torch.save files: by suffix, or a directory holding them."""
    location = locations.absolute(path)
    named = location.endswith((*SUFFIXES, '.bin.index.json'))
    if locations.is_url(location):
        names = (INDEX_FILE, SINGLE_FILE, 'consolidated.00.pth')
        return named or any(open_file(locations.join(location, n)).exists() for n in names)
    p = epath.Path(location)
    if p.is_dir():  # An Orbax checkpoint named `run.pt` stays one.
        return bool(in_directory(p)) or (named and not (p / '_METADATA').exists())
    return named


def in_directory(path: epath.Path) -> list[str]:
    """The files of a local directory to read, in the order it prefers them."""
    if (path / INDEX_FILE).exists():
        return [INDEX_FILE]
    if (path / SINGLE_FILE).exists():
        return [SINGLE_FILE]
    return sorted(p.name for p in path.iterdir() if CONSOLIDATED.fullmatch(p.name))


def files(location: str) -> tuple[list[str], dict[str, str], str]:
    """The files to open, the tensor -> file map an index promises, and their directory."""
    if locations.is_url(location):
        return _remote_files(location)
    path = epath.Path(location)
    if not path.exists():
        near = ''
        if path.parent.is_dir():
            near = did_you_mean(path.name, [p.name for p in path.parent.iterdir()])
        raise CheckpointNotFoundError(f'No PyTorch checkpoint at {path}: it does not exist.{near}')
    if path.is_dir():
        names = in_directory(path)
        if not names:
            found = sorted(p.name for p in path.iterdir() if p.name.endswith(SUFFIXES))
            raise CheckpointNotFoundError(
                f'{path} holds neither {SINGLE_FILE}, {INDEX_FILE} nor consolidated.NN.pth files'
                + (f'; it has {found[:5]}: pass one of them.' if found else '.')
            )
        if names != [INDEX_FILE]:
            return [str(path / n) for n in names], {}, str(path)
        path = path / INDEX_FILE
    if not path.name.endswith('.index.json'):
        return [str(path)], {}, str(path.parent)
    files = _index(str(path), path.read_text)
    missing = sorted({f for f in files.values() if not epath.Path(f).exists()})
    if missing:
        names = [n for n, f in files.items() if f == missing[0]]
        raise CheckpointNotFoundError(
            f'{path.name} names {len(missing)} missing file(s), first {missing[0]}, which should '
            f'hold {len(names)} tensors (e.g. {names[0]!r}).'
        )
    return sorted(set(files.values())), files, str(path.parent)


def _remote_files(location: str) -> tuple[list[str], dict[str, str], str]:
    """As `_files`, for a URL: consolidated parts are found by trying .00, .01, ..."""
    if location.endswith(SUFFIXES):
        return [location], {}, locations.parent(location)
    index = location
    if not location.endswith('.index.json'):
        index = locations.join(location, INDEX_FILE)
        if not open_file(index).exists():
            single = locations.join(location, SINGLE_FILE)
            if open_file(single).exists():
                return [single], {}, location
            parts: list[str] = []
            while open_file(part := _consolidated(location, len(parts))).exists():
                parts.append(part)
            if parts:
                return parts, {}, location
            raise CheckpointNotFoundError(
                f'No PyTorch checkpoint at {locations.shown(location)}: it holds neither '
                f'{SINGLE_FILE}, {INDEX_FILE} nor consolidated.00.pth.'
            )
    files = _index(index, lambda: open_file(index).read(0).decode())
    return sorted(set(files.values())), files, locations.parent(index)


def _consolidated(location: str, i: int) -> str:
    return locations.join(location, f'consolidated.{i:02d}.pth')


def _index(path: str, read_text: Callable[[], str]) -> dict[str, str]:
    """Tensor name -> the file holding it, from a `pytorch_model.bin.index.json`."""
    try:
        weight_map = json.loads(read_text())['weight_map']
        return {name: locations.join(locations.parent(path), f) for name, f in weight_map.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SourceReadError(
            f'{locations.shown(path)} is not a PyTorch checkpoint index (no "weight_map"): {e}'
        ) from e
