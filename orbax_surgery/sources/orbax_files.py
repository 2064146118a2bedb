"""An Orbax item directory's files, read defensively: each damage is named.

Checks what a path holds (a finalized item, a step or manager directory, an
interrupted save), parses the tree file `_METADATA` and `_sharding`, and
finds which OCDBT data file holds a chunk, so that `OrbaxCheckpoint` reports
a damaged checkpoint as `SourceReadError` or `CheckpointNotFoundError`
naming the file and the key, never as a raw TensorStore, JSON or OS error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from orbax_surgery import locations
from orbax_surgery.errors import (
    CheckpointNotFoundError,
    SourceReadError,
    UnfinalizedCheckpointError,
)
from orbax_surgery.keys import KeyPath, did_you_mean

_STORED = ('jax.Array', 'np.ndarray', 'scalar')
_TMP_MARK = '.orbax-checkpoint-tmp'
_COMMIT_FILE = 'commit_success.txt'


def ts_reason(error: BaseException) -> str:
    """A TensorStore error's message without the spec it appends (the file names stay)."""
    return str(error).split(' [tensorstore_spec=', 1)[0].split(' [source locations=', 1)[0]


def ocdbt_location(directory: epath.Path, chunk_key: str) -> str:
    """Where OCDBT keeps `chunk_key` (`FILE, bytes a..b`), or ''.

    TensorStore names the chunk's key in the database, not the data file that
    holds it; its b-tree says which. Looked up only for a message, so at most
    a few hundred nodes are read and any failure gives ''.
    """
    wanted = chunk_key.encode()
    try:
        kvstore = ts.KvStore.open(locations.kvstore(str(directory))).result()
        todo = [ts.ocdbt.dump(kvstore).result()['versions'][-1]['root']['location']]
        for _ in range(256):
            if not todo:
                break
            for entry in ts.ocdbt.dump(kvstore, todo.pop()).result().get('entries', []):
                if str(entry.get('location', '')).startswith('btreenode::'):
                    todo.append(entry['location'])
                value = str(entry.get('indirect_value', ''))
                if entry.get('key') == wanted and value.startswith('value:'):
                    prefix, file, start, length = value[len('value:') :].rsplit(':', 3)
                    end = int(start) + int(length)
                    return f'{directory / prefix / file}, bytes {start}..{end}'
    except (ValueError, KeyError, TypeError, IndexError):
        pass
    return ''


def read_tree_file(directory: epath.Path) -> dict[str, Any]:
    """The item's `_METADATA` (its tree), parsed, or an error naming it."""
    tree_file = directory / '_METADATA'
    try:
        tree = json.loads(tree_file.read_text())
        if not isinstance(tree, dict) or not isinstance(tree.get('tree_metadata'), dict):
            raise ValueError('it holds no "tree_metadata" object')
    except (OSError, ValueError) as e:
        raise SourceReadError(
            f'{tree_file} is damaged or unreadable, so the arrays of {directory} are unknown: '
            f'{type(e).__name__}: {e}'
        ) from e
    return tree


def stored_names(tree: Mapping[str, Any]) -> dict[KeyPath, str]:
    """Where Orbax stores each array of the tree: its keys joined by '.', by key."""
    out = {}
    for entry in tree['tree_metadata'].values():
        value = entry.get('value_metadata', {}) if isinstance(entry, dict) else {}
        path = [str(k.get('key')) for k in entry.get('key_metadata', ())] if value else []
        if path and value.get('value_type') in _STORED and not value.get('skip_deserialize'):
            out['/'.join(path)] = '.'.join(path)
    return out


def key_impls(directory: epath.Path) -> dict[str, str]:
    """The PRNG key implementation of each array Orbax stored as typed keys, by stored name.

    Orbax records it in `array_metadatas/process_<i>` (newer writers only); a
    file that is missing or unreadable just means no typed keys are known.
    """
    out: dict[str, str] = {}
    for path in sorted((directory / 'array_metadatas').glob('process_*')):
        try:
            entries = json.loads(path.read_text()).get('array_metadatas', [])
        except (OSError, ValueError, AttributeError):
            continue
        for entry in entries if isinstance(entries, list) else []:
            meta = entry.get('array_metadata', {}) if isinstance(entry, dict) else {}
            impl = (meta.get('ext_metadata') or {}).get('random_key_impl')
            if isinstance(impl, str) and isinstance(meta.get('param_name'), str):
                out[meta['param_name']] = impl
    return out


