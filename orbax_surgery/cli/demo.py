"""The demo: save with plain Orbax, restore renamed and resharded, check values."""

from __future__ import annotations

import tempfile
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from orbax_surgery.orbax.surgery_handler import SurgeryRestore
from orbax_surgery.read.restore import plan_restore
from orbax_surgery.rules.moves import Copy, Drop, Rename
from orbax_surgery.rules.values import Cast, Transpose
from orbax_surgery.units import format_bytes

VOCAB, WIDTH, LAYERS = 512, 128, 2
RULES = (
    Rename(r'params/dense_(\d+)/(.*)', r'params/Dense_\1/\2'),
    Copy('params/embed/embedding', 'params/lm_head/kernel'),
    Transpose('params/lm_head/kernel', (1, 0)),
    Cast('params/lm_head/kernel', 'bfloat16'),
    Drop('opt_state/.*'),
)


def run_demo(directory: epath.PathLike | None = None, echo: Callable[[str], None] = print) -> bool:
    """Runs the demo in `directory` (a temporary one by default); True if all match."""
    if directory is None:
        with tempfile.TemporaryDirectory(prefix='orbax-surgery-demo-') as tmp:
            return _run(epath.Path(tmp), echo)
    return _run(epath.Path(directory), echo)


def _run(directory: epath.Path, echo: Callable[[str], None]) -> bool:
    devices = np.array(jax.devices())
    rows = NamedSharding(jax.sharding.Mesh(devices, ('x',)), P('x'))
    state, saved = _training_state(rows)
    echo(f'1. Saving a training state with plain Orbax (StandardSave) to {directory} ...')
    with ocp.CheckpointManager(directory) as manager:
        manager.save(100, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()

    grid = _grid(devices)
    target = _target(grid)
    echo('2. A new model names its layers Dense_N, ties lm_head to the embedding (transposed,')
    echo(f'   bfloat16), drops the optimizer state and shards over a {grid.devices.shape} mesh.')
    echo('   The plan, before any array is read:\n')
    plan = plan_restore(directory / '100' / 'default', target, RULES)
    echo(str(plan))

    echo('\n3. Restoring through CheckpointManager.restore(step, args=SurgeryRestore(...)) ...')
    before = _bytes_read()
    with ocp.CheckpointManager(directory) as manager:
        restored = manager.restore(100, args=SurgeryRestore(target=target, rules=RULES))
    read = _bytes_read() - before

    echo('4. Checking every restored leaf against the saved arrays:')
    expected = _expected(saved)
    flat_out = {
        jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(restored)
    }
    ok = True
    for key, want in expected.items():
        got = flat_out[key]
        value = np.asarray(got)
        same = np.array_equal(value, want) and value.dtype == want.dtype
        ok &= same
        spec = getattr(getattr(got, 'sharding', None), 'spec', None)
        where = 'on the host' if spec is None else f'sharded {spec}'
        mark = 'ok ' if same else 'BAD'
        echo(f'   {mark} {key:40s} {str(value.shape):12s} {str(value.dtype):9s} {where}')
    echo(
        f'\nPlanned to read {format_bytes(plan.reads[jax.process_index()].chunked)} of the '
        f'{format_bytes(plan.source_bytes)} checkpoint; TensorStore read {format_bytes(read)} '
        'from disk (compressed, with metadata). The optimizer state was never read.'
    )
    echo('All leaves match.' if ok else 'MISMATCH: some leaves differ.')
    return ok


def _bytes_read() -> int:
    metrics = ts.experimental_collect_matching_metrics('/tensorstore/kvstore/file/bytes_read')
    return sum(v['value'] for m in metrics for v in m['values'])


def _training_state(rows: NamedSharding) -> tuple[dict, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    saved = {'embed': rng.standard_normal((VOCAB, WIDTH)).astype(np.float32)}
    for i in range(LAYERS):
        saved[f'dense_{i}/kernel'] = rng.standard_normal((WIDTH, WIDTH)).astype(np.float32)
        saved[f'dense_{i}/bias'] = rng.standard_normal((WIDTH,)).astype(np.float32)
    params = {
        'embed': {'embedding': jax.device_put(saved['embed'], rows)},
        **{
            f'dense_{i}': {
                'kernel': jax.device_put(saved[f'dense_{i}/kernel'], rows),
                'bias': saved[f'dense_{i}/bias'],
            }
            for i in range(LAYERS)
        },
    }
    opt_state = jax.tree.map(lambda x: np.zeros(np.shape(x), np.float32), params)
    return {'params': params, 'opt_state': opt_state, 'step': 100}, saved


def _grid(devices: np.ndarray) -> jax.sharding.Mesh:
    n = len(devices)
    rows = 2 if n % 2 == 0 and n > 1 else 1
    return jax.sharding.Mesh(devices.reshape(rows, n // rows), ('data', 'model'))


def _target(grid: jax.sharding.Mesh) -> dict:
    def sds(shape, spec, dtype=np.float32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(grid, spec))

    params = {
        'embed': {'embedding': sds((VOCAB, WIDTH), P('data', 'model'))},
        'lm_head': {'kernel': sds((WIDTH, VOCAB), P(None, 'model'), np.dtype('bfloat16'))},
    }
    for i in range(LAYERS):
        params[f'Dense_{i}'] = {
            'kernel': sds((WIDTH, WIDTH), P('model', 'data')),
            'bias': sds((WIDTH,), P()),
        }
    return {'params': params, 'step': 0}


def _expected(saved: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {
        "['params']['embed']['embedding']": saved['embed'],
        "['params']['lm_head']['kernel']": saved['embed'].T.astype(np.dtype('bfloat16')),
        "['step']": np.asarray(100),
    }
    for i in range(LAYERS):
        out[f"['params']['Dense_{i}']['kernel']"] = saved[f'dense_{i}/kernel']
        out[f"['params']['Dense_{i}']['bias']"] = saved[f'dense_{i}/bias']
    return out
