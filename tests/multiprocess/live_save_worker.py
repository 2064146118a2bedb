"""One process of the 2-process live-tree save test: SurgerySave with rules from live arrays."""

import json

import jax
from job import join

workdir = join().workdir

import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import orbax_surgery as osurg  # noqa: E402

LAYERS, ROWS, COLS = 3, 64, 32
mesh = Mesh(np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id))), ('x',))
rows = NamedSharding(mesh, P('x'))
values = [
    np.random.default_rng(i).standard_normal((ROWS, COLS)).astype(np.float32) for i in range(3)
]
tree = {
    f'layers_{i}': {'w': jax.make_array_from_callback((ROWS, COLS), rows, v.__getitem__)}
    for i, v in enumerate(values)
}
stacked = jax.ShapeDtypeStruct(
    (LAYERS, ROWS, COLS), np.float32, sharding=NamedSharding(mesh, P(None, 'x'))
)
args = osurg.SurgerySave(
    item=tree, target={'layers': {'w': stacked}}, rules=[osurg.Stack(r'layers_{i}/w', 'layers/w')]
)
with ocp.CheckpointManager(f'{workdir}/run') as manager:
    manager.save(1, args=args)
    manager.wait_until_finished()
    restored = manager.restore(1, args=osurg.SurgeryRestore(target={'layers': {'w': stacked}}))
checked = 0
for shard in restored['layers']['w'].addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), np.stack(values)[shard.index])
    checked += 1

# A transpose sharded by rows needs columns, i.e. rows of the input that the other process holds.
transposed = jax.ShapeDtypeStruct((COLS, ROWS), np.float32, sharding=rows)
try:
    osurg.apply_rules(
        tree,
        {'t': transposed},
        [
            osurg.Transpose('layers_0/w', (1, 0)),
            osurg.Rename('layers_0/w', 't'),
            osurg.Drop('layers_[12]/w'),
        ],
    )
    error = None
except osurg.SurgeryError as e:
    error = f'{type(e).__name__}: {e}'
print(json.dumps({'process': jax.process_index(), 'checked': checked, 'error': error}))
