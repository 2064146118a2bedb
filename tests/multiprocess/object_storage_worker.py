"""One process of the 2-process object-storage test, against the parent's S3 emulator.

Restores from s3:// (an Orbax checkpoint both processes saved, and a safetensors
export both wrote from their live shards), reporting the bytes TensorStore
requested from S3 against what its own shards hold.
"""

import json

import jax
from job import join

job = join()

import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import tensorstore as ts  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import orbax_surgery as osurg  # noqa: E402
from orbax_surgery.sources.orbax_checkpoint import ORBAX_READ_GAP_BYTES  # noqa: E402

bucket = job.args[0]
ROWS, COLS = 512, 256


def s3_total(metric='bytes_read'):
    metrics = ts.experimental_collect_matching_metrics(f'/tensorstore/kvstore/s3/{metric}')
    return sum(v.get('value', 0) for m in metrics for v in m['values'])


def restore_counted(manager, **handler_options):
    before = s3_total(), s3_total('read')
    if handler_options:  # Registered for this manager's item: its options apply.
        handler = osurg.SurgeryCheckpointHandler(**handler_options)
        with ocp.Checkpointer(handler) as checkpointer:
            out = checkpointer.restore(
                manager.directory / '1' / 'default', args=osurg.SurgeryRestore(target=target)
            )
    else:
        out = manager.restore(1, args=osurg.SurgeryRestore(target=target))
    return out, s3_total() - before[0], s3_total('read') - before[1]


devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
rows = NamedSharding(Mesh(np.array(devices), ('x',)), P('x'))
values = {
    n: np.random.default_rng(i).standard_normal((ROWS, COLS)).astype(np.float32)
    for i, n in enumerate('ab')
}
live = {
    n: jax.make_array_from_callback((ROWS, COLS), rows, lambda i, v=v: v[i])
    for n, v in values.items()
}
# Restored onto every other row block: each process's blocks lie in both processes' files,
# between blocks it does not need.
interleaved = [devices[i // 2 + (i % 2) * (len(devices) // 2)] for i in range(len(devices))]
every_other = NamedSharding(Mesh(np.array(interleaved), ('x',)), P('x'))
target = {n: jax.ShapeDtypeStruct((ROWS, COLS), np.float32, sharding=every_other) for n in values}
mine = sum(ROWS * COLS * 4 // len(devices) for _ in values for d in every_other.addressable_devices)

with ocp.CheckpointManager(f'{bucket}/run') as manager:
    manager.save(1, args=ocp.args.StandardSave(live))
    manager.wait_until_finished()
with ocp.CheckpointManager(f'{bucket}/run') as manager:
    out, orbax_read, orbax_requests = restore_counted(manager)
    _, orbax_gap_read, orbax_gap_requests = restore_counted(
        manager, read_gap_bytes=ORBAX_READ_GAP_BYTES
    )

osurg.save_safetensors(live, f'{bucket}/hf', max_shard_size='400KB')  # From the live shards.
source = osurg.SafetensorsCheckpoint(f'{bucket}/hf')  # Headers read here.
before = s3_total()
hf = osurg.restore(source, target)
hf_read = s3_total() - before

checked = 0
for tree in (out, hf):
    for name, array in tree.items():
        for shard in array.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), values[name][shard.index])
            checked += 1
print(
    json.dumps(
        {
            'process': jax.process_index(),
            'checked': checked,
            'own_bytes': mine,
            'orbax_read': orbax_read,
            'orbax_requests': orbax_requests,
            'orbax_gap_read': orbax_gap_read,
            'orbax_gap_requests': orbax_gap_requests,
            'hf_read': hf_read,
            'total': sum(v.nbytes for v in values.values()),
        }
    )
)
