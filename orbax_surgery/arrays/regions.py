"""Regions of arrays: one `range` of indices per axis, and how ops map them.

A region is what a shard asks of an array. Ranges compose exactly (a strided
slice of a strided slice is a strided slice), may run backwards, and know their
length, so requests travel from a target shard down to the stored chunks
without over-reading.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

Region = tuple[range, ...]
Shape = tuple[int, ...]


def full(shape: Sequence[int]) -> Region:
    """The region covering all of an array of `shape`."""
    return tuple(range(n) for n in shape)


def from_index(index: Sequence[slice | int], shape: Sequence[int]) -> Region:
    """The region a NumPy-style tuple of slices selects (None, negatives allowed).

    Example:
        >>> from_index((slice(None), slice(2, 4)), (3, 8))
        (range(0, 3), range(2, 4))
    """
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    out = []
    for i, n in zip(index, shape, strict=True):
        if isinstance(i, slice):
            out.append(range(n)[i])
        else:
            out.append(range(n)[i : i + 1 if i != -1 else None])
    return tuple(out)


def shape_of(region: Region) -> Shape:
    """The shape of the block a region selects."""
    return tuple(len(r) for r in region)


def size_of(region: Region) -> int:
    """The number of elements a region selects."""
    return math.prod(len(r) for r in region)


def compose(outer: range, request: range) -> range:
    """Elements `request` of the index sequence `outer`, as one range.

    Example:
        >>> compose(range(10, 50, 2), range(3, 7))
        range(16, 24, 2)
    """
    if not request:
        return range(outer.start, outer.start)
    start = outer[request[0]]
    step = outer.step * request.step
    return range(start, start + step * len(request), step)


def ascending(r: range) -> range:
    """The same indices in increasing order, with a positive step.

    Example:
        >>> ascending(range(0, -1, -1)), ascending(range(9, 0, -4))
        (range(0, 1), range(1, 13, 4))
    """
    if r.step > 0:
        return r
    if len(r) <= 1:
        return range(r[0], r[0] + 1) if r else range(0)
    return r[::-1]


def to_slice(r: range) -> slice:
    """A slice selecting `r` from a NumPy axis (stop may not wrap to -1).

    Example:
        >>> import numpy as np
        >>> np.arange(5)[to_slice(range(3, -1, -1))].tolist()
        [3, 2, 1, 0]
    """
    if not r:
        return slice(0, 0)
    stop: int | None = r[-1] + (1 if r.step > 0 else -1)
    if stop is not None and stop < 0:
        stop = None
    return slice(r[0], stop, r.step)


def take(array: np.ndarray, region: Region) -> np.ndarray:
    """Selects `region` from an in-memory array (a view where NumPy allows)."""
    return array[tuple(to_slice(r) for r in region)]


def split_ascending(region: Region) -> tuple[Region, tuple[int, ...]]:
    """The region with every step positive, and the axes to flip afterwards.

    Stores such as TensorStore read negative-step slices differently from
    NumPy, so sources only ever see positive steps.
    """
    flips = tuple(axis for axis, r in enumerate(region) if r.step < 0 and len(r) > 1)
    return tuple(ascending(r) for r in region), flips


def clip(region: Region, box: Region) -> Region | None:
    """The part of an ascending region inside a unit-step box, or None if empty.

    Example:
        >>> [list(r) for r in clip((range(0, 10, 3),), (range(2, 8),))]
        [[3, 6]]
    """
    out = []
    for r, b in zip(region, box, strict=True):
        lo, hi = _positions_within(r, b.start, b.stop)
        if lo >= hi:
            return None
        out.append(compose(r, range(lo, hi)))
    return tuple(out)


def positions(inner: range, outer: range) -> slice:
    """Where the elements of `inner` sit in `outer` (both ascending, same step).

    Example:
        >>> positions(range(3, 9, 3), range(0, 10, 3))
        slice(1, 3, None)
    """
    start = (inner.start - outer.start) // outer.step
    return slice(start, start + len(inner))


def pieces(request: range, sizes: Sequence[int]) -> Iterator[tuple[int, range, range]]:
    """Splits a request along a concatenated axis into per-piece requests.

    Yields `(piece, positions, request_in_piece)` in output order, where
    `positions` are the indices within `request` that the piece provides.

    Example:
        >>> [(p, list(k), list(r)) for p, k, r in pieces(range(1, 6, 2), [2, 4])]
        [(0, [0], [1]), (1, [1, 2], [1, 3])]
    """
    found = []
    offset = 0
    for piece, n in enumerate(sizes):
        lo, hi = _positions_within(request, offset, offset + n)
        if lo < hi:
            positions = range(lo, hi)
            sub = compose(request, positions)
            found.append(
                (lo, piece, positions, range(sub.start - offset, sub.stop - offset, sub.step))
            )
        offset += n
    for _, piece, positions, sub in sorted(found, key=lambda item: item[0]):
        yield piece, positions, sub


def _positions_within(request: range, lo: int, hi: int) -> tuple[int, int]:
    """The positions k where lo <= request[k] < hi, as [first, last+1)."""
    if request.step > 0:
        return bisect.bisect_left(request, lo), bisect.bisect_left(request, hi)
    first = bisect.bisect_left(request, 1 - hi, key=lambda x: -x)
    last = bisect.bisect_left(request, 1 - lo, key=lambda x: -x)
    return first, last


def chunk_ids(r: range, chunk: int) -> list[int]:
    """The chunk numbers along one axis that the indices `r` touch."""
    if not r:
        return []
    r = ascending(r)
    if r.step <= chunk:
        return list(range(r[0] // chunk, r[-1] // chunk + 1))
    return sorted({i // chunk for i in r})


def chunk_cover(region: Region, chunk_shape: Sequence[int]) -> Iterable[tuple[int, ...]]:
    """Every chunk (as a tuple of chunk numbers) that `region` touches."""
    per_axis = [chunk_ids(r, max(c, 1)) for r, c in zip(region, chunk_shape, strict=True)]
    return itertools.product(*per_axis)


def chunk_nbytes(
    ids: tuple[int, ...], shape: Sequence[int], chunk_shape: Sequence[int], itemsize: int
) -> int:
    """Bytes of one chunk, clipped at the array's edge."""
    sizes = (min(c, n - i * c) if c else n for i, n, c in zip(ids, shape, chunk_shape, strict=True))
    return math.prod(sizes) * itemsize


