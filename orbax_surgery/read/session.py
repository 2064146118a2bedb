"""One restore's reads: each stored chunk once per host, freed after its last use.

Before anything is read, `Usage.count` walks every block this host will compute
(a target leaf's region) down to the stored regions it reads, and counts how
many reads touch each stored chunk. `Session` is then the evaluation context:
a chunk touched by one read is read straight into that read's buffer; a chunk
touched by several (a stacked array saved as one chunk and unrolled, tied
weights, shards that straddle a chunk) is read whole once, kept, and freed when
its last read is served. Whole-array functions (`Apply`) run once and are freed
the same way. `Usage.order` puts blocks that share a chunk next to each other,
so kept chunks live briefly. A small array the host needs in several chunks (a
LoRA adapter) is read as one box of those chunks, kept until its last read.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import math
from collections.abc import Iterable, Sequence

import numpy as np

from orbax_surgery.arrays import expr as ex
from orbax_surgery.arrays import regions
from orbax_surgery.arrays.regions import Region
from orbax_surgery.arrays.value_functions import Apply
from orbax_surgery.keys import KeyPath
from orbax_surgery.sources.source import ArraySource

ChunkId = tuple[KeyPath, tuple[int, ...]]
Block = tuple[ex.Expr, Region]


@dataclasses.dataclass
class Usage:
    """How often this host's blocks read each stored chunk and each whole-array result."""

    chunks: collections.Counter[ChunkId] = dataclasses.field(default_factory=collections.Counter)
    applies: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    block_chunks: list[list[ChunkId]] = dataclasses.field(default_factory=list)
    reads: collections.Counter[KeyPath] = dataclasses.field(default_factory=collections.Counter)
    sources: dict[KeyPath, ex.Source] = dataclasses.field(default_factory=dict)
    ranges: collections.Counter[ChunkId] = dataclasses.field(default_factory=collections.Counter)
    range_regions: dict[KeyPath, dict[tuple[int, ...], Region]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(dict)
    )

    @classmethod
    def count(cls, blocks: Iterable[Block]) -> Usage:
        """Counts the reads evaluating `blocks` will make, exactly as evaluation makes them."""
        usage = cls()
        for expr, region in blocks:
            touched: list[ChunkId] = []
            usage._walk(expr, region, touched)
            usage.block_chunks.append(touched)
        return usage

    def _walk(self, node: ex.Expr, region: Region, touched: list[ChunkId]) -> None:
        if isinstance(node, ex.Source):
            self.reads[node.key] += 1
            self.sources[node.key] = node
            if node.byte_ranges:
                self.ranges[node.key, range_id(region)] += 1
                self.range_regions[node.key][range_id(region)] = region
                touched.append((node.key, range_id(region)))
            if node.chunk_shape is not None:
                for c in regions.chunk_cover(region, node.chunk_shape):
                    self.chunks[node.key, c] += 1
                    touched.append((node.key, c))
            return
        if isinstance(node, Apply):
            self.applies[id(node)] += 1
            if self.applies[id(node)] > 1:
                return  # Computed once per restore: its inputs are read once.
        for child, sub in node.child_regions(region):
            self._walk(child, sub, touched)

    def order(self) -> list[int]:
        """Block indices, those sharing a chunk next to each other, others as given."""

        def key(i: int) -> tuple[int, ChunkId | tuple[()], int]:
            shared = [c for c in self.block_chunks[i] if self.chunks[c] > 1 or self.ranges[c] > 1]
            return (0, min(shared), i) if shared else (1, (), i)

        return sorted(range(len(self.block_chunks)), key=key)


SMALL_SOURCE_BYTES = 4 * 2**20
"""Stored arrays up to this size that a host reads in several chunks are read in one go.

LoRA adapters are the typical case: every shard of a weight reads a few rows of
`A`, which Orbax may have stored in many small chunks; one read of the host's
part replaces hundreds of tiny ones.
"""


