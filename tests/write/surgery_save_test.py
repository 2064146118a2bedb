"""Surgery on save: another layout, written as an ordinary Orbax checkpoint."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from fixtures import random_array, sds, sharded
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orbax_surgery as osurg
from orbax_surgery.arrays import expr as ex
from orbax_surgery.arrays import ops
from orbax_surgery.write import surgery_save

L = 4
STACK = osurg.Stack(r'layers_{i}/(.*)', r'layers/\1')
UNROLL = osurg.Unstack(r'layers/(.*)', r'layers_{i}/\1')


@pytest.fixture
def unrolled(mesh8):
    tree = {
        f'layers_{i}': {
            'w': sharded(random_array((16, 64), seed=i), mesh8, None, 'x'),
            'b': random_array((64,), seed=10 + i),
        }
        for i in range(L)
    }
    tree['step'] = 7
    return tree


def manager(path):
    return ocp.CheckpointManager(path, item_handlers=osurg.SurgeryCheckpointHandler())


def plain_restore(path):
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path)


def test_an_unrolled_model_saves_scanned_one_layer_per_chunk(tmp_path, unrolled, mesh8):
    with manager(tmp_path / 'run') as mgr:
        mgr.save(
            1, args=osurg.SurgerySave(item=unrolled, rules=[STACK], layer_axes={'layers/.*': 0})
        )
    path = tmp_path / 'run' / '1' / 'default'
    out = plain_restore(path)  # Plain Orbax reads it.
    stacked = np.stack([np.asarray(unrolled[f'layers_{i}']['w']) for i in range(L)])
    np.testing.assert_array_equal(out['layers']['w'], stacked)
    np.testing.assert_array_equal(out['layers']['b'][2], unrolled['layers_2']['b'])
    assert out['step'] == 7
    assert out['layers']['w'].sharding == NamedSharding(mesh8, P(None, None, 'x'))
    stored = osurg.OrbaxCheckpoint(path).arrays
    assert stored['layers/w'].chunk_shape == (1, 16, 8)  # One layer of one device's shard.
    assert stored['layers/b'].chunk_shape == (1, 64)
    with manager(tmp_path / 'run') as mgr:
        back = mgr.restore(1, args=osurg.SurgeryRestore(target=unrolled, rules=[UNROLL]))
    for i in range(L):
        np.testing.assert_array_equal(back[f'layers_{i}']['w'], unrolled[f'layers_{i}']['w'])
        assert back[f'layers_{i}']['w'].sharding == unrolled[f'layers_{i}']['w'].sharding


def test_a_scanned_model_saves_unrolled_with_a_target_layout(tmp_path, mesh8):
    scanned = {'layers': {'w': sharded(random_array((L, 16, 64)), mesh8, None, None, 'x')}}
    rows = NamedSharding(mesh8, P('x'))
    target = {f'layers_{i}': {'w': sds((16, 64), np.dtype('bfloat16'), rows)} for i in range(L)}
    rules = [UNROLL, osurg.Cast(r'layers_\d+/w', 'bfloat16')]
    with ocp.Checkpointer(osurg.SurgeryCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / 'c', args=osurg.SurgerySave(item=scanned, rules=rules, target=target))
    out = plain_restore(tmp_path / 'c')
    for i in range(L):
        got = out[f'layers_{i}']['w']
        np.testing.assert_array_equal(got, np.asarray(scanned['layers']['w'][i]).astype(got.dtype))
        assert got.dtype == np.dtype('bfloat16') and got.sharding == rows


def test_layer_chunks_without_rules_and_with_plain_orbax(tmp_path, mesh8):
    scanned = {'layers': {'w': sharded(random_array((L, 16, 64)), mesh8, None, None, 'x')}}
    with ocp.Checkpointer(osurg.SurgeryCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / 'a', args=osurg.SurgerySave(item=scanned, layer_axes={'layers/w': 0}))
    with ocp.StandardCheckpointer() as ckptr:
        save_args = osurg.layer_save_args(scanned, {r'layers/.*': 0})
        ckptr.save(tmp_path / 'b', scanned, save_args=save_args)
    for name in 'ab':
        source = osurg.OrbaxCheckpoint(tmp_path / name)
        assert source.arrays['layers/w'].chunk_shape == (1, 16, 8)
        np.testing.assert_array_equal(
            plain_restore(tmp_path / name)['layers']['w'], scanned['layers']['w']
        )
    with pytest.raises(osurg.RuleError, match=r"layer_axes pattern 'layer/.\*' matches none"):
        osurg.layer_save_args(scanned, {'layer/.*': 0})
    with pytest.raises(osurg.RuleError, match=r"Layer axis 3 is out of range for 'layers/w'"):
        osurg.layer_save_args(scanned, {'layers/w': 3})
    with pytest.raises(osurg.RuleError, match=r"layer_axes pattern 'layer/.\*' matches none"):
        osurg.SurgerySave(item=scanned, layer_axes={'layer/.*': 0})  # Before Orbax starts.


def test_the_converted_tree_is_computed_a_few_leaves_at_a_time(tmp_path, unrolled, monkeypatch):
    groups = []
    compute = surgery_save.compute_leaves

    async def spy(steps, source, budget, *args):
        groups.append(sum(surgery_save._host_bytes(s) for s in steps))
        return await compute(steps, source, budget, *args)

    monkeypatch.setattr(surgery_save, 'compute_leaves', spy)
    budget = 2 * 16 * 64 * 4  # Two layers of w.
    with ocp.Checkpointer(osurg.SurgeryCheckpointHandler()) as ckptr:
        ckptr.save(
            tmp_path / 'c',
            args=osurg.SurgerySave(
                item=unrolled,
                rules=[osurg.Rename(r'layers_(\d+)/(.*)', r'block_\1/\2')],
                max_inflight_bytes=budget,
            ),
        )
    assert len(groups) > 2 and max(groups) <= budget
    out = plain_restore(tmp_path / 'c')
    np.testing.assert_array_equal(out['block_3']['w'], unrolled['layers_3']['w'])


def test_a_failed_save_leaves_no_finalized_checkpoint_and_can_be_retried(tmp_path, unrolled):
    def fails(x):
        if not isinstance(x, jax.core.Tracer):  # Planning traces it; writing runs it.
            raise RuntimeError('disk on fire')
        return x

    broken = [STACK, osurg.MapValue('step', fails, elementwise=True)]
    with manager(tmp_path / 'run') as mgr:
        with pytest.raises(osurg.RuleError, match='disk on fire'):
            mgr.save(1, args=osurg.SurgerySave(item=unrolled, rules=broken, max_inflight_bytes=1))
            mgr.wait_until_finished()
        assert mgr.all_steps() == []
    with manager(tmp_path / 'run') as mgr:
        assert mgr.all_steps() == []
        with pytest.raises(osurg.UnmatchedKeyError, match='Stack.*matches none'):
            osurg.SurgerySave(item={'w': np.ones(2)}, rules=[STACK])  # Before Orbax starts.
        assert mgr.all_steps() == []
        mgr.save(1, args=osurg.SurgerySave(item=unrolled, rules=[STACK]))
        mgr.wait_until_finished()
        assert mgr.all_steps() == [1]


def test_inferred_shardings_follow_the_inputs(mesh8, mesh2x4):
    values = {
        'w': sharded(random_array((4, 8, 16)), mesh2x4, None, 'b', 'a'),
        'v': sharded(random_array((8, 16)), mesh2x4, 'b', 'a'),
    }
    w = ex.Source('w', (4, 8, 16), np.dtype('float32'))
    v = ex.Source('v', (8, 16), np.dtype('float32'))

    def spec(node):
        return surgery_save.natural_sharding(node, values).spec

    assert spec(ops.Index.of(w, 2)) == P('b', 'a')
    assert spec(ops.Index.of(w, np.s_[:, :4])) == P(None, None, 'a')  # A cut axis is not split.
    assert spec(ops.Stack((v, v), 0)) == P(None, 'b', 'a')
    assert spec(ops.Transpose(v, (1, 0))) == P('a', 'b')
    assert spec(ops.Cast(v, np.dtype('bfloat16'))) == P('b', 'a')
    assert surgery_save.natural_sharding(ops.Reshape(v, (16, 8)), values) is None
    other = {**values, 'u': sharded(random_array((8, 16)), mesh2x4, 'a', 'b')}
    u = ex.Source('u', (8, 16), np.dtype('float32'))
    assert surgery_save.natural_sharding(ops.Stack((v, u), 0), other) is None


def test_save_args_follow_the_saved_tree(tmp_path, mesh8):
    item = {'w': sharded(random_array((8, 64)), mesh8, None, 'x'), 'b': np.ones(3, np.float32)}
    rules = [osurg.Rename('w', 'kernel')]
    good = {'kernel': ocp.SaveArgs(dtype=np.dtype('bfloat16')), 'b': None}
    with ocp.Checkpointer(osurg.SurgeryCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / 'c', args=osurg.SurgerySave(item=item, rules=rules, save_args=good))
    with pytest.raises(osurg.RuleError, match='save_args must have the structure of the saved'):
        osurg.SurgerySave(item=item, rules=rules, save_args={'w': None, 'b': None})
    out = plain_restore(tmp_path / 'c')
    assert out['kernel'].dtype == np.dtype('bfloat16')
    np.testing.assert_array_equal(out['b'], item['b'])


def test_progress_reports_every_byte_saved(tmp_path):
    unrolled = {f'layers_{i}': {'w': random_array((8, 16), seed=i)} for i in range(3)}
    done = []
    args = osurg.SurgerySave(
        item=unrolled, rules=[osurg.Stack(r'layers_{i}/(.*)', r'layers/\1')], progress=done.append
    )
    with ocp.Checkpointer(osurg.SurgeryCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / 'c', args=args)
    assert sum(done) == args.planned.nbytes == 3 * 8 * 16 * 4