def reshape_groups(in_shape: Shape, out_shape: Shape) -> list[tuple[range, range]]:
    """Pairs runs of input axes with the runs of output axes they reshape into.

    Each group is the smallest run of axes whose sizes multiply to the same
    number on both sides, so a request maps group by group.

    Example:
        >>> reshape_groups((4, 6, 5), (4, 2, 3, 5))
        [(range(0, 1), range(0, 1)), (range(1, 2), range(1, 3)), (range(2, 3), range(3, 4))]
    """
    if not in_shape or not out_shape or math.prod(in_shape) == 0:
        return [(range(len(in_shape)), range(len(out_shape)))]
    groups = []
    i = j = 0
    while i < len(in_shape) and j < len(out_shape):
        i0, j0 = i, j
        a, b = in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while a != b:
            if a < b:
                a *= in_shape[i]
                i += 1
            else:
                b *= out_shape[j]
                j += 1
        groups.append([i0, i, j0, j])
    groups[-1][1], groups[-1][3] = len(in_shape), len(out_shape)
    return [(range(i0, i1), range(j0, j1)) for i0, i1, j0, j1 in groups]


class ReshapeMap:
    """Maps a request on `reshape(x, out_shape)` to a request on `x`, and back.

    Axes that a reshape leaves alone pass the request through unchanged; split
    or merged axes read the bounding box of the elements they need and gather.
    """

    def __init__(self, in_shape: Shape, out_shape: Shape):
        self.in_shape, self.out_shape = in_shape, out_shape
        self.groups = reshape_groups(in_shape, out_shape)

    def input_region(self, request: Region) -> tuple[Region, list[np.ndarray | None]]:
        """The input region to read, and per group the gather indices (None: reshape)."""
        in_region: list[range] = [range(0)] * len(self.in_shape)
        gathers: list[np.ndarray | None] = []
        for ins, outs in self.groups:
            req = [request[o] for o in outs]
            if len(ins) == 1 and len(outs) == 1:
                in_region[ins[0]] = req[0]
                gathers.append(None)
                continue
            if ins and not all(req):  # Nothing requested: no index arrays (an axis may be 2**40).
                for i in ins:
                    in_region[i] = range(0)
                gathers.append(None)
                continue
            in_group = tuple(self.in_shape[i] for i in ins)
            out_group = tuple(self.out_shape[o] for o in outs)
            box_of_run = _box_of_run(_flat_run(req, out_group), in_group) if ins else None
            if box_of_run is not None:  # A run of consecutive elements: no index arrays.
                for i, r in zip(ins, box_of_run, strict=True):
                    in_region[i] = r
                gathers.append(None)
                continue
            flat = _flat_indices(req, out_group)
            coords = np.unravel_index(flat.ravel(), in_group) if in_group else ()
            box = [range(int(c.min()), int(c.max()) + 1) if c.size else range(0) for c in coords]
            for i, r in zip(ins, box, strict=True):
                in_region[i] = r
            box_shape = tuple(len(r) for r in box)
            if in_group and flat.size:
                local = np.ravel_multi_index(
                    tuple(c - r.start for c, r in zip(coords, box, strict=True)), box_shape
                ).reshape(flat.shape)
            else:
                local = np.zeros(flat.shape, dtype=np.intp)
            exact = local.size == math.prod(box_shape) and bool(
                np.all(local.ravel() == np.arange(local.size))
            )
            gathers.append(None if exact else local)
        return tuple(in_region), gathers

    def finish(
        self, block: np.ndarray, request: Region, gathers: list[np.ndarray | None]
    ) -> np.ndarray:
        """Turns the input block read for `request` into the output block."""
        pos = 0
        for (ins, outs), gather in zip(self.groups, gathers, strict=True):
            shape = block.shape
            merged = (
                shape[:pos] + (math.prod(shape[pos : pos + len(ins)]),) + shape[pos + len(ins) :]
            )
            block = block.reshape(merged)
            if gather is None:
                want = tuple(len(request[o]) for o in outs)
                block = block.reshape(shape[:pos] + want + shape[pos + len(ins) :])
            else:
                block = np.take(block, gather, axis=pos)
            pos += len(outs)
        return block


