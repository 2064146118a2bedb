"""LoraSave and LoraRestore through Orbax: adapters alone, merged, attached, split, and errors."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from fixtures import counting_reads, random_array, save
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orbax_surgery as osurg
from orbax_surgery import (
    LoraCheckpointHandler,
    LoraMismatchError,
    LoraRestore,
    LoraSave,
    LoraSpec,
    LoraTarget,
    SurgeryError,
    UnmatchedKeyError,
)
from orbax_surgery.keys import flatten

BASE = {
    'attn': {'qkv': {'kernel': random_array((16, 4, 8), seed=1)}},
    'mlp': {'kernel': random_array((16, 32), seed=2), 'bias': random_array((32,), seed=3)},
    'layers': {'kernel': random_array((2, 16, 16), seed=4)},
    'head': {'kernel': random_array((16, 4), seed=5)},
}
SPEC = LoraSpec(
    [r'attn/.*/kernel', 'mlp/kernel', LoraTarget('layers/kernel', batch_axes=1, rank=2)],
    rank=4,
    alpha=8,
    train=['head/kernel'],
)
LORA = SPEC.bind(BASE)


def trained():
    """Adapters as after training: B non-zero, the head changed."""
    trainable = LORA.init(BASE, jax.random.key(0), stddev=0.1)
    return jax.tree.map(lambda x: np.asarray(x) + random_array(x.shape, seed=x.size), trainable)


TRAINABLE = trained()
MERGED = LORA.merge(BASE, TRAINABLE)


def target(mesh):
    def leaf(x):
        spec = P('a', 'b') if x.ndim >= 2 else P('b')
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    return jax.tree.map(leaf, BASE)


def assert_tree_close(got, want):
    got, want = flatten(got)[0], flatten(want)[0]
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_allclose(
            np.asarray(got[key]), np.asarray(want[key]), rtol=1e-5, atol=1e-5, err_msg=key
        )


@pytest.fixture
def saved(tmp_path):
    base = save(tmp_path / 'base', BASE)
    with ocp.Checkpointer(LoraCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / 'adapters', args=LoraSave(item=TRAINABLE, lora=LORA))
    return base, tmp_path / 'adapters'


def restore(path, args):
    with ocp.Checkpointer(LoraCheckpointHandler()) as ckptr:
        return ckptr.restore(path, args=args)


def test_manager_saves_adapters_beside_other_items_and_restores_merged(tmp_path, mesh2x4):
    base = save(tmp_path / 'base', BASE)
    opt_state = {'count': np.int32(3), 'mu': TRAINABLE}
    with ocp.CheckpointManager(tmp_path / 'run') as mngr:
        mngr.save(
            7,
            args=ocp.args.Composite(
                adapters=LoraSave(item=TRAINABLE, lora=LORA),
                opt_state=ocp.args.StandardSave(opt_state),
            ),
        )
    with ocp.CheckpointManager(tmp_path / 'run') as mngr:
        out = mngr.restore(
            7,
            args=ocp.args.Composite(
                adapters=LoraRestore(base=base, target=target(mesh2x4)),
                opt_state=ocp.args.StandardRestore(),
            ),
        )
    assert_tree_close(out.adapters, MERGED)
    kernel = out.adapters['attn']['qkv']['kernel']
    assert kernel.sharding.spec == P('a', 'b')
    assert int(out.opt_state['count']) == 3


def test_adapter_checkpoint_holds_only_the_trainable_params_and_the_layout(saved):
    _, adapters = saved
    assert sorted(flatten(ocp.PyTreeCheckpointHandler().metadata(adapters).tree)[0]) == sorted(
        LORA.trainable_keys
    )
    assert osurg.read_lora_layout(adapters) == LORA
    assert_tree_close(restore(adapters, LoraRestore()), TRAINABLE)


def test_adapters_alone_restore_sharded_like_their_weights(saved, mesh2x4):
    _, adapters = saved
    abstract = LORA.abstract_trainable(target(mesh2x4))
    out = restore(adapters, LoraRestore(target=abstract))
    assert_tree_close(out, TRAINABLE)
    assert out['mlp']['kernel_lora_a'].sharding.spec == P('a', None)
    assert out['mlp']['kernel_lora_b'].sharding.spec == P(None, 'b')


def test_merged_restore_reads_only_what_its_shards_need(tmp_path, mesh2x4):
    base = {
        'w': {'kernel': random_array((256, 512), seed=1)},
        'v': {'kernel': random_array((512, 256), seed=2)},
    }
    lora = LoraSpec([r'.*/kernel'], rank=8, alpha=16).bind(base)
    trainable = jax.tree.map(
        lambda x: random_array(x.shape, seed=x.size), lora.init(base, jax.random.key(0))
    )
    save(tmp_path / 'base', base)
    with ocp.Checkpointer(LoraCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / 'adapters', args=LoraSave(item=trainable, lora=lora))
    tgt = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=NamedSharding(mesh2x4, P('a', 'b'))
        ),
        base,
    )
    args = LoraRestore(base=tmp_path / 'base', target=tgt)
    plan = osurg.plan_lora_restore(tmp_path / 'adapters', args)
    assert plan.errors == ()
    with counting_reads() as read:
        out = restore(tmp_path / 'adapters', args)
    assert_tree_close(out, lora.merge(base, trainable))
    # One process holds every shard, so it needs every byte of both checkpoints, once.
    needed = plan.reads[0].needed
    assert needed == sum(x.nbytes for x in jax.tree.leaves((base, trainable)))
    assert 0.9 * needed <= read[0] <= 1.05 * needed  # standard normal floats compress a little
    formulas = {s.key: s.expr.describe() for s in plan.steps}
    assert (
        formulas['w/kernel']
        == 'base/w/kernel + 2 * adapters/w/kernel_lora_a @ adapters/w/kernel_lora_b'
    )


def test_trained_params_replace_the_base_and_the_plan_says_why(saved, mesh2x4):
    base, adapters = saved
    plan = osurg.plan_lora_restore(adapters, LoraRestore(base=base, target=target(mesh2x4)))
    assert [s.expr.describe() for s in plan.steps if s.key == 'head/kernel'] == [
        'adapters/head/kernel'
    ]
    assert plan.dropped[0][0] == 'base/head/kernel'
    assert 'the adapters checkpoint, which holds the same key' in str(plan)


def test_attach_adds_the_adapters_beside_their_weights(saved, mesh2x4):
    base, adapters = saved
    out = restore(adapters, LoraRestore(base=base, target=target(mesh2x4), mode='attach'))
    assert_tree_close(out, LORA.join(BASE, TRAINABLE))
    assert out['attn']['qkv']['kernel_lora_b'].sharding.spec == P(None, 'b', None)


def test_split_gives_frozen_and_trainable_trees(saved, mesh2x4):
    base, adapters = saved
    frozen, trainable = restore(
        adapters, LoraRestore(base=base, target=target(mesh2x4), mode='split')
    )
    assert_tree_close(trainable, TRAINABLE)
    assert 'head' not in frozen
    assert_tree_close(LORA.merge(frozen, trainable), MERGED)


def test_unmerge_recovers_the_base_from_merged_weights(tmp_path, saved, mesh2x4):
    _, adapters = saved
    merged_dir = save(tmp_path / 'merged', jax.tree.map(np.asarray, MERGED))
    out = restore(adapters, LoraRestore(base=merged_dir, target=target(mesh2x4), mode='unmerge'))
    want = {**BASE, 'head': TRAINABLE['head']}
    assert_tree_close(out, want)


def test_base_rules_map_a_train_state_checkpoint_onto_the_target(tmp_path, saved, mesh2x4):
    _, adapters = saved
    state = save(tmp_path / 'state', {'params': BASE, 'opt_state': {'mu': BASE['mlp']}, 'step': 3})
    args = LoraRestore(
        base=state,
        target=target(mesh2x4),
        base_rules=[osurg.Rename('params/(.*)', r'\1'), osurg.Drop('opt_state/.*|step')],
    )
    assert_tree_close(restore(adapters, args), MERGED)


def test_a_matching_spec_is_accepted_and_a_different_one_named(saved, mesh2x4):
    base, adapters = saved
    out = restore(adapters, LoraRestore(base=base, target=target(mesh2x4), lora=SPEC))
    assert_tree_close(out, MERGED)
    other = LoraSpec(SPEC.targets, rank=8, alpha=8, train=['head/kernel'])
    with pytest.raises(LoraMismatchError, match=r"'attn/qkv/kernel'.*rank=8.*has rank=4"):
        restore(adapters, LoraRestore(base=base, target=target(mesh2x4), lora=other))
    with pytest.raises(
        LoraMismatchError, match=r"adapts 'layers/kernel', which the given spec does not"
    ):
        restore(
            adapters,
            LoraRestore(lora=LoraSpec([r'attn/.*/kernel'], rank=4, alpha=8, train=['head/kernel'])),
        )


def test_a_checkpoint_without_lora_metadata_says_so(saved):
    base, adapters = saved
    with pytest.raises(LoraMismatchError, match='not saved with LoraSave'):
        restore(base, LoraRestore())


def test_a_base_without_the_adapted_weight_names_close_keys(tmp_path, saved):
    _, adapters = saved
    renamed = dict(BASE, MLP=BASE['mlp'])
    del renamed['mlp']
    base = save(tmp_path / 'renamed', renamed)
    with pytest.raises(UnmatchedKeyError, match=r"needs 'mlp/kernel'.*Did you mean 'MLP/kernel'"):
        restore(adapters, LoraRestore(base=base))


def test_a_base_of_another_shape_is_named(tmp_path, saved):
    _, adapters = saved
    base = save(
        tmp_path / 'other',
        dict(BASE, mlp={'kernel': np.zeros((16, 40), np.float32), 'bias': BASE['mlp']['bias']}),
    )
    with pytest.raises(LoraMismatchError, match=r"'mlp/kernel' has shape \(16, 40\).*\(16, 32\)"):
        restore(adapters, LoraRestore(base=base))


def test_merge_target_with_adapter_keys_points_to_attach(saved):
    base, adapters = saved
    with pytest.raises(SurgeryError, match="mode='attach'"):
        restore(adapters, LoraRestore(base=base, target=LORA.join(BASE, TRAINABLE)))


def test_bad_restore_args_fail_when_built():
    with pytest.raises(SurgeryError, match="mode 'merged' is not one of"):
        LoraRestore(base='x', mode='merged')
    with pytest.raises(SurgeryError, match='needs base='):
        LoraRestore(mode='split')


def test_save_checks_the_item_before_orbax_starts(tmp_path):
    with pytest.raises(UnmatchedKeyError, match='pass lora=spec.bind'):
        LoraSave(item=TRAINABLE, lora=SPEC)
    broken = jax.tree.map(lambda x: x, TRAINABLE)
    broken['mlp']['kernel_lora_b'] = np.zeros((3, 32), np.float32)
    with pytest.raises(LoraMismatchError, match=r"'mlp/kernel_lora_b'.*\(3, 32\).*needs \(4, 32\)"):
        LoraSave(item=broken, lora=LORA)
    missing = {k: v for k, v in TRAINABLE.items() if k != 'head'}
    with pytest.raises(UnmatchedKeyError, match="'head/kernel' is trained in full"):
        LoraSave(item=missing, lora=LORA)


def test_save_with_a_spec_binds_it_to_a_joined_item(tmp_path):
    joined = LORA.join(BASE, TRAINABLE)
    with ocp.Checkpointer(LoraCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / 'a', args=LoraSave(item=joined, lora=SPEC))
    assert_tree_close(restore(tmp_path / 'a', LoraRestore()), TRAINABLE)
    assert osurg.read_lora_layout(tmp_path / 'a') == LORA


def test_merge_adapters_is_a_rule_for_a_checkpoint_holding_both(tmp_path, mesh2x4):
    from orbax_surgery.lora import MergeAdapters

    joined = save(tmp_path / 'joined', jax.tree.map(np.asarray, LORA.join(BASE, TRAINABLE)))
    with ocp.Checkpointer(osurg.SurgeryCheckpointHandler()) as ckptr:
        out = ckptr.restore(
            joined, args=osurg.SurgeryRestore(target=target(mesh2x4), rules=[MergeAdapters(LORA)])
        )
    assert_tree_close(out, MERGED)