def orbax_metadata(directory: epath.Path) -> Any:
    """Orbax's metadata of the item (its arrays are known to open), or an error naming the file."""
    sharding = directory / '_sharding'
    try:
        if sharding.exists():
            json.loads(sharding.read_text())
        return ocp.PyTreeCheckpointHandler().metadata(directory)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SourceReadError(
            f'Reading the metadata of {directory} failed ({sharding} holds the saved shardings); '
            f'the checkpoint is damaged or unreadable: {type(e).__name__}: {ts_reason(e)}'
        ) from e


def checked_directory(path: epath.Path) -> epath.Path:
    """The item directory, or an error saying exactly what is there instead."""
    locations.forget_listings(str(path))
    for part in (path, *path.parents):
        if _TMP_MARK in part.name:
            raise UnfinalizedCheckpointError(
                f'{part} is a temporary directory: its save was interrupted or is still '
                'running, and Orbax never finalized it. Restore a finalized step instead.'
            )
    if not path.exists():
        _raise_missing(path)
    if not path.is_dir():
        raise CheckpointNotFoundError(f'{path} is a file, not an Orbax checkpoint directory.')
    if (path / '_METADATA').exists():
        if locations.is_cloud(str(path)) and not _committed(path):
            raise UnfinalizedCheckpointError(
                f'{path} has no {_COMMIT_FILE}: on object storage Orbax writes it last, so its '
                'save was interrupted or is still running. (A finished checkpoint copied there '
                f'by hand has none either: add an empty {_COMMIT_FILE} to it.)'
            )
        return path
    children = sorted(p.name for p in path.iterdir() if p.is_dir())
    items = [c for c in children if (path / c / '_METADATA').exists()]
    if items:
        raise CheckpointNotFoundError(
            f'{path} is a step directory holding the items {items}; pass one of them, '
            f'e.g. {str(path / items[0])!r}, or restore through a CheckpointManager.'
        )
    steps = [c for c in children if c.isdigit()]
    if steps:
        raise CheckpointNotFoundError(
            f'{path} is a CheckpointManager directory with steps {steps[-5:]}; pass '
            f'{str(path / steps[-1])!r}/<item>, or use CheckpointManager.restore.'
        )
    raise CheckpointNotFoundError(
        f'{path} holds no Orbax PyTree checkpoint (no _METADATA file); was it saved '
        'with StandardSave or PyTreeSave? Nor Hugging Face safetensors (no '
        'model.safetensors or model.safetensors.index.json).'
    )


def _committed(path: epath.Path) -> bool:
    """Orbax's commit file, in the item or in its step directory."""
    return (path / _COMMIT_FILE).exists() or (path.parent / _COMMIT_FILE).exists()


def _raise_missing(path: epath.Path) -> None:
    parents = list(path.parents)
    if locations.is_url(str(path)):  # Not above the bucket (or host).
        parents = parents[: max(len(str(path).split('://', 1)[1].split('/')) - 1, 0)]
    existing = next((p for p in parents if p.exists()), None)
    hint = ''
    if existing is not None and existing.is_dir():
        names = [p.name for p in existing.iterdir()]
        wanted = path.relative_to(existing).parts[0]
        pending = [n for n in names if n.startswith(wanted + _TMP_MARK)]
        if pending:
            raise UnfinalizedCheckpointError(
                f'{path} does not exist, but {existing / pending[0]} does: that save was '
                'interrupted or is still running, and was never finalized.'
            )
        hint = did_you_mean(wanted, names)
    if locations.is_cloud(str(path)) and existing is None:
        hint += ' Nothing exists in that bucket at all: is its name right, and can you read it?'
    raise CheckpointNotFoundError(f'No checkpoint at {path}: it does not exist.{hint}')
