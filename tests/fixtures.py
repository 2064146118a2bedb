"""Helpers shared by the tests: checkpoints, arrays and read counters."""

import contextlib
from collections.abc import Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from orbax_surgery.arrays import regions


def file_bytes_read() -> int:
    """TensorStore's count of bytes read from local files in this process."""
    metrics = ts.experimental_collect_matching_metrics('/tensorstore/kvstore/file/bytes_read')
    return sum(v['value'] for m in metrics for v in m['values'])


@contextlib.contextmanager
def counting_reads() -> Iterator[list[int]]:
    """Yields a one-item list that holds the bytes read inside the block."""
    box = [0]
    start = file_bytes_read()
    yield box
    box[0] = file_bytes_read() - start


def save(path, tree) -> str:
    """Saves `tree` with plain Orbax (StandardCheckpointer) and returns the path."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree)
    return str(path)


def sharded(array, mesh, *spec):
    return jax.device_put(array, NamedSharding(mesh, P(*spec)))


def sds(shape, dtype=np.float32, sharding=None):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def random_array(shape, dtype=np.float32, seed=0):
    """Incompressible values, so bytes read on disk track bytes needed."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(dtype)


@st.composite
def axis_request(draw, n):
    """A range of indices into an axis of size n: strided, maybe backwards."""
    if n == 0:
        return range(0)
    step = draw(st.integers(1, 3)) * draw(st.sampled_from([1, -1]))
    a, b = sorted(draw(st.lists(st.integers(0, n), min_size=2, max_size=2)))
    return range(n)[a:b:step] if step > 0 else range(n)[b:a:step]


class NumpyContext:
    """Serves whole arrays from memory and records every read."""

    def __init__(self, values):
        self.values = values
        self.reads = []
        self.whole_calls = 0

    async def read(self, source, region):
        self.reads.append((source.key, region))
        return regions.take(self.values[source.key], region)

    async def whole(self, node):
        self.whole_calls += 1
        return await node.evaluate_whole(self)
