"""One process of the 2-process checksums test: saves with checksums, verifies a restore."""

import json
import shutil

import jax
from job import join

workdir = join().workdir

import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import orbax_surgery as osurg  # noqa: E402

ROWS, COLS = 512, 64
values = np.random.default_rng(0).standard_normal((ROWS, COLS)).astype(np.float32)
devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
rows = NamedSharding(Mesh(np.array(devices), ('x',)), P('x'))
tiles = NamedSharding(Mesh(np.array(devices).reshape(2, 4), ('a', 'b')), P('a', 'b'))
tree = {
    'w': jax.make_array_from_callback((ROWS, COLS), rows, lambda i: values[i]),
    'b': np.arange(5.0),
}
handlers = {'state': osurg.SurgeryCheckpointHandler(use_ocdbt=False)}
with ocp.CheckpointManager(f'{workdir}/run', item_handlers=handlers) as manager:
    manager.save(1, args=ocp.args.Composite(state=osurg.SurgerySave(item=tree, checksums=True)))
item = f'{workdir}/run/1/state'
with open(f'{item}/_CHECKSUMS/process_{jax.process_index()}.json') as f:
    mine = json.load(f)['arrays']

target = {'w': jax.ShapeDtypeStruct((ROWS, COLS), np.float32, sharding=tiles), 'b': ...}
restored = osurg.restore(item, target, verify=True)
checked = 0
for shard in restored['w'].addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), values[shard.index])
    checked += 1

# Chunk 5 (rows 320..383, written and read by process 1) replaced by chunk 6: valid data,
# wrong values. Only the process that reads it can notice, and it must.
multihost_utils.sync_global_devices('checksums_worker.restored')
if jax.process_index() == 0:
    shutil.copyfile(f'{item}/w/6.0', f'{item}/w/5.0')
multihost_utils.sync_global_devices('checksums_worker.swapped')
try:
    osurg.restore(item, target, verify=True)
    error = None
except osurg.SurgeryError as e:
    error = f'{type(e).__name__}: {e}'
multihost_utils.sync_global_devices('checksums_worker.done')
print(
    json.dumps(
        {
            'process': jax.process_index(),
            'keys': sorted(mine),
            'w_blocks': sorted(mine['w']['blocks']),
            'shards_checked': checked,
            'error_after_swap': error,
        }
    )
)
