"""What a checkpoint path holds: steps, items and arrays, as a tree view or JSON.

`describe(path)` reads metadata only (Orbax's `_METADATA`, safetensors
headers) and returns a JSON-ready dict; `format_description` renders it as
text. `item_path` picks one item of a `CheckpointManager` directory, so that
every command can take a manager root.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from orbax_surgery import locations
from orbax_surgery.arrays.expr import Source
from orbax_surgery.cli.folding import fold_layers
from orbax_surgery.errors import CheckpointNotFoundError
from orbax_surgery.keys import SEP, did_you_mean
from orbax_surgery.units import format_bytes

_TMP_MARK = '.orbax-checkpoint-tmp'
_PEFT_CONFIG = 'adapter_config.json'
_PEFT_SETTINGS = ('r', 'lora_alpha', 'use_rslora', 'target_modules', 'base_model_name_or_path')


def describe(path: epath.PathLike, *, step: int | None = None) -> dict[str, Any]:
    """What `path` holds, from metadata alone, as a JSON-ready dict.

    `path` is an Orbax checkpoint item, a step directory of items, a
    `CheckpointManager` directory (its latest step, or `step`), Hugging Face
    safetensors (a file, or a directory with `model.safetensors` or an index),
    or a PEFT adapter directory.

    Example:
        >>> import tempfile, numpy as np, orbax.checkpoint as ocp
        >>> path = tempfile.mkdtemp() + '/ckpt'
        >>> with ocp.StandardCheckpointer() as ckptr:
        ...     ckptr.save(path, {'dense': {'kernel': np.ones((4, 8), np.float32)}})
        >>> d = describe(path)
        >>> d['kind'], d['arrays'][0]['key'], d['arrays'][0]['shape'], d['bytes']
        ('orbax', 'dense/kernel', [4, 8], 128)
    """
    from orbax_surgery.sources.pytorch_files import is_pytorch
    from orbax_surgery.sources.safetensors import is_safetensors

    if _is_http(path):  # A web server lists nothing: it serves safetensors or nothing.
        _no_choice(path, step=step, item=None)
        return _safetensors(path)
    path = epath.Path(path)
    if (path / _PEFT_CONFIG).exists():
        _no_choice(path, step=step, item=None)
        return _peft(path)
    if is_pytorch(path):
        _no_choice(path, step=step, item=None)
        return _pytorch(path)
    if is_safetensors(path) or (path / '_METADATA').exists() or not path.is_dir():
        _no_choice(path, step=step, item=None)
        return _safetensors(path) if is_safetensors(path) else _item(path)
    items = _items(path)
    if items:
        if step is not None:
            raise CheckpointNotFoundError(f'{path} is a step directory; --step is for a root.')
        return {'kind': 'step', 'path': str(path), 'items': _described_items(path)}
    steps, unfinalized = _steps(path)
    if not steps and not unfinalized:
        return _item(path)  # Raises, saying what is there instead.
    chosen = _chosen_step(path, steps, unfinalized, step)
    return {
        'kind': 'manager',
        'path': str(path),
        'steps': steps,
        'unfinalized': unfinalized,
        'step': chosen,
        'items': _described_items(path / str(chosen)),
    }


def item_path(path: epath.PathLike, *, step: int | None = None, item: str | None = None) -> str:
    """The item to read at `path`: itself, or one item of a step or manager directory.

    A manager directory gives its latest step (or `step`); a step directory
    with several items needs `item` (one named 'default' is taken without).
    """
    from orbax_surgery.sources.pytorch_files import is_pytorch
    from orbax_surgery.sources.safetensors import is_safetensors

    if _is_http(path):
        _no_choice(path, step=step, item=item)
        return str(path)
    p = epath.Path(path)
    if is_safetensors(p) or is_pytorch(p) or (p / '_METADATA').exists() or not p.is_dir():
        _no_choice(p, step=step, item=item)
        return str(p)
    if not _items(p):
        steps, unfinalized = _steps(p)
        if not steps and not unfinalized:
            _no_choice(p, step=step, item=item)
            return str(p)
        p = p / str(_chosen_step(p, steps, unfinalized, step))
    elif step is not None:
        raise CheckpointNotFoundError(f'{p} is a step directory; --step is for a manager root.')
    items = [n for n in _items(p) if (p / n / '_METADATA').exists()]
    if item is None:
        if len(items) == 1 or 'default' in items:
            return str(p / (items[0] if len(items) == 1 else 'default'))
        raise CheckpointNotFoundError(
            f'{p} holds the items {items}; choose one with --item (e.g. --item {items[0]}).'
        )
    if item not in items:
        raise CheckpointNotFoundError(
            f'{p} has no item {item!r}; it holds {items}.{did_you_mean(item, items)}'
        )
    return str(p / item)


def format_description(d: Mapping[str, Any], *, all_layers: bool = False) -> str:
    """The text form of `describe`'s dict: a tree of keys with shapes, dtypes and bytes.

    Alike numbered layers print once, as `layers_{0..31}/`, unless `all_layers`.
    """
    if d['kind'] == 'manager':
        steps = ', '.join(map(str, d['steps'])) or 'none finalized'
        lines = [f'CheckpointManager directory {d["path"]}', f'  steps: {steps}']
        if d['unfinalized']:
            lines.append(f'  unfinalized (interrupted or running saves): {d["unfinalized"]}')
        lines.append(f'  showing step {d["step"]}, items: {", ".join(d["items"]) or "none"}')
        return '\n'.join(lines + _items_text(d['items'], all_layers))
    if d['kind'] == 'step':
        lines = [f'Step directory {d["path"]}, items: {", ".join(d["items"])}']
        return '\n'.join(lines + _items_text(d['items'], all_layers))
    return _item_text(d, all_layers)


def _items_text(items: Mapping[str, Mapping[str, Any]], all_layers: bool) -> list[str]:
    lines = []
    for name, item in items.items():
        lines += ['', f'[{name}] ' + _item_text(item, all_layers)]
    return lines


def _item_text(d: Mapping[str, Any], all_layers: bool) -> str:
    if d['kind'] == 'other':
        return f'{d["path"]}: not an Orbax PyTree item; files: {", ".join(d["files"])}'
    total = format_bytes(d['bytes'])
    if d['kind'] == 'peft':
        head = f'PEFT adapter {d["path"]}: {len(d["arrays"])} tensors, {total}'
        settings = {k: d['config'][k] for k in _PEFT_SETTINGS if k in d['config']}
        head += '\n  ' + ', '.join(f'{k}={v!r}' for k, v in settings.items())
    elif d['kind'] == 'pytorch':
        files = len(d['files'])
        head = f'PyTorch checkpoint {d["path"]}: {len(d["arrays"])} tensors, {total}'
        head += f' in {files} file{"s" if files != 1 else ""}'
        if d['skipped']:
            head += f'; not tensors, skipped: {", ".join(sorted(d["skipped"]))}'
    elif d['kind'] == 'safetensors':
        files = len(d['files'])
        head = f'Safetensors checkpoint {d["path"]}: {len(d["arrays"])} tensors, {total}'
        head += f' in {files} file{"s" if files != 1 else ""}'
    else:
        head = f'Orbax checkpoint item {d["path"]}: {len(d["arrays"])} arrays, {total}'
    lines = [head]
    if d.get('lora'):
        lines.append(f'  saved by LoraSave: {_lora_text(d["lora"])}')
    lines.append('')
    arrays = d['arrays'] if all_layers else fold_layers(d['arrays'])
    lines += _tree_table(arrays, chunks=d['kind'] == 'orbax')
    return '\n'.join(lines)


def _lora_text(layout: Mapping[str, Any]) -> str:
    from orbax_surgery.lora.layout import LoraLayout

    return str(LoraLayout.from_json(layout)).replace('\n', '\n  ')


def _tree_table(arrays: Sequence[Mapping[str, Any]], *, chunks: bool) -> list[str]:
    """Keys as an indented tree in natural order (`layers_2` before `layers_10`), each
    directory with its total bytes; an entry standing for `count` alike arrays shows
    `count ×` one array's bytes."""
    totals: dict[str, int] = {}
    for a in arrays:
        parts = a['key'].split(SEP)
        for n in range(1, len(parts)):
            prefix = SEP.join(parts[:n])
            totals[prefix] = totals.get(prefix, 0) + a['bytes'] * a.get('count', 1)
    header = ['key', 'shape', 'dtype'] + (['chunks'] if chunks else []) + ['bytes']
    rows = [header]
    shown: set[str] = set()
    for a in sorted(arrays, key=lambda a: [_natural(p) for p in a['key'].split(SEP)]):
        parts = a['key'].split(SEP)
        for n in range(1, len(parts)):
            prefix = SEP.join(parts[:n])
            if prefix not in shown:
                shown.add(prefix)
                name = '  ' * (n - 1) + parts[n - 1] + SEP
                rows.append([name, '', ''] + ([''] if chunks else []) + [_size(totals[prefix])])
        name = '  ' * (len(parts) - 1) + parts[-1]
        row = [name, _shape(a['shape']), a['dtype']]
        if chunks:
            row.append(_shape(a['chunk_shape']) if a['chunk_shape'] is not None else '-')
        count = a.get('count', 1)
        rows.append(row + [(f'{count} × ' if count > 1 else '') + _size(a['bytes'])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    out = []
    for r in rows:
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)]
        out.append('  ' + '  '.join(cells + [r[-1].rjust(widths[-1])]).rstrip())
    return out


