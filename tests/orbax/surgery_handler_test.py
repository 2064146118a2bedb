"""End to end: plain Orbax saves, SurgeryRestore restores, on 8 CPU devices."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from fixtures import counting_reads, random_array, save, sds, sharded
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orbax_surgery as osurg

RULES = (
    osurg.Rename(r'params/dense_(\d+)/(.*)', r'params/Dense_\1/\2'),
    osurg.Copy('params/embed/embedding', 'params/lm_head/kernel'),
    osurg.Transpose('params/lm_head/kernel', (1, 0)),
    osurg.Cast('params/lm_head/kernel', 'bfloat16'),
    osurg.Drop('opt_state/.*'),
)


@pytest.fixture
def state(mesh8):
    return {
        'params': {
            'dense_0': {
                'kernel': sharded(random_array((64, 32), seed=1), mesh8, 'x'),
                'bias': random_array((32,), seed=2),
            },
            'embed': {'embedding': sharded(random_array((128, 64), seed=3), mesh8, None, 'x')},
        },
        'opt_state': {'mu': sharded(random_array((64, 32), seed=4), mesh8, 'x')},
        'step': 12,
    }


@pytest.fixture
def manager_dir(tmp_path, state):
    manager = ocp.CheckpointManager(tmp_path / 'run')
    manager.save(12, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    return tmp_path / 'run'


def target(mesh):
    return {
        'params': {
            'Dense_0': {
                'kernel': sds((64, 32), sharding=NamedSharding(mesh, P('b', 'a'))),
                'bias': sds((32,), sharding=NamedSharding(mesh, P())),
            },
            'embed': {'embedding': sds((128, 64), sharding=NamedSharding(mesh, P('a')))},
            'lm_head': {
                'kernel': sds((64, 128), np.dtype('bfloat16'), NamedSharding(mesh, P(None, 'b')))
            },
        },
        'step': 0,
    }


def check(out, state, mesh):
    params = state['params']
    np.testing.assert_array_equal(out['params']['Dense_0']['kernel'], params['dense_0']['kernel'])
    np.testing.assert_array_equal(out['params']['Dense_0']['bias'], params['dense_0']['bias'])
    embedding = np.asarray(params['embed']['embedding'])
    np.testing.assert_array_equal(out['params']['embed']['embedding'], embedding)
    np.testing.assert_array_equal(
        out['params']['lm_head']['kernel'], embedding.T.astype('bfloat16')
    )
    assert out['params']['lm_head']['kernel'].sharding == NamedSharding(mesh, P(None, 'b'))
    assert out['params']['Dense_0']['kernel'].sharding == NamedSharding(mesh, P('b', 'a'))
    assert out['step'] == 12 and type(out['step']) is int


def test_checkpoint_manager_restore_returns_the_target_tree(manager_dir, state, mesh2x4):
    out = ocp.CheckpointManager(manager_dir).restore(
        12, args=osurg.SurgeryRestore(target=target(mesh2x4), rules=RULES)
    )
    check(out, state, mesh2x4)


def test_composite_item_restores_beside_other_items(tmp_path, state, mesh2x4):
    manager = ocp.CheckpointManager(tmp_path / 'run')
    manager.save(
        1,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({'lr': 0.1})
        ),
    )
    manager.wait_until_finished()
    out = ocp.CheckpointManager(tmp_path / 'run').restore(
        1,
        args=ocp.args.Composite(
            state=osurg.SurgeryRestore(target=target(mesh2x4), rules=RULES),
            meta=ocp.args.JsonRestore(),
        ),
    )
    check(out.state, state, mesh2x4)
    assert out.meta == {'lr': 0.1}


def test_checkpointer_restore_and_plan_restore(manager_dir, state, mesh2x4):
    item = manager_dir / '12' / 'default'
    plan = osurg.plan_restore(item, target(mesh2x4), RULES)
    assert plan.errors == () and [s.key for s in plan.steps if not s.lazy] == []
    assert dict(plan.dropped) == {'opt_state/mu': RULES[-1]}
    with ocp.Checkpointer(osurg.SurgeryCheckpointHandler()) as ckptr:
        out = ckptr.restore(item, args=osurg.SurgeryRestore(target=target(mesh2x4), rules=RULES))
    check(out, state, mesh2x4)


def test_surgery_save_writes_a_plain_orbax_checkpoint(tmp_path, state, mesh2x4):
    manager = ocp.CheckpointManager(tmp_path / 'run')
    manager.save(3, args=osurg.SurgerySave(item=state))
    manager.wait_until_finished()
    out = manager.restore(3, args=osurg.SurgeryRestore(target=target(mesh2x4), rules=RULES))
    check(out, state, mesh2x4)
    plain = ocp.CheckpointManager(tmp_path / 'run').restore(3, args=ocp.args.StandardRestore())
    np.testing.assert_array_equal(plain['opt_state']['mu'], state['opt_state']['mu'])
    with ocp.Checkpointer(osurg.SurgeryCheckpointHandler()) as ckptr:
        as_saved = ckptr.restore(tmp_path / 'run' / '3' / 'default')
    assert as_saved['step'] == 12


def test_restore_reads_only_what_the_target_needs(tmp_path, mesh8):
    big = random_array((1024, 256))
    save(tmp_path / 'c', {'w': sharded(big, mesh8, 'x')})
    args = osurg.SurgeryRestore(target={'w': ...}, rules=[osurg.Slice('w', np.s_[:256])])
    with counting_reads() as read, ocp.Checkpointer(osurg.SurgeryCheckpointHandler()) as ckptr:
        out = ckptr.restore(tmp_path / 'c', args=args)
    np.testing.assert_array_equal(out['w'], big[:256])
    assert read[0] < 0.3 * big.nbytes


def test_errors_come_before_any_array_data_is_read(tmp_path, mesh8):
    big = random_array((1024, 256))
    save(tmp_path / 'c', {'w': sharded(big, mesh8, 'x')})
    args = osurg.SurgeryRestore(target={'w': sds((1024, 255))})
    with counting_reads() as read, ocp.Checkpointer(osurg.SurgeryCheckpointHandler()) as ckptr:
        with pytest.raises(
            osurg.ShapeMismatchError,
            match=r"'w' has shape \(1024, 255\), but 'w' gives \(1024, 256\)",
        ):
            ckptr.restore(tmp_path / 'c', args=args)
    assert read[0] < 0.01 * big.nbytes


def test_positional_args_and_non_rules_are_rejected(manager_dir):
    handler = osurg.SurgeryCheckpointHandler()
    with pytest.raises(osurg.SurgeryError, match=r'pass it as args=SurgeryRestore\(...\)'):
        handler.restore(manager_dir / '12' / 'default', osurg.SurgeryRestore(target={}))
    with pytest.raises(osurg.RuleError, match=r'rules\[0\] is a Transform'):
        osurg.SurgeryRestore(target={}, rules=[ocp.Transform(original_key='a')])
    with pytest.raises(osurg.SurgeryError, match='max_inflight_bytes must be positive'):
        osurg.SurgeryRestore(max_inflight_bytes=0)


def test_concrete_targets_give_sharding_and_fallback_values(manager_dir, state, mesh8):
    init = jax.device_put(np.full((8, 4), 7.0, np.float32), NamedSharding(mesh8, P('x')))
    kernel = jax.device_put(np.zeros((64, 32), np.float32), NamedSharding(mesh8, P(None, 'x')))
    out = ocp.CheckpointManager(manager_dir).restore(
        12,
        args=osurg.SurgeryRestore(
            target={'params': {'dense_0': {'kernel': kernel}, 'head': init}},
            rules=[
                osurg.Fallback('params/head'),
                osurg.Drop(r'opt_state/.*|step|params/(embed|dense_0/bias).*'),
            ],
        ),
    )
    assert out['params']['dense_0']['kernel'].sharding == kernel.sharding
    np.testing.assert_array_equal(
        out['params']['dense_0']['kernel'], state['params']['dense_0']['kernel']
    )
    np.testing.assert_array_equal(out['params']['head'], init)


def test_restore_with_no_target_gives_what_the_rules_leave(manager_dir, state):
    out = ocp.CheckpointManager(manager_dir).restore(
        12,
        args=osurg.SurgeryRestore(
            rules=[osurg.Drop('opt_state/.*'), osurg.Rename('step', 'global_step')]
        ),
    )
    assert sorted(out) == ['global_step', 'params']
    np.testing.assert_array_equal(
        out['params']['embed']['embedding'], state['params']['embed']['embedding']
    )


def test_tied_weights_are_read_once(tmp_path, mesh8):
    embedding = random_array((2048, 256))
    path = save(tmp_path / 'c', {'embed': sharded(embedding, mesh8, 'x')})
    cols = NamedSharding(mesh8, P(None, 'x'))
    handler = osurg.SurgeryCheckpointHandler()  # No chunk cache: the session reads once.

    def restore(target, rules):
        with counting_reads() as read, ocp.Checkpointer(handler) as ckptr:
            out = ckptr.restore(
                path,
                args=osurg.SurgeryRestore(target=target, rules=rules, max_inflight_bytes=2**20),
            )
        return out, read[0]

    _, alone = restore({'embed': sds((2048, 256), sharding=cols)}, [])
    out, tied = restore(
        {'embed': sds((2048, 256), sharding=cols), 'lm_head': sds((256, 2048), sharding=cols)},
        [osurg.Copy('embed', 'lm_head'), osurg.Transpose('lm_head', (1, 0))],
    )
    np.testing.assert_array_equal(out['lm_head'], embedding.T)
    assert tied <= 1.05 * alone, (tied, alone)