class Session:
    """The evaluation context of one restore (see the module docstring).

    A shared chunk is kept however big it is: reading part of a chunk decodes
    all of it anyway, so reading it again for each use would cost the same
    memory each time, and the reads besides.

    Args:
        source: Where stored arrays are read.
        usage: The counted reads of every block that will be evaluated.
    """

    def __init__(
        self, source: ArraySource, usage: Usage, *, small_source_bytes: int = SMALL_SOURCE_BYTES
    ):
        self._source = source
        self._boxes = _small_source_boxes(usage, small_source_bytes) | _overlap_boxes(usage)
        self._box_reads = {key: usage.reads[key] for key in self._boxes}
        self._box_tasks: dict[KeyPath, asyncio.Task[np.ndarray]] = {}
        self._left = {c: n for c, n in usage.chunks.items() if n > 1 and c[0] not in self._boxes}
        self._shared_keys = {key for key, _ in self._left}
        self._ranges_left = {
            r: n for r, n in usage.ranges.items() if n > 1 and r[0] not in self._boxes
        }
        self._ranges: dict[ChunkId, asyncio.Task[np.ndarray]] = {}
        self._kept: dict[ChunkId, asyncio.Task[np.ndarray]] = {}
        self._nbytes: dict[ChunkId, int] = {}
        self._applies = collections.Counter(usage.applies)
        self._whole: dict[int, asyncio.Task[np.ndarray]] = {}
        self.kept_bytes = 0
        self.peak_kept_bytes = 0
        """The most bytes of shared chunks held at once."""

    async def whole(self, node: ex.Expr) -> np.ndarray:
        assert isinstance(node, Apply), f'{node.describe()!r} is lazy; read it by region'
        task = self._whole.get(id(node))
        if task is None:
            task = asyncio.ensure_future(node.evaluate_whole(self))
            self._whole[id(node)] = task
        try:
            return await task
        finally:
            self._applies[id(node)] -= 1
            if self._applies[id(node)] <= 0:
                self._whole.pop(id(node), None)

    async def read(self, source: ex.Source, region: Region) -> np.ndarray:
        if source.key in self._boxes:
            return await self._from_box(source, region)
        if source.byte_ranges and (source.key, range_id(region)) in self._ranges_left:
            return await self._shared_range(source, region)
        grid = source.chunk_shape
        if grid is None or source.key not in self._shared_keys:
            return await self._source.read(source, region)
        pieces = chunk_pieces(region, source.shape, grid)
        kept = [(source.key, c) in self._left for c, _, _ in pieces]
        if not any(kept):
            self._forget(source.key, (c for c, _, _ in pieces))
            return await self._source.read(source, region)
        out = np.empty(regions.shape_of(region), source.dtype)

        async def fill(chunk: tuple[int, ...], at: tuple[slice, ...], sub: Region, keep: bool):
            if keep:
                whole = await self._chunk(source, chunk)
                out[at] = regions.take(whole, local_region(sub, chunk, grid))
                self._forget(source.key, [chunk])
            else:
                out[at] = await self._source.read(source, sub)

        await asyncio.gather(*(fill(*p, k) for p, k in zip(pieces, kept, strict=True)))
        return out

    def _forget(self, key: KeyPath, chunks: Iterable[tuple[int, ...]]) -> None:
        """One use of each chunk is served; the last use frees it."""
        for chunk in chunks:
            left = self._left.get((key, chunk))
            if left is None:
                continue
            if left <= 1:
                del self._left[key, chunk]
                task = self._kept.pop((key, chunk), None)
                if task is not None:
                    self.kept_bytes -= self._nbytes.pop((key, chunk))
            else:
                self._left[key, chunk] = left - 1

    async def _chunk(self, source: ex.Source, chunk: tuple[int, ...]) -> np.ndarray:
        task = self._kept.get((source.key, chunk))
        if task is None:
            assert source.chunk_shape is not None
            region = chunk_region(chunk, source.shape, source.chunk_shape)
            task = asyncio.ensure_future(self._source.read(source, region))
            self._kept[source.key, chunk] = task
            self._nbytes[source.key, chunk] = regions.size_of(region) * source.dtype.itemsize
            self.kept_bytes += self._nbytes[source.key, chunk]
            self.peak_kept_bytes = max(self.peak_kept_bytes, self.kept_bytes)
        return await task

    async def _shared_range(self, source: ex.Source, region: Region) -> np.ndarray:
        """The same region of a byte-addressable source asked for again (tied weights)."""
        at = (source.key, range_id(region))
        task = self._ranges.get(at)
        if task is None:
            task = self._ranges[at] = asyncio.ensure_future(self._source.read(source, region))
            self.kept_bytes += regions.size_of(region) * source.dtype.itemsize
            self.peak_kept_bytes = max(self.peak_kept_bytes, self.kept_bytes)
        try:
            return np.array(await task)
        finally:
            self._ranges_left[at] -= 1
            if self._ranges_left[at] <= 0:
                del self._ranges_left[at], self._ranges[at]
                self.kept_bytes -= regions.size_of(region) * source.dtype.itemsize

    async def _from_box(self, source: ex.Source, region: Region) -> np.ndarray:
        """A read of a small source, served from its box, read once at first use."""
        box = self._boxes[source.key]
        try:
            if regions.size_of(region) == 0:  # Touches no chunk, so maybe not inside the box.
                return np.empty(regions.shape_of(region), source.dtype)
            task = self._box_tasks.get(source.key)
            if task is None:
                task = asyncio.ensure_future(self._source.read(source, box))
                self._box_tasks[source.key] = task
                self.kept_bytes += regions.size_of(box) * source.dtype.itemsize
                self.peak_kept_bytes = max(self.peak_kept_bytes, self.kept_bytes)
            local = tuple(
                range(r.start - b.start, r.stop - b.start, r.step)
                for r, b in zip(region, box, strict=True)
            )
            return np.array(regions.take(await task, local))
        finally:
            self._box_reads[source.key] -= 1
            if self._box_reads[source.key] <= 0 and source.key in self._box_tasks:
                del self._box_tasks[source.key]
                self.kept_bytes -= regions.size_of(box) * source.dtype.itemsize