def _natural(part: str) -> list[Any]:
    """A sort key with numbers as numbers (text and int alternate, text first), and
    folded layers (`layers_{0..3,5..31}`) where their first layer would be."""
    part = re.sub(r'\{(\d+)[^}]*\}', r'\1', part)
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r'(\d+)', part))]


def _shape(shape: Sequence[int]) -> str:
    return '(' + ', '.join(map(str, shape)) + (',)' if len(shape) == 1 else ')')


def _size(n: int) -> str:
    return format_bytes(n)


def _array(source: Source, **extra: Any) -> dict[str, Any]:
    dtype = 'str' if source.dtype == object else str(source.dtype)
    nbytes = 0 if source.dtype == object else math.prod(source.shape) * source.dtype.itemsize
    return {
        'key': source.key,
        'shape': list(source.shape),
        'dtype': dtype,
        'bytes': nbytes,
        **extra,
    }


def _described_items(step_dir: epath.Path) -> dict[str, dict[str, Any]]:
    out = {}
    for name in _items(step_dir):
        path = step_dir / name
        if (path / '_METADATA').exists():
            out[name] = _item(path)
        else:  # An item another handler wrote (JSON metrics, ...).
            files = sorted(p.name for p in path.iterdir())
            out[name] = {'kind': 'other', 'path': str(path), 'files': files}
    return out


