"""Estimated reads: the bytes each process needs and the whole chunks it reads, per leaf."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence

import jax

from orbax_surgery.arrays import expr as ex
from orbax_surgery.arrays import regions
from orbax_surgery.keys import KeyPath
from orbax_surgery.rules.target import TargetLeaf


@dataclasses.dataclass(frozen=True)
class Reads:
    """Bytes one process reads: what its shards need, and the whole chunks read.

    `needed` counts each stored element once however many shards or targets use
    it; `chunked` counts each stored chunk once, as the host reads it.
    """

    needed: int = 0
    chunked: int = 0

    @property
    def amplification(self) -> float:
        return self.chunked / self.needed if self.needed else 1.0


def process_regions(leaf: TargetLeaf) -> dict[int, list[regions.Region]]:
    """The distinct regions of a leaf each process materializes."""
    assert leaf.shape is not None, f'unresolved target {leaf.key!r}'
    if leaf.kind != 'jax.Array':
        return {p: [regions.full(leaf.shape)] for p in range(jax.process_count())}
    if leaf.sharding is None:
        return {jax.process_index(): [regions.full(leaf.shape)]}
    out: dict[int, list[regions.Region]] = collections.defaultdict(list)
    for device, index in leaf.sharding.devices_indices_map(leaf.shape).items():
        region = regions.from_index(index, leaf.shape)
        process = device.process_index  # type: ignore[attr-defined]
        if region not in out[process]:
            out[process].append(region)
    return out


def estimate(
    leaves: Sequence[tuple[TargetLeaf, ex.Expr]],
) -> tuple[dict[int, Reads], dict[KeyPath, Reads]]:
    """Chunk-aligned bytes read per process, each chunk counted once per process.

    A byte-addressable source (safetensors) reads exactly the elements needed.
    """
    needed: dict[int, set[tuple[KeyPath, regions.Region]]] = collections.defaultdict(set)
    chunks: dict[int, set[tuple[KeyPath, tuple[int, ...]]]] = collections.defaultdict(set)
    by_leaf: dict[KeyPath, Reads] = {}
    sources: dict[KeyPath, ex.Source] = {}
    here = jax.process_index()
    for leaf, expr in leaves:
        if isinstance(expr, ex.Constant):
            continue
        leaf_needed: set[tuple[KeyPath, regions.Region]] = set()
        leaf_chunks: set[tuple[KeyPath, tuple[int, ...]]] = set()
        for pid, regs in process_regions(leaf).items():
            for region in regs:
                for src, sub in expr.requests(region):
                    sources[src.key] = src
                    needed[pid].add((src.key, sub))
                    ids = set()
                    if not src.byte_ranges:
                        grid = src.chunk_shape or src.shape
                        ids = {(src.key, c) for c in regions.chunk_cover(sub, grid)}
                    chunks[pid] |= ids
                    if pid == here:
                        leaf_needed.add((src.key, sub))
                        leaf_chunks |= ids
        by_leaf[leaf.key] = _reads(leaf_needed, leaf_chunks, sources)
    totals = {pid: _reads(needed[pid], chunks[pid], sources) for pid in needed}
    return totals, by_leaf


def _reads(
    needed: set[tuple[KeyPath, regions.Region]],
    chunks: set[tuple[KeyPath, tuple[int, ...]]],
    sources: Mapping[KeyPath, ex.Source],
) -> Reads:
    by_source: dict[KeyPath, list[regions.Region]] = collections.defaultdict(list)
    for key, region in needed:
        by_source[key].append(region)
    by_key = {
        k: regions.union_size(rs) * sources[k].dtype.itemsize for k, rs in sorted(by_source.items())
    }
    need = sum(by_key.values())
    chunked = sum(n for k, n in by_key.items() if sources[k].byte_ranges)
    for key, ids in chunks:
        src = sources[key]
        chunked += regions.chunk_nbytes(
            ids, src.shape, src.chunk_shape or src.shape, src.dtype.itemsize
        )
    return Reads(need, chunked)
