"""Surgery through Orbax v1's own entry points: load_checkpointables, save_checkpointables,
the training Checkpointer and a context-local registry, on checkpoints saved by v0 and by v1."""

import gc
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orbax_surgery as osurg

v1 = pytest.importorskip('orbax.checkpoint.experimental.v1')

KERNEL = np.arange(32.0, dtype=np.float32).reshape(8, 4)
STATE = {'dense': {'kernel': KERNEL, 'bias': np.ones(4, np.float32)}, 'step': np.array(3, np.int32)}


def rules():
    return [
        osurg.Rename(r'dense/(.*)', r'Dense/\1'),
        osurg.Transpose('Dense/kernel', (1, 0)),
        osurg.Drop('step'),
    ]


def target(mesh=None):
    sharding = None if mesh is None else NamedSharding(mesh, P(None, 'x'))
    return {
        'Dense': {
            'kernel': jax.ShapeDtypeStruct((4, 8), np.float32, sharding=sharding),
            'bias': ...,
        }
    }


def assert_surgery_result(out, sharding=None):
    np.testing.assert_array_equal(np.asarray(out['Dense']['kernel']), KERNEL.T)
    np.testing.assert_array_equal(np.asarray(out['Dense']['bias']), np.ones(4, np.float32))
    if sharding is not None:
        assert out['Dense']['kernel'].sharding == sharding
        assert len(out['Dense']['kernel'].addressable_shards) == 8


def test_load_checkpointables_restores_a_v0_manager_step_sharded(tmp_path, mesh8):
    with ocp.CheckpointManager(tmp_path / 'run') as manager:
        manager.save(1, args=ocp.args.StandardSave(STATE))
    args = osurg.SurgeryRestore(target=target(mesh8), rules=rules())
    out = v1.load_checkpointables(tmp_path / 'run' / '1', {'default': args})
    assert list(out) == ['default']
    assert_surgery_result(out['default'], NamedSharding(mesh8, P(None, 'x')))


def test_load_checkpointables_restores_a_v1_state_beside_other_items(tmp_path):
    v1.save_checkpointables(tmp_path / 'ckpt', {'state': STATE, 'extra': {'a': np.zeros(2)}})
    args = osurg.SurgeryRestore(target=target(), rules=rules())
    out = v1.load_checkpointables(tmp_path / 'ckpt', {'state': args, 'extra': None})
    assert_surgery_result(out['state'])
    np.testing.assert_array_equal(out['extra']['a'], np.zeros(2))


def test_a_bad_rule_raises_while_blocking_not_as_an_incompatible_handler(tmp_path):
    v1.save_checkpointables(tmp_path / 'ckpt', {'state': STATE})
    args = osurg.SurgeryRestore(target={'x': ...}, rules=[osurg.Rename('dense/kernl', 'x')])
    with pytest.raises(osurg.UnmatchedKeyError, match=re.escape("'dense/kernl'")):
        v1.load_checkpointables(tmp_path / 'ckpt', {'state': args})


def test_surgery_save_writes_a_pytree_v1_loads_plainly(tmp_path):
    scanned = osurg.SurgerySave(
        item={'layers_0': {'w': np.zeros(3)}, 'layers_1': {'w': np.ones(3)}},
        rules=[osurg.Stack(r'layers_{i}/(.*)', r'layers/\1')],
    )
    v1.save_checkpointables(tmp_path / 'ckpt', {'params': scanned})
    meta = v1.checkpointables_metadata(tmp_path / 'ckpt').metadata['params']
    assert meta['layers']['w'].shape == (2, 3)
    out = v1.load_checkpointables(tmp_path / 'ckpt', {'params': None})['params']
    np.testing.assert_array_equal(out['layers']['w'], [[0.0] * 3, [1.0] * 3])


def test_plain_save_with_checksums_verifies_on_load(tmp_path):
    save = osurg.SurgerySave(item={'w': KERNEL}, checksums=True)
    v1.save_checkpointables(tmp_path / 'ckpt', {'params': save})
    args = osurg.SurgeryRestore(target={'w': ...}, verify=True)
    out = v1.load_checkpointables(tmp_path / 'ckpt', {'params': args})['params']
    np.testing.assert_array_equal(out['w'], KERNEL)


