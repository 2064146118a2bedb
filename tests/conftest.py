import jax

jax.config.update('jax_num_cpu_devices', 8)

import contextlib  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402
import tensorstore as ts  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402


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


@pytest.fixture
def mesh8():
    return jax.make_mesh((8,), ('x',))


@pytest.fixture
def mesh2x4():
    return jax.make_mesh((2, 4), ('a', 'b'))


def sharded(array, mesh, *spec):
    return jax.device_put(array, NamedSharding(mesh, P(*spec)))


def sds(shape, dtype=np.float32, sharding=None):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def random_array(shape, dtype=np.float32, seed=0):
    """Incompressible values, so bytes read on disk track bytes needed."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(dtype)
