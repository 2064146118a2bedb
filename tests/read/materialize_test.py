import asyncio

import jax
import numpy as np
import pytest
from fixtures import random_array, sds
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orbax_surgery as osurg
from orbax_surgery.read import materialize as mat


@pytest.mark.parametrize(
    'spec',
    [P('x'), P(None, 'x'), P(), P('x', None)],
    ids=['rows', 'cols', 'replicated', 'rows-explicit'],
)
def test_each_distinct_shard_is_read_once(mesh8, spec):
    value = random_array((64, 32))
    source = osurg.TreeSource({'w': value})
    sharding = NamedSharding(mesh8, spec)
    plan = osurg.resolve(source.arrays, {'w': sds((64, 32), sharding=sharding)})
    out = osurg.materialize(plan, source)
    np.testing.assert_array_equal(out['w'], value)
    assert out['w'].sharding == sharding
    assert source.bytes_read['w'] == value.nbytes


def test_a_transposed_target_reads_each_shard_from_the_right_place(mesh2x4):
    value = random_array((16, 24))
    source = osurg.TreeSource({'w': value})
    sharding = NamedSharding(mesh2x4, P('b', 'a'))
    plan = osurg.resolve(
        source.arrays, {'w': sds((24, 16), sharding=sharding)}, [osurg.Transpose('w', (1, 0))]
    )
    out = osurg.materialize(plan, source)
    for shard in out['w'].addressable_shards:
        np.testing.assert_array_equal(shard.data, value.T[shard.index])
    assert source.bytes_read['w'] == value.nbytes


def test_host_kinds_come_back_as_numpy_and_python_scalars():
    source = osurg.TreeSource({'n': np.arange(3), 's': 5, 'f': 2.5})
    out = osurg.materialize(osurg.resolve(source.arrays, {'n': ..., 's': ..., 'f': 0.0}), source)
    assert isinstance(out['n'], np.ndarray) and out['s'] == 5 and type(out['s']) is int
    assert type(out['f']) is float and out['f'] == 2.5


def test_a_whole_array_function_runs_once_for_all_shards(mesh8):
    calls = []

    def normalize(x):
        if not isinstance(x, jax.core.Tracer):  # Planning traces it once, abstractly.
            calls.append(x.shape)
        return x / x.sum()

    source = osurg.TreeSource({'w': np.arange(1.0, 65.0, dtype=np.float32).reshape(8, 8)})
    target = {'w': sds((8, 8), sharding=NamedSharding(mesh8, P('x')))}
    plan = osurg.resolve(source.arrays, target, [osurg.MapValue('w', normalize)])
    out = osurg.materialize(plan, source)
    np.testing.assert_allclose(out['w'], np.arange(1.0, 65.0).reshape(8, 8) / 2080, rtol=1e-6)
    assert calls == [(8, 8)]


def test_a_fallback_jax_array_is_placed_with_the_target_sharding(mesh8):
    init = jax.device_put(np.ones((8, 2), np.float32), NamedSharding(mesh8, P('x')))
    source = osurg.TreeSource({'w': np.zeros(3)})
    plan = osurg.resolve(source.arrays, {'head': init}, [osurg.Fallback('head'), osurg.Drop('w')])
    out = osurg.materialize(plan, source)
    assert out['head'].sharding == init.sharding and source.bytes_read['w'] == 0
    np.testing.assert_array_equal(out['head'], init)


def test_budget_bounds_bytes_in_flight_first_come_first_served():
    budget = mat._Budget(100)
    state = {'now': 0, 'peak': 0}
    order = []

    async def job(i, n):
        async with budget.hold(n):
            state['now'] += min(n, 100)
            state['peak'] = max(state['peak'], state['now'])
            order.append(i)
            await asyncio.sleep(0.001)
            state['now'] -= min(n, 100)

    async def main():
        await asyncio.gather(*(job(i, n) for i, n in enumerate([60, 60, 30, 500, 10])))

    asyncio.run(main())
    assert state['peak'] <= 100
    assert order == [0, 1, 2, 3, 4]


def test_run_sync_works_inside_a_running_event_loop():
    async def inner():
        return 42

    async def outer():
        return mat.run_sync(inner())

    assert asyncio.run(outer()) == 42


def test_materialize_raises_the_plans_first_error_before_reading():
    source = osurg.TreeSource({'w': np.zeros(3)})
    plan = osurg.resolve(source.arrays, {'v': sds((3,))})
    with pytest.raises(osurg.UnmatchedKeyError, match="target 'v'"):
        osurg.materialize(plan, source)
    assert source.bytes_read['w'] == 0


def test_apply_rules_reports_errors_before_computing():
    with pytest.raises(osurg.UnmatchedKeyError, match="'v'"):
        osurg.apply_rules({'w': np.zeros(3)}, {'v': ...})


def test_numpy_scalar_targets_keep_their_type():
    out = osurg.apply_rules({'lr': np.float32(0.5)}, {'lr': np.float32(0)})
    assert type(out['lr']) is np.float32 and out['lr'] == 0.5


def test_progress_hook_sees_every_block_once(mesh8):
    value = random_array((64, 32))
    source = osurg.TreeSource({'w': value, 'b': np.ones(4)})
    target = {'w': sds((64, 32), sharding=NamedSharding(mesh8, P('x'))), 'b': ...}
    seen = []
    osurg.materialize(osurg.resolve(source.arrays, target), source, on_bytes=seen.append)
    assert sorted(seen) == sorted([32] + [8 * 32 * 4] * 8)


class FailingSource(osurg.TreeSource):
    """Fails one key's reads after a pause, while the other leaves wait for budget."""

    async def read(self, source, region):
        if source.key == 'bad':
            await asyncio.sleep(0.01)
            raise osurg.SourceReadError('disk on fire')
        await asyncio.sleep(0.05)
        return await super().read(source, region)


def test_a_failed_read_cancels_the_rest_cleanly(caplog):
    tree = {'bad': np.zeros(4), **{f'w{i}': np.zeros((64, 64)) for i in range(6)}}
    source = FailingSource(tree)
    plan = osurg.resolve(source.arrays, {k: ... for k in tree})
    with pytest.raises(osurg.SourceReadError, match='disk on fire'):
        osurg.materialize(plan, source, max_inflight_bytes=64 * 64 * 8 * 2)
    assert not [
        r for r in caplog.records if 'destroyed' in r.getMessage() or 'exception' in r.getMessage()
    ]


def test_scalars_made_into_arrays_come_back_as_numpy_arrays():
    # A 'scalar' kind of shape (2,) or (1,) raised ValueError from .item().
    tree = {'layers_0': {'w': 3.0}, 'layers_1': {'w': 2.0}, 'b': 1.5}
    rules = [osurg.Stack(r'layers_{i}/(.*)', r's/\1'), osurg.Reshape('b', (1,))]
    out = osurg.apply_rules(tree, None, rules)
    np.testing.assert_array_equal(out['s']['w'], np.array([3.0, 2.0]))
    np.testing.assert_array_equal(out['b'], np.array([1.5]))
    assert osurg.apply_rules({'b': 1.5}, None, [osurg.Cast('b', 'float32')])['b'] == 1.5
