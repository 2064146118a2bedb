"""One process of the peer-death tests: process 1 SIGKILLs itself in the middle of a job.

Usage: peer_death_worker.py PORT N PID DEVICES WORKDIR CASE RECOVERABLE

Both processes first save step 1 through a CheckpointManager (both alive).
Then, by CASE:
  save     a SurgerySave (Stack rule) of step 2; process 1 dies at its first block.
  restore  a SurgeryRestore of step 1; process 1 dies at its first block.
  export   save_safetensors of the live tree; process 1 dies at its first block.
  hang     as export, but process 1 stops itself (SIGSTOP): alive, never arriving.
  coordinator  as export, but process 0, which hosts the coordination service, dies.
The survivor prints one JSON line with what happened: the error's type and message,
or the values it checked. RECOVERABLE=1 sets `jax_enable_recoverability`, which
keeps JAX's coordination service from terminating the survivor when the peer's
heartbeats stop.
"""

import json
import os
import signal
import sys
import time

import jax
from job import join

case, recoverable = sys.argv[6:8]
HEARTBEAT_S = 4
jax.config.update('jax_enable_recoverability', recoverable == '1')
workdir = join(
    heartbeat_timeout_seconds=HEARTBEAT_S, shutdown_timeout_seconds=5, initialization_timeout=60
).workdir

import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import orbax_surgery as osurg  # noqa: E402
from orbax_surgery.huggingface.export import save_safetensors  # noqa: E402

# Of every barrier below: Orbax's (AsyncOptions) and the export's. Without recoverability
# it is longer than the heartbeat timeout, to show that JAX then ends the survivor itself.
TIMEOUT_S = 3 if recoverable == '1' else 60
LAYERS, ROWS, COLS = 4, 256, 128

mesh = Mesh(np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id))), ('x',))
rows = NamedSharding(mesh, P('x'))
values = {
    f'layers_{i}/w': np.random.default_rng(i).standard_normal((ROWS, COLS)).astype(np.float32)
    for i in range(LAYERS)
}
tree = {
    f'layers_{i}': {
        'w': jax.make_array_from_callback((ROWS, COLS), rows, values[f'layers_{i}/w'].__getitem__)
    }
    for i in range(LAYERS)
}


def manager() -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        async_options=ocp.AsyncOptions(timeout_secs=TIMEOUT_S),
        create=True,
    )
    return ocp.CheckpointManager(f'{workdir}/run', options=options)


DYING = 0 if case == 'coordinator' else 1


def die_here(*_) -> None:
    """Process `DYING` leaves the job: killed (SIGKILL), or hung (SIGSTOP) for `hang`."""
    if jax.process_index() == DYING:
        print(f'process {DYING} leaves', flush=True)
        os.kill(os.getpid(), signal.SIGSTOP if case == 'hang' else signal.SIGKILL)


with manager() as m:
    m.save(1, args=osurg.SurgerySave(item=tree))
    m.wait_until_finished()

result: dict = {'process': jax.process_index(), 'case': case}
start = time.monotonic()
try:
    if case == 'save':
        stacked = NamedSharding(mesh, P(None, 'x'))
        stacked_leaf = jax.ShapeDtypeStruct((LAYERS, ROWS, COLS), np.float32, sharding=stacked)
        target = {'layers': {'w': stacked_leaf}}
        stack = osurg.Stack(r'layers_{i}/w', 'layers/w')
        args = osurg.SurgerySave(item=tree, target=target, rules=[stack], progress=die_here)
        with manager() as m:
            m.save(2, args=args)
            m.wait_until_finished()
    elif case == 'restore':
        leaf = jax.ShapeDtypeStruct((ROWS, COLS), np.float32, sharding=rows)
        target = {f'layers_{i}': {'w': leaf} for i in range(LAYERS)}
        kill = osurg.MapValue(r'layers_.*', lambda x: die_here() or x, elementwise=True, out=leaf)
        # Without CheckpointManager: nothing waits for the peer.
        out = osurg.restore(f'{workdir}/run/1/default', target, [kill])
        checked = 0
        for key, want in values.items():
            for shard in out[key.split('/')[0]]['w'].addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])
                checked += 1
        result['shards_checked'] = checked
        # Through CheckpointManager: Orbax's Checkpointer waits for every process at the end.
        with manager() as m:
            m.restore(1, args=osurg.SurgeryRestore(target=target))
    else:
        save_safetensors(tree, f'{workdir}/hf', peer_timeout_secs=TIMEOUT_S, progress=die_here)
    result['error'] = None
except Exception as e:  # What the survivor sees is the result.
    result['error'] = type(e).__name__
    result['message'] = str(e)[:2000]
    result['is_surgery_error'] = isinstance(e, osurg.SurgeryError)
result['seconds'] = round(time.monotonic() - start, 1)
print(json.dumps(result), flush=True)