def test_training_checkpointer_saves_steps_keeps_two_and_loads_with_surgery(tmp_path, mesh8):
    keep_two = v1.training.preservation_policies.LatestN(2)
    with v1.training.Checkpointer(tmp_path / 'run', preservation_policy=keep_two) as ckptr:
        for step in (1, 2, 3):
            state = {'dense': {'kernel': KERNEL * step, 'bias': np.ones(4, np.float32)}}
            ckptr.save_checkpointables(step, {'params': osurg.SurgerySave(item=state)})
        assert [c.step for c in ckptr.checkpoints] == [2, 3]
        args = osurg.SurgeryRestore(target=target(mesh8), rules=rules()[:2])
        out = ckptr.load_checkpointables(2, {'params': args})['params']
    np.testing.assert_array_equal(np.asarray(out['Dense']['kernel']), (KERNEL * 2).T)
    assert out['Dense']['kernel'].sharding == NamedSharding(mesh8, P(None, 'x'))


def test_a_context_local_registry_decides(tmp_path):
    v1.save_checkpointables(tmp_path / 'ckpt', {'params': STATE})
    args = osurg.SurgeryRestore(target=target(), rules=rules())
    bare = v1.handlers.local_registry(include_global_registry=False)
    bare.add(v1.handlers.PyTreeHandler)
    ours = v1.handlers.local_registry(bare, include_global_registry=False)
    ours.add(osurg.SurgeryCheckpointableHandler)
    ctx = v1.Context()
    ctx.checkpointables.registry = ours
    with ctx:
        assert_surgery_result(
            v1.load_checkpointables(tmp_path / 'ckpt', {'params': args})['params']
        )
    ctx = v1.Context()
    ctx.checkpointables.registry = bare
    with ctx, pytest.raises(Exception, match="Could not resolve a handler for 'params'"):
        v1.load_checkpointables(tmp_path / 'ckpt', {'params': args})


def test_v1_pytree_entry_points_refuse_surgery_args(tmp_path):
    """`load` and `Checkpointer.load` take pytrees only: use `load_checkpointables`."""
    v1.save_checkpointables(tmp_path / 'ckpt', {'state': STATE})
    args = osurg.SurgeryRestore(target=target(), rules=rules())
    with pytest.raises(TypeError, match='Unsupported abstract leaf type'):
        v1.load(tmp_path / 'ckpt', args)
    with v1.training.Checkpointer(tmp_path / 'run') as ckptr:
        ckptr.save_checkpointables(1, {'state': STATE})
        with pytest.raises(TypeError, match='Unsupported abstract leaf type'):
            ckptr.load(1, args)


@pytest.mark.filterwarnings('ignore::RuntimeWarning')  # v1 drops its directory coroutine.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_the_state_name_is_bound_to_v1s_pytree_handler_for_saving(tmp_path):
    """v1 registers its PyTreeHandler under 'state', and a name beats the type when saving."""
    with pytest.raises(Exception, match='SurgerySave'):
        v1.save_checkpointables(tmp_path / 'ckpt', {'state': osurg.SurgerySave(item=STATE)})
    with v1.training.Checkpointer(tmp_path / 'run') as ckptr:
        with pytest.raises(Exception, match='SurgerySave'):
            ckptr.save(1, osurg.SurgerySave(item=STATE))
    gc.collect()  # v1's dropped coroutine warns here, under this test's filters.


def test_lora_merges_through_the_training_checkpointer(tmp_path):
    params = {'w': np.ones((4, 6), np.float32)}
    lora = osurg.LoraSpec(['w'], rank=2, alpha=4).bind(params)
    trainable = {
        'w_lora_a': np.ones((4, 2), np.float32),
        'w_lora_b': np.full((2, 6), 0.25, np.float32),
    }
    v1.save_checkpointables(tmp_path / 'base', {'params': params})
    with v1.training.Checkpointer(tmp_path / 'run') as ckptr:
        ckptr.save_checkpointables(1, {'adapters': osurg.LoraSave(item=trainable, lora=lora)})
        merge = osurg.LoraRestore(base=tmp_path / 'base' / 'params')
        out = ckptr.load_checkpointables(1, {'adapters': merge})['adapters']
    np.testing.assert_allclose(out['w'], np.full((4, 6), 1 + 2 * 0.5, np.float32))
