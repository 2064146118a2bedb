"""A process of the load tests: saves a step, or restores one and reports its memory.

    python tests/load_worker.py save ROOT STEP MIB
    python tests/load_worker.py restore ROOT STEP MIB BUDGET_BYTES

Values are a function of key and step (`expected`), so any process can check
any step it restores without the saver's help. The last line printed is JSON.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

ARRAYS = 4
COLS = 1024


def rows(mib: float) -> int:
    """Rows of each float32 array, so that the `ARRAYS` arrays hold `mib` MiB in all."""
    return max(8, int(mib * 2**20 / (ARRAYS * COLS * 4)) // 8 * 8)


def expected(step: int, mib: float) -> dict[str, np.ndarray]:
    """The saved tree of `step`: distinct exact float32 integers per array and step."""
    base = (np.arange(rows(mib) * COLS, dtype=np.int64) % 65521).reshape(rows(mib), COLS)
    return {
        f'layer_{i}': {'kernel': (base + 100_000 * i + 1_000_000 * step).astype(np.float32)}
        for i in range(ARRAYS)
    }


def renamed(tree: dict) -> dict:
    """The restored tree's structure: `layer_i/kernel` becomes `blocks/i/w`."""
    return {'blocks': {str(i): {'w': tree[f'layer_{i}']['kernel']} for i in range(ARRAYS)}}


def _status(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def save(root: str, step: int, mib: float) -> dict:
    """Saves `step` sharded by rows on 8 devices: 8 chunks, the shards of a restore."""
    import jax
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import orbax_surgery as osurg

    rows_8 = NamedSharding(jax.make_mesh((8,), ('x',)), P('x'))
    tree = jax.device_put(expected(step, mib), rows_8)
    start = time.monotonic()
    with ocp.CheckpointManager(root, item_handlers=osurg.SurgeryCheckpointHandler()) as manager:
        manager.save(step, args=osurg.SurgerySave(item=tree))
        manager.wait_until_finished()
    return {'step': step, 'wall_s': time.monotonic() - start}


def restore(root: str, step: int, mib: float, budget: int) -> dict:
    import jax
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import orbax_surgery as osurg

    sharding = NamedSharding(jax.make_mesh((8,), ('x',)), P('x'))
    want = renamed(expected(step, mib))
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), want)
    args = osurg.SurgeryRestore(
        target=target,
        rules=[osurg.Rename(r'layer_(\d+)/kernel', r'blocks/\1/w')],
        max_inflight_bytes=budget,
    )
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    with ocp.CheckpointManager(root, options=options) as manager:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # VmHWM restarts from the current RSS.
        baseline = _status('VmRSS')
        restored = manager.restore(step, args=args)
        jax.block_until_ready(restored)
        peak = _status('VmHWM') - baseline
    equal = all(
        np.array_equal(np.asarray(got), w)
        for got, w in zip(jax.tree.leaves(restored), jax.tree.leaves(want), strict=True)
    )
    return {
        'equal': equal,
        'peak_rss_over_baseline': peak,
        'result_bytes': sum(a.nbytes for a in jax.tree.leaves(want)),
    }


if __name__ == '__main__':
    import jax

    jax.config.update('jax_num_cpu_devices', 8)
    mode, root, step, mib = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    if mode == 'save':
        print(json.dumps(save(root, step, mib)))
    else:
        print(json.dumps(restore(root, step, mib, int(sys.argv[5]))))