def _item(path: epath.Path) -> dict[str, Any]:
    from orbax_surgery.lora.handler import METADATA_KEY
    from orbax_surgery.sources.orbax_checkpoint import OrbaxCheckpoint

    ckpt = OrbaxCheckpoint(path)
    arrays = [
        _array(s, chunk_shape=list(s.chunk_shape) if s.chunk_shape else None)
        for s in ckpt.arrays.values()
    ]
    lora = ckpt.custom_metadata.get(METADATA_KEY, {}).get('layout')
    return {
        'kind': 'orbax',
        'path': str(path),
        'arrays': arrays,
        'bytes': sum(a['bytes'] for a in arrays),
        'lora': lora,
    }


def _safetensors(path: epath.Path) -> dict[str, Any]:
    from orbax_surgery.sources.safetensors import SafetensorsCheckpoint, key_to_name

    ckpt = SafetensorsCheckpoint(path)
    arrays = [_array(s, name=key_to_name(s.key)) for s in ckpt.arrays.values()]
    return {
        'kind': 'safetensors',
        'path': locations.shown(ckpt.location),
        'files': sorted(ckpt.metadata),
        'metadata': ckpt.metadata,
        'arrays': arrays,
        'bytes': sum(a['bytes'] for a in arrays),
    }


def _pytorch(path: epath.Path) -> dict[str, Any]:
    from orbax_surgery.sources.pytorch_checkpoint import PyTorchCheckpoint
    from orbax_surgery.sources.safetensors import key_to_name

    ckpt = PyTorchCheckpoint(path)
    arrays = [_array(s, name=key_to_name(s.key)) for s in ckpt.arrays.values()]
    return {
        'kind': 'pytorch',
        'path': locations.shown(ckpt.location),
        'files': sorted({locations.name(f) for f in ckpt.files}),
        'skipped': ckpt.skipped,
        'arrays': arrays,
        'bytes': sum(a['bytes'] for a in arrays),
    }


