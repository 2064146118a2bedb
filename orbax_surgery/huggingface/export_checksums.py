"""Recording checksums of a safetensors export: a fixed block grid, hashed by every process.

See `orbax_surgery.read.verify` for the design and the exact guarantee.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
from collections.abc import Sequence

import numpy as np
from etils import epath

from orbax_surgery.arrays import regions
from orbax_surgery.arrays.expr import Source
from orbax_surgery.read.checksum_records import BlockId, Record, digest
from orbax_surgery.read.session import chunk_region
from orbax_surgery.sources.safetensors import SafetensorsCheckpoint
from orbax_surgery.write.checksums import Recorder

SAFETENSORS_BLOCK_BYTES = 4 * 2**20
"""The most bytes of a block (unless one element is larger)."""


def block_shape(shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, ...]:
    """The grid a safetensors export hashes a tensor in: contiguous blocks of at most 4 MiB.

    Trailing axes are whole, one axis is cut, leading axes go one index at a
    time, so each block is one byte range of the file; the widest such block
    of at most `SAFETENSORS_BLOCK_BYTES` (whole rows along axis 0 unless one
    row is larger). A tensor that small is one block, and so is a 0-d one. The
    grid depends on the shape and dtype alone, not on who wrote what.

    Example:
        >>> f32 = np.dtype(np.float32)
        >>> block_shape((4096, 1024), f32), block_shape((3, 5), f32)
        ((1024, 1024), (3, 5))
        >>> block_shape((2, 3, 2**21), f32), block_shape((), f32)
        ((1, 1, 1048576), ())
    """
    if not shape or 0 in shape:
        return tuple(shape)
    limit = max(SAFETENSORS_BLOCK_BYTES // dtype.itemsize, 1)
    axis = 0
    while math.prod(shape[axis + 1 :]) > limit:
        axis += 1
    rows = min(shape[axis], max(1, limit // math.prod(shape[axis + 1 :])))
    return (1,) * axis + (rows,) + tuple(shape[axis + 1 :])


def record_safetensors(files: Sequence[epath.PathLike], *, process: int, count: int) -> Recorder:
    """Hashes this process's share of the blocks of the tensors in `files`, read from them.

    The blocks of every tensor (`block_shape`), numbered in file,
    header and C order, go to processes in turn (block j to process
    j % count), so the processes share the reading and hashing evenly
    whoever wrote the bytes. Every process records every tensor, with the
    digests of its own blocks; `read_records` merges them.

    Example:
        >>> import tempfile
        >>> from orbax_surgery.huggingface.safetensors_file import write_file
        >>> path = tempfile.mkdtemp() + '/model.safetensors'
        >>> write_file(path, {'w': np.arange(4.0), 'step': np.asarray(3)})
        >>> records = record_safetensors([path], process=0, count=1).records
        >>> records['w'].blocks == {(0,): digest(np.arange(4.0))}, list(records['step'].blocks)
        (True, [()])
    """
    recorder = Recorder()
    mine: list[tuple[SafetensorsCheckpoint, Source, Record, BlockId]] = []
    opened = [SafetensorsCheckpoint(file) for file in files]
    number = 0
    for source in opened:
        for key, src in source.arrays.items():
            grid = block_shape(src.shape, src.dtype)
            record = recorder.records[key] = Record(src.shape, src.dtype.name, grid, {})
            for block in regions.chunk_cover(regions.full(src.shape), grid):
                if number % count == process:
                    mine.append((source, src, record, block))
                number += 1

    def hashed(item: tuple[SafetensorsCheckpoint, Source, Record, BlockId]) -> str:
        source, src, record, block = item
        return digest(source.read_now(src, chunk_region(block, src.shape, record.block_shape)))

    try:
        # One block per thread at a time: memory stays at a few blocks however many there are.
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            for (_, _, record, block), value in zip(mine, pool.map(hashed, mine), strict=True):
                record.blocks[block] = value
    finally:
        for source in opened:
            source.close()
    return recorder
