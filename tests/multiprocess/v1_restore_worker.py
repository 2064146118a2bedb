"""One process of the 2-process Orbax v1 test: v1's training Checkpointer saves and restores."""

import json

import jax
from job import file_bytes_read, join

workdir = join().workdir

import numpy as np  # noqa: E402
import orbax.checkpoint.experimental.v1 as v1  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import orbax_surgery as osurg  # noqa: E402

ROWS, COLS = 1024, 512


devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
row_mesh = Mesh(np.array(devices), ('x',))
tile_mesh = Mesh(np.array(devices).reshape(2, 4), ('a', 'b'))
rows = NamedSharding(row_mesh, P('x'))
kernel = np.random.default_rng(0).standard_normal((ROWS, COLS)).astype(np.float32)
layers = [np.full((16, 8), float(i), np.float32) for i in range(2)]


def sharded(value):
    return jax.make_array_from_callback(value.shape, rows, lambda i: value[i])


plain = osurg.SurgerySave(item={'encoder': {'kernel': sharded(kernel)}})
scanned = osurg.SurgerySave(  # Surgery on save: written in the background, then finalized.
    item={f'layers_{i}': {'w': sharded(layer)} for i, layer in enumerate(layers)},
    rules=[osurg.Stack(r'layers_{i}/(.*)', r'layers/\1')],
)
tiles = NamedSharding(tile_mesh, P('a', 'b'))
restore = osurg.SurgeryRestore(
    target={'Encoder': {'kernel': jax.ShapeDtypeStruct((ROWS, COLS), np.float32, sharding=tiles)}},
    rules=[osurg.Rename(r'encoder/(.*)', r'Encoder/\1')],
)
everywhere = NamedSharding(row_mesh, P())
stacked = osurg.SurgeryRestore(
    target={'layers': {'w': jax.ShapeDtypeStruct((2, 16, 8), np.float32, sharding=everywhere)}}
)
with v1.training.Checkpointer(f'{workdir}/run') as ckptr:
    ckptr.save_checkpointables(1, {'params': plain, 'scanned': scanned})
    before = file_bytes_read()
    out = ckptr.load_checkpointables(1, {'params': restore})['params']
    read = file_bytes_read() - before
    back = ckptr.load_checkpointables(1, {'scanned': stacked})['scanned']

got = out['Encoder']['kernel']
assert got.sharding == tiles
checked = 0
for shard in got.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), kernel[shard.index])
    checked += 1
for shard in back['layers']['w'].addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), np.stack(layers))
print(
    json.dumps(
        {
            'process': jax.process_index(),
            'shards_checked': checked,
            'bytes_read': read,
            'checkpoint_bytes': kernel.nbytes,
        }
    )
)