def _overlap_boxes(usage: Usage) -> dict[KeyPath, Region]:
    """Byte-addressable sources asked for overlapping, different regions: one box each.

    A tied weight sharded one way for the embedding and another for the head.
    Only where the regions tile their bounding box, so the box reads each
    needed byte once and nothing more; it is kept until its last read.
    """
    out = {}
    for key, by_id in usage.range_regions.items():
        parts = [r for r in by_id.values() if regions.size_of(r)]
        if len(parts) < 2:
            continue
        box = tuple(
            range(min(p[a].start for p in parts), max(p[a][-1] for p in parts) + 1)
            if all(p[a].step == 1 for p in parts)
            else range(0)
            for a in range(len(parts[0]))
        )
        union = regions.union_size(parts)
        if union == regions.size_of(box) and union < sum(regions.size_of(p) for p in parts):
            out[key] = box
    return out


def _small_source_boxes(usage: Usage, small_source_bytes: int) -> dict[KeyPath, Region]:
    """The box of chunks this host touches, for small sources read in several chunks.

    Only where the box holds exactly the touched chunks, so reading it reads
    no byte more than reading them one by one.
    """
    touched: dict[KeyPath, set[tuple[int, ...]]] = collections.defaultdict(set)
    for key, chunk in usage.chunks:
        touched[key].add(chunk)
    out = {}
    for key, chunks in touched.items():
        source = usage.sources[key]
        if len(chunks) < 2 or source.nbytes > small_source_bytes or source.chunk_shape is None:
            continue
        lo = [min(c[a] for c in chunks) for a in range(len(source.shape))]
        hi = [max(c[a] for c in chunks) + 1 for a in range(len(source.shape))]
        if math.prod(h - low for low, h in zip(lo, hi, strict=True)) != len(chunks):
            continue
        first = chunk_region(lo, source.shape, source.chunk_shape)
        last = chunk_region([h - 1 for h in hi], source.shape, source.chunk_shape)
        out[key] = tuple(range(f.start, la.stop) for f, la in zip(first, last, strict=True))
    return out


def range_id(region: Region) -> tuple[int, ...]:
    """A region as a flat tuple of ints: hashable and ordered, unlike ranges."""
    return tuple(x for r in region for x in (r.start, r.stop, r.step))


def chunk_region(chunk: Sequence[int], shape: Sequence[int], grid: Sequence[int]) -> Region:
    """The stored region of chunk `chunk` of a `grid` over `shape`."""
    return tuple(
        range(c * g, min((c + 1) * g, n)) for c, g, n in zip(chunk, grid, shape, strict=True)
    )


def chunk_pieces(
    region: Region, shape: Sequence[int], grid: Sequence[int]
) -> list[tuple[tuple[int, ...], tuple[slice, ...], Region]]:
    """`region` cut at chunk boundaries: (chunk, where in the result, stored region)."""
    per_axis = []
    for r, n, g in zip(region, shape, grid, strict=True):
        g = max(g, 1)
        sizes = [min(g, n - start) for start in range(0, n, g)]
        per_axis.append(list(regions.pieces(r, sizes)))
    out = []
    for combo in itertools.product(*per_axis):
        chunk = tuple(c for c, _, _ in combo)
        at = tuple(slice(pos.start, pos.stop) for _, pos, _ in combo)
        sub = tuple(
            range(s.start + c * g, s.stop + c * g, s.step)
            for (c, _, s), g in zip(combo, grid, strict=True)
        )
        out.append((chunk, at, sub))
    return out


def local_region(sub: Region, chunk: Sequence[int], grid: Sequence[int]) -> Region:
    """A stored region relative to the start of its chunk."""
    return tuple(
        range(r.start - c * g, r.stop - c * g, r.step)
        for r, c, g in zip(sub, chunk, grid, strict=True)
    )