def _peft(path: epath.Path) -> dict[str, Any]:
    """A PEFT adapter directory: its config, and its tensors under their file's names."""
    from orbax_surgery.huggingface.peft_format import WEIGHTS_FILE

    out = _safetensors(path / WEIGHTS_FILE)
    config = json.loads((path / _PEFT_CONFIG).read_text())
    return {**out, 'kind': 'peft', 'path': str(path), 'config': config}


def _items(step_dir: epath.Path) -> list[str]:
    """The items of a step directory: PyTree items, and beside them other items (files only).

    A directory is a step only if it holds a PyTree item or Orbax's step metadata.
    """
    if not step_dir.is_dir():
        return []
    subdirs = sorted(p for p in step_dir.iterdir() if p.is_dir() and _TMP_MARK not in p.name)
    trees = [p.name for p in subdirs if (p / '_METADATA').exists()]
    if not trees and not (step_dir / '_CHECKPOINT_METADATA').exists():
        return []
    others = [p.name for p in subdirs if p.name not in trees and _files_only(p)]
    return sorted(trees + others)


def _files_only(path: epath.Path) -> bool:
    children = list(path.iterdir())
    return bool(children) and not any(c.is_dir() for c in children)


def _steps(root: epath.Path) -> tuple[list[int], list[str]]:
    steps, unfinalized = [], []
    for p in root.iterdir():
        if not p.is_dir():
            continue
        if p.name.isdigit() and _items(p) and _committed(p):
            steps.append(int(p.name))
        elif p.name.isdigit() and _items(p):
            unfinalized.append(p.name)  # In object storage: no commit file yet.
        elif _TMP_MARK in p.name and p.name.split('.')[0].isdigit():
            unfinalized.append(p.name)
    return sorted(steps), sorted(unfinalized)


def _committed(step: epath.Path) -> bool:
    """Finalized: always on a local disk; in object storage once Orbax wrote its commit file."""
    return not locations.is_cloud(str(step)) or (step / 'commit_success.txt').exists()


def _is_http(path: Any) -> bool:
    return locations.is_url(path) and not locations.is_cloud(path)


def _chosen_step(
    root: epath.Path, steps: list[int], unfinalized: list[str], step: int | None
) -> int:
    if step is None:
        if not steps:
            raise CheckpointNotFoundError(
                f'{root} is a CheckpointManager directory with no finalized step; '
                f'{unfinalized} were interrupted or are still being written.'
            )
        return steps[-1]
    if step not in steps:
        pending = [u for u in unfinalized if u.split('.')[0] == str(step)]
        why = ' (its save was interrupted or is still running)' if pending else ''
        raise CheckpointNotFoundError(
            f'{root} has no finalized step {step}{why}; its steps are {steps}.'
        )
    return step


def _no_choice(path: epath.Path, *, step: int | None, item: str | None) -> None:
    if step is not None or item is not None:
        flag = '--step' if step is not None else '--item'
        raise CheckpointNotFoundError(
            f'{path} is a single checkpoint, not a CheckpointManager directory: drop {flag}.'
        )
