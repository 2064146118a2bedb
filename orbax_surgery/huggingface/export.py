"""Export to Hugging Face safetensors: shard files and an index, each process writing its part.

The layout is fixed before any data moves: tensors go to files in key order
(a new file when the next tensor would pass `max_shard_size`), each file's
header is computed up front, so every process knows the byte offsets of every
tensor. A tensor's regions are assigned to processes (a sharded leaf's shards
to a process holding them, the rest balanced by bytes), each process computes
only its regions, a budget's worth at a time, and writes their bytes with
positioned writes into files preallocated by process 0. All of it happens in
a temporary directory beside the destination, which process 0 renames into
place only when every process is done; a failure leaves no destination.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import jax
from etils import epath

from orbax_surgery import locations
from orbax_surgery.errors import DestinationExistsError, SurgeryError
from orbax_surgery.huggingface.export_blocks import my_blocks, write_blocks
from orbax_surgery.huggingface.export_checksums import record_safetensors
from orbax_surgery.huggingface.export_files import (
    Layout,
    create_files,
    file_metadata,
    plan_files,
    write_index,
)
from orbax_surgery.huggingface.export_remote import copy_configs, export_to_object_storage
from orbax_surgery.keys import PyTree
from orbax_surgery.plan.plan import Step
from orbax_surgery.plan.resolve import Rules, resolve
from orbax_surgery.read.materialize import DEFAULT_MAX_INFLIGHT_BYTES, run_sync
from orbax_surgery.sources.open import open_source
from orbax_surgery.sources.safetensors import INDEX_FILE, SafetensorsCheckpoint
from orbax_surgery.sources.source import ArraySource
from orbax_surgery.sources.tree import TreeSource
from orbax_surgery.units import parse_bytes
from orbax_surgery.write.atomic import move_into_place
from orbax_surgery.write.barrier import DEFAULT_PEER_TIMEOUT_SECS, Barrier
from orbax_surgery.write.surgery_save import natural_sharding

DEFAULT_MAX_SHARD_SIZE = '5GB'


@dataclasses.dataclass(frozen=True)
class Exported:
    """What `save_safetensors` wrote.

    Attributes:
        directory: The finalized destination.
        files: The safetensors files in it, in order (plus the index when several).
        total_size: Tensor bytes in all files (the index's `metadata.total_size`).
        bytes_written: Tensor bytes this process wrote.

    Example:
        >>> import tempfile, numpy as np
        >>> tree = {'a': np.ones(4, np.float32), 'b': np.ones(4, np.float32)}
        >>> out = save_safetensors(tree, tempfile.mkdtemp() + '/hf', max_shard_size=16)
        >>> out.files[0], out.files[-1], out.total_size, out.bytes_written
        ('model-00001-of-00002.safetensors', 'model.safetensors.index.json', 32, 32)
    """

    directory: epath.Path
    files: tuple[str, ...]
    total_size: int
    bytes_written: int


def save_safetensors(
    source: epath.PathLike | ArraySource | PyTree,
    directory: epath.PathLike,
    *,
    target: PyTree = None,
    rules: Rules = (),
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
    progress: Callable[[int], None] | None = None,
    peer_timeout_secs: float = DEFAULT_PEER_TIMEOUT_SECS,
    checksums: bool = False,
    config: Mapping[str, Any] | None = None,
) -> Exported:
    """Writes a checkpoint or a live tree as Hugging Face safetensors, shard by shard.

    Every process calls it with the same arguments. Each computes and writes
    only the regions it is assigned: a sharded leaf's shards go to processes
    holding them; unsharded leaves are spread over processes by bytes. Nothing
    is written before the plan is checked; the destination appears only once
    complete.

    Args:
        source: An Orbax item directory, safetensors path, a source object, or
            an in-memory tree (jax.Arrays sharded across processes included).
        directory: The destination directory; its parent is created if needed.
        target: The exported tree (keys are tensor names with '.' as '/'), for
            shapes, dtypes and shardings; None takes them from the rules.
        rules: Typically `to_pytorch(...)`.
        max_shard_size: Tensor bytes per file before the next starts (an int,
            or a string like '5GB', '500MiB'); one `model.safetensors` if all fit.
        metadata: Strings for each file's `__metadata__` (`format` is 'pt'
            unless given).
        overwrite: Replace an existing destination, once the new one is complete.
        max_inflight_bytes: Host bytes computed but not yet written, per process.
        progress: Called with the tensor bytes of each block this process wrote.
        peer_timeout_secs: With several processes, how long each waits for the
            others at a barrier (created, written, hashed, finalized) before it gives up
            with `PeerTimeoutError`: a peer that died or hangs never holds the
            others forever. It must exceed the spread of the processes' write times.
            (Unless `jax_enable_recoverability` is set, JAX itself terminates the
            other processes once a peer misses its heartbeats for
            `jax.distributed.initialize(heartbeat_timeout_seconds=...)`, 100 s by default.)
        checksums: Also record a BLAKE2b-128 digest of every tensor's blocks
            (`export_checksums.block_shape`), read back from the written
            files once all are written, in `_CHECKSUMS/process_<i>.json` inside
            `directory`, so that restores with `verify=True` detect changed
            bytes. Each process reads and hashes an even share of the blocks;
            safetensors and transformers loaders ignore the extra directory.
        config: A Hugging Face config to write as `config.json` (e.g. a preset's
            `config`); by default a Hugging Face source's `config.json` and
            `generation_config.json` are copied.

    Returns:
        What was written, with this process's share.

    Raises:
        SurgeryError: The plan has errors, a dtype safetensors cannot hold, two
            keys with one tensor name, or bad arguments; nothing was written.
        DestinationExistsError: `directory` exists and `overwrite` is False.
        PeerTimeoutError: Another process did not reach a barrier in time; the
            message says whether the export was finalized (only if the peer
            failed after every byte was written).

    Example:
        >>> import tempfile, numpy as np, orbax_surgery as osurg
        >>> from orbax_surgery.huggingface.export import save_safetensors
        >>> tree = {'dense': {'kernel': np.ones((2, 3), np.float32)}}
        >>> out = save_safetensors(tree, tempfile.mkdtemp() + '/hf', rules=osurg.to_pytorch())
        >>> out.files, osurg.SafetensorsCheckpoint(out.directory).arrays['dense/weight'].shape
        (('model.safetensors',), (3, 2))
        >>> out = save_safetensors(tree, tempfile.mkdtemp() + '/hf', checksums=True)
        >>> osurg.restore(out.directory, verify=True)['dense']['kernel'].shape
        (2, 3)
    """
    location = locations.absolute(directory)
    if locations.is_url(location) and not locations.is_cloud(location):
        raise SurgeryError(
            f'Cannot export to {locations.shown(location)}: HTTP servers are read-only here. '
            'Export to a local directory, gs:// or s3://.'
        )
    src = _as_source(source)
    plan = resolve(src.arrays, target, rules)
    plan.check()
    steps = [_with_natural_sharding(step, src) for step in plan.steps]
    layout = plan_files(steps, _parse_size(max_shard_size), file_metadata(metadata))
    configs = src.directory if isinstance(src, SafetensorsCheckpoint) else None
    if locations.is_cloud(location):
        barrier = Barrier.start('orbax_surgery.export', timeout_secs=peer_timeout_secs)
        written = export_to_object_storage(
            src,
            layout,
            location,
            barrier=barrier,
            overwrite=overwrite,
            budget=max_inflight_bytes,
            progress=progress,
            checksums=checksums,
            configs_from=configs,
            config=config,
        )
        barrier.wait('finalized', left=f'Every file was written to {locations.shown(location)}.')
        return _exported(epath.Path(location), layout, written)
    directory = epath.Path(location)
    mine = my_blocks(layout.tensors, src, max(1, max_inflight_bytes // 4))
    if os.path.lexists(directory) and not overwrite:
        raise DestinationExistsError(
            f'{directory} exists; the export leaves it untouched. Choose another directory, '
            'or pass overwrite=True to replace it once the new export is complete.'
        )
    barrier = Barrier.start('orbax_surgery.export', timeout_secs=peer_timeout_secs)
    tmp = directory.parent / f'{directory.name}.tmp-{barrier.share(secrets.token_hex(4))}'
    unfinished = f'The export left nothing finalized: {directory} is as it was.'
    try:
        if jax.process_index() == 0:
            directory.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            create_files(tmp, layout)
        barrier.wait('created', left=unfinished)
        written = run_sync(write_blocks(mine, src, tmp, layout, max_inflight_bytes, progress))
        barrier.wait('written', left=unfinished)
        if checksums:
            paths = [tmp / name for name in layout.names]
            record_safetensors(paths, process=barrier.process, count=barrier.count).write_now(tmp)
            barrier.wait('hashed', left=unfinished)
        if jax.process_index() == 0:
            copy_configs(configs, str(tmp), config)
            write_index(tmp, layout)
            move_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    done = f'The export is finalized and whole at {directory}.'
    if jax.process_index() != 0:
        done = f'Every byte was written; {directory} is whole if process 0 finalized it.'
    barrier.wait('finalized', left=done)
    return _exported(directory, layout, written)


def _exported(directory: epath.Path, layout: Layout, written: int) -> Exported:
    files = layout.names + ((INDEX_FILE,) if len(layout.names) > 1 else ())
    return Exported(directory, files, layout.total_size, written)


def _as_source(source: Any) -> ArraySource:
    if isinstance(source, str | os.PathLike):
        return open_source(source)
    kind = type(source)
    if callable(getattr(kind, 'read', None)) and hasattr(kind, 'open'):
        return source
    return TreeSource(source)


def _with_natural_sharding(step: Step, source: ArraySource) -> Step:
    """A live tree's sharding carries over to an unsharded target, as in a save."""
    leaf = step.target
    if leaf.sharding is not None or not isinstance(source, TreeSource):
        return step
    sharding = natural_sharding(step.expr, source.values)
    return dataclasses.replace(step, target=dataclasses.replace(leaf, sharding=sharding))


def _parse_size(size: int | str) -> int:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    parsed = parse_bytes(size) if isinstance(size, str) else None
    if parsed is None:
        raise SurgeryError(
            f'max_shard_size={size!r} is not a size: pass bytes (an int > 0) or a string '
            "such as '5GB' or '500MiB'."
        )
    return parsed