def _flat_run(request: Sequence[range], group_shape: Shape) -> tuple[int, int] | None:
    """`[lo, hi)` when a request selects consecutive elements in C order, else None.

    That is: single indices, then one ascending step-1 range, then whole axes.
    """
    k = 0
    while k < len(request) - 1 and len(request[k]) == 1:
        k += 1
    if any(r != range(n) for r, n in zip(request[k + 1 :], group_shape[k + 1 :], strict=True)):
        return None
    if not request or request[k].step != 1 and len(request[k]) > 1:
        return None
    inner = math.prod(group_shape[k + 1 :])
    lo = 0
    for r, n in zip(request[: k + 1], group_shape[: k + 1], strict=True):
        lo = lo * n + r[0]
    lo *= inner
    return lo, lo + len(request[k]) * inner


def _box_of_run(run: tuple[int, int] | None, shape: Shape) -> Region | None:
    """The region of an array of `shape` holding exactly the elements `[lo, hi)`, if any."""
    if run is None:
        return None
    lo, hi = run
    for j in range(len(shape)):
        inner = math.prod(shape[j + 1 :])
        outer = shape[j] * inner
        if lo % inner or hi % inner or lo // outer != (hi - 1) // outer:
            continue
        head = []
        rest = lo // outer
        for n in reversed(shape[:j]):
            head.append(range(rest % n, rest % n + 1))
            rest //= n
        start = lo // inner % shape[j]
        tail = [range(n) for n in shape[j + 1 :]]
        return (*reversed(head), range(start, start + (hi - lo) // inner), *tail)
    return None


def _flat_indices(request: Sequence[range], group_shape: Shape) -> np.ndarray:
    """C-order flat indices, within a group of axes, of the requested elements."""
    if not group_shape:
        return np.zeros((), dtype=np.intp)
    grids = np.ix_(*[np.asarray(r, dtype=np.intp) for r in request])
    return np.ravel_multi_index(grids, group_shape)


def union_size(parts: Sequence[Region], max_cells: int = 1 << 21) -> int:
    """Elements in the union of regions (a strided range counts as its span).

    Counted exactly by cutting each axis at every region boundary; past
    `max_cells` cells it returns the sum of sizes, an upper bound.

    Example:
        >>> union_size([(range(0, 4), range(0, 4)), (range(2, 6), range(2, 6))])
        28
    """
    parts = list(dict.fromkeys(parts))
    if len(parts) <= 1:
        return size_of(parts[0]) if parts else 0
    # Not min(r): that walks every index of the range, for ever on a huge array.
    spans = [
        [(min(r[0], r[-1]), max(r[0], r[-1]) + 1) if r else (0, 0) for r in part] for part in parts
    ]
    cuts = [sorted({b for span in spans for b in span[axis]}) for axis in range(len(spans[0]))]
    cells = math.prod(max(len(c) - 1, 0) for c in cuts)
    if cells > max_cells:
        return sum(size_of(p) for p in parts)
    covered = np.zeros([max(len(c) - 1, 0) for c in cuts], dtype=bool)
    for span in spans:
        covered[
            tuple(
                slice(bisect.bisect_left(c, lo), bisect.bisect_left(c, hi))
                for c, (lo, hi) in zip(cuts, span, strict=True)
            )
        ] = True
    # Python ints where a product of widths could pass int64 (arrays of over 2**62 elements).
    wide = math.prod(c[-1] - c[0] for c in cuts if c) >= 2**62
    widths = np.ix_(*[np.diff(c).astype(object if wide else np.int64) for c in cuts])
    return int(np.sum(covered * math.prod(widths)))
