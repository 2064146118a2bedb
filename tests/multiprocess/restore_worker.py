"""One process of the 2-process restore test: saves with Orbax, restores with surgery."""

import json

import jax
from job import file_bytes_read, join

workdir = join().workdir

import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import orbax_surgery as osurg  # noqa: E402

ROWS, COLS = 1024, 512


def full(seed):
    return np.random.default_rng(seed).standard_normal((ROWS, COLS)).astype(np.float32)


devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
row_mesh = Mesh(np.array(devices), ('x',))
tile_mesh = Mesh(np.array(devices).reshape(2, 4), ('a', 'b'))
saved = NamedSharding(row_mesh, P('x'))
values = {name: full(seed) for seed, name in enumerate(['kernel', 'embedding'])}
tree = {
    'encoder': {
        'layer_0': {
            'kernel': jax.make_array_from_callback(
                (ROWS, COLS), saved, lambda i: values['kernel'][i]
            )
        },
        'embed': {
            'embedding': jax.make_array_from_callback(
                (ROWS, COLS), saved, lambda i: values['embedding'][i]
            )
        },
    }
}
manager = ocp.CheckpointManager(f'{workdir}/run')
manager.save(1, args=ocp.args.StandardSave(tree))
manager.wait_until_finished()

tiles = NamedSharding(tile_mesh, P('a', 'b'))
target = {
    'Encoder': {
        'Layer_0': {'kernel': jax.ShapeDtypeStruct((ROWS, COLS), np.float32, sharding=tiles)},
        'Embed': {'embedding': jax.ShapeDtypeStruct((ROWS, COLS), np.float32, sharding=tiles)},
    }
}
rules = [
    osurg.Rename(r'encoder/layer_(\d+)/(.*)', r'Encoder/Layer_\1/\2'),
    osurg.Rename(r'encoder/embed/(.*)', r'Encoder/Embed/\1'),
]
plan = osurg.plan_restore(f'{workdir}/run/1/default', target, rules)
before = file_bytes_read()
out = ocp.CheckpointManager(f'{workdir}/run').restore(
    1, args=osurg.SurgeryRestore(target=target, rules=rules)
)
read = file_bytes_read() - before

checked = 0
for got, name in [
    (out['Encoder']['Layer_0']['kernel'], 'kernel'),
    (out['Encoder']['Embed']['embedding'], 'embedding'),
]:
    assert got.sharding == tiles
    for shard in got.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), values[name][shard.index])
        checked += 1
checkpoint_bytes = sum(v.nbytes for v in values.values())
print(
    json.dumps(
        {
            'process': jax.process_index(),
            'shards_checked': checked,
            'bytes_read': read,
            'checkpoint_bytes': checkpoint_bytes,
            'planned': plan.reads[jax.process_index()].chunked,
            'planned_other': plan.reads[1 - jax.process_index()].chunked,
        }
    )
)
