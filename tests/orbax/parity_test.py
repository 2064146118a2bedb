"""Where we used to differ from Orbax: each case in memory and through a checkpoint, vs Orbax."""

import typing

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import orbax_surgery as osurg
from orbax_surgery.orbax import manager_items


def assert_same(ours, theirs):
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype, (a, b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def saved(tmp_path, tree) -> str:
    path = str(tmp_path / 'ckpt')
    ocp.PyTreeCheckpointer().save(path, tree)
    return path


# 1. A multi_value_fn gets the original containers, whichever leaves it reads.


@pytest.mark.parametrize('container', [list, tuple], ids=['list', 'tuple'])
def test_multi_value_fn_indexes_a_sequence_of_the_original_tree(tmp_path, container):
    original = {'x': np.arange(3.0), 'y': container([np.ones(2), np.full(2, 5.0)])}
    transforms = {'z': ocp.Transform(multi_value_fn=lambda _, t: t['y'][1] * 2)}
    theirs = ocp.apply_transformations(original, transforms, {'z': ...})
    assert_same(osurg.apply_rules(original, {'z': ...}, transforms), theirs)
    path = saved(tmp_path, original)
    assert_same(osurg.restore(path, {'z': ...}, transforms), theirs)
    # Only the element used is read; the others arrive as placeholders.
    assert osurg.plan_restore(path, {'z': ...}, transforms).steps[0].sources == ('y/1',)


def test_unread_leaves_are_placeholders_of_their_shape():
    seen = {}

    def fn(_, tree):
        seen['y0'] = tree['y'][0]
        return tree['y'][1] + 1

    osurg.apply_rules(
        {'y': [np.ones(2), np.ones(3)]}, {'z': ...}, {'z': ocp.Transform(multi_value_fn=fn)}
    )
    assert seen['y0'] == jax.ShapeDtypeStruct((2,), np.float64)


# 2. Trees that are not dicts: the function gets the original node types.


class Pair(typing.NamedTuple):
    x: np.ndarray
    y: np.ndarray


@flax.struct.dataclass
class State:
    a: np.ndarray
    b: Pair


def test_multi_value_fn_gets_dataclasses_and_named_tuples_in_memory():
    state = State(a=np.ones(2), b=Pair(np.zeros(2), np.arange(2.0)))
    transforms = {'c': ocp.Transform(multi_value_fn=lambda _, t: t.b.y + t.a)}
    theirs = ocp.apply_transformations(state, transforms, {'c': ...})
    assert_same(osurg.apply_rules(state, {'c': ...}, transforms), theirs)


def test_a_checkpoint_of_a_dataclass_restores_as_orbax_restores_it(tmp_path):
    state = State(a=np.ones(2), b=Pair(np.zeros(2), np.arange(2.0)))
    path = saved(tmp_path, state)
    # Through a checkpoint Orbax rebuilds dicts (and lists), with or without transforms.
    restored = ocp.PyTreeCheckpointer().restore(path)
    transforms = {'c': ocp.Transform(multi_value_fn=lambda _, t: t['b']['y'] + t['a'])}
    theirs = ocp.apply_transformations(restored, transforms, {'c': ...})
    assert_same(osurg.restore(path, {'c': ...}, transforms), theirs)
    assert_same(osurg.restore(path), restored)
    # And into a target of the node types, the result has them.
    ours = osurg.restore(path, State(a=..., b=Pair(..., ...)))
    assert isinstance(ours, State) and isinstance(ours.b, Pair)
    np.testing.assert_array_equal(ours.b.y, [0.0, 1.0])


def test_target_none_keeps_the_stored_lists(tmp_path):
    tree = {'layers': [{'w': np.ones(2)}, {'w': np.zeros(2)}], 'step': np.int32(3)}
    path = saved(tmp_path, tree)
    assert_same(osurg.restore(path), ocp.PyTreeCheckpointer().restore(path))
    assert_same(osurg.apply_rules(tree), tree)


# 3. RestoreArgs of multi_value_fn inputs, as Orbax honours them.


def _mesh():
    return jax.make_mesh((8,), ('a',), axis_types=(AxisType.Auto,))


def _restore_args_cases():
    mesh = _mesh()
    replicated = NamedSharding(mesh, P())
    return {
        'truncated': ocp.ArrayRestoreArgs(global_shape=(8,), strict=False, sharding=replicated),
        'padded': ocp.ArrayRestoreArgs(global_shape=(20,), strict=False, sharding=replicated),
        'cast-and-sharded': ocp.ArrayRestoreArgs(
            dtype=np.float16, sharding=NamedSharding(mesh, P('a'))
        ),
        'numpy': ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.int32),
    }


@pytest.mark.parametrize('case', list(_restore_args_cases()))
def test_multi_value_fn_input_args_are_honoured_like_orbax(tmp_path, case):
    args = _restore_args_cases()[case]
    path = saved(tmp_path, {'x': np.arange(16, dtype=np.float32), 'y': np.ones(2, np.float32)})
    seen = []

    def fn(key, tree, restore_args):
        x = tree['x']
        seen.append((type(x), x.shape, np.dtype(x.dtype), getattr(x, 'sharding', None)))
        return np.asarray(x)[:4].astype(np.float32) * 2

    transforms = {
        'z': ocp.RestoreTransform(multi_value_fn=fn, multi_value_fn_input_args={'x': args})
    }
    item = {'z': np.zeros(4, np.float32)}
    theirs = ocp.PyTreeCheckpointer().restore(
        path,
        args=ocp.args.PyTreeRestore(
            item=item, restore_args={'z': ocp.RestoreArgs()}, transforms=transforms
        ),
    )
    orbax_saw = seen[-1]
    ours = osurg.restore(path, {'z': jax.ShapeDtypeStruct((4,), np.float32)}, transforms)
    np.testing.assert_array_equal(np.asarray(ours['z']), np.asarray(theirs['z']))
    we_saw = seen[-1]  # (Before it, a trace for the output's shape, with tracers.)
    assert issubclass(we_saw[0], jax.Array) == issubclass(orbax_saw[0], jax.Array)
    assert we_saw[1:3] == orbax_saw[1:3]
    if orbax_saw[3] is not None:
        assert we_saw[3].spec == orbax_saw[3].spec


def test_truncation_reads_only_what_is_kept_and_strict_refuses(tmp_path):
    path = saved(tmp_path, {'x': np.arange(16, dtype=np.float32)})
    kept = ocp.ArrayRestoreArgs(
        global_shape=(8,), strict=False, sharding=NamedSharding(_mesh(), P())
    )
    transforms = {
        'z': ocp.RestoreTransform(
            multi_value_fn=lambda k, t, a: t['x'], multi_value_fn_input_args={'x': kept}
        )
    }
    plan = osurg.plan_restore(path, {'z': ...}, transforms)
    assert plan.steps[0].expr.describe() == '<lambda>(x[0:8])'
    assert plan.reads[0].needed == 8 * 4
    strict = {
        'z': ocp.RestoreTransform(
            multi_value_fn=lambda k, t, a: t['x'],
            multi_value_fn_input_args={'x': ocp.ArrayRestoreArgs(global_shape=(8,))},
        )
    }
    with pytest.raises(
        osurg.ShapeMismatchError, match=r"'x' is stored as \(16,\).*\(8,\). Pass strict=False"
    ):
        osurg.plan_restore(path, {'z': ...}, strict).check()


# 4. String leaves, and Orbax's "don't care" target leaves.


def test_string_leaves_and_dont_care_targets_restore_like_orbax(tmp_path):
    tree = {'name': 'llama', 'w': np.ones(2, np.float32), 'n': np.float32(3)}
    path = saved(tmp_path, tree)
    theirs = ocp.PyTreeCheckpointer().restore(path)
    for target in (
        {'name': 'x', 'w': object(), 'n': ocp.PLACEHOLDER},
        {'name': ..., 'w': ..., 'n': ...},
        ocp.PyTreeCheckpointHandler().metadata(epath.Path(path)).tree,
    ):
        ours = osurg.restore(path, target)
        assert ours['name'] == 'llama'
        np.testing.assert_array_equal(ours['w'], theirs['w'])
        assert float(ours['n']) == 3.0
    target = {'name': 'x', 'w': object(), 'n': ocp.PLACEHOLDER}
    assert_same(osurg.apply_rules(tree, target), ocp.apply_transformations(tree, {}, target))


# 5. One manager: saved with Orbax's args, restored with ours.


def test_a_manager_that_saved_plainly_restores_with_surgery(tmp_path):
    with ocp.CheckpointManager(tmp_path / 'run') as manager:
        manager.save(1, args=ocp.args.StandardSave({'w': np.arange(4.0)}))
        manager.wait_until_finished()
        out = manager.restore(1, args=osurg.SurgeryRestore(rules=osurg.Rename('w', 'W')))
        np.testing.assert_array_equal(out['W'], np.arange(4.0))
        plain = manager.restore(1, args=ocp.args.StandardRestore())
        np.testing.assert_array_equal(plain['w'], np.arange(4.0))


def test_without_the_lookup_orbax_refuses_and_names_our_args_briefly(tmp_path):
    manager_items.disallow()
    try:
        with ocp.CheckpointManager(tmp_path / 'run') as manager:
            manager.save(1, args=ocp.args.StandardSave({'w': np.zeros((256, 256))}))
            manager.wait_until_finished()
            args = osurg.SurgeryRestore(target={'w': np.zeros((256, 256))})
            with pytest.raises(
                ValueError, match=r'SurgeryRestore\(target=<1 leaf>\)" does not match'
            ) as e:
                manager.restore(1, args=args)
            assert len(str(e.value)) < 2000  # No array printed whole.
    finally:
        assert manager_items.allow()


# 6. One rule where a list is expected.


def test_a_single_rule_is_a_rule_list(tmp_path):
    path = saved(tmp_path, {'w': np.ones(2)})
    rule = osurg.OrbaxTransforms({'W': ocp.Transform(original_key='w')})
    for args in (osurg.SurgeryRestore(target={'W': ...}, rules=rule),):
        with ocp.Checkpointer(osurg.SurgeryCheckpointHandler()) as ckptr:
            np.testing.assert_array_equal(ckptr.restore(path, args=args)['W'], np.ones(2))
    assert list(osurg.apply_rules({'w': np.ones(2)}, None, osurg.Rename('w', 'v'))) == ['v']
    with pytest.raises(osurg.RuleError, match='rules is a int, not a rule or a list of rules'):
        osurg.SurgeryRestore(rules=3)


# Also found: the tree after surgery, before reading, where Orbax's metadata cannot show it.


def test_plan_metadata_is_the_restored_tree_before_any_read(tmp_path, mesh8):
    path = saved(tmp_path, {'embed': np.ones((8, 4), np.float32)})
    sharding = NamedSharding(mesh8, P('x'))
    target = {
        'embed': ...,
        'lm_head': jax.ShapeDtypeStruct(
            (4, 8), np.float32, sharding=NamedSharding(mesh8, P(None, 'x'))
        ),
    }
    rules = [osurg.Copy('embed', 'lm_head'), osurg.Transpose('lm_head', (1, 0))]
    metadata = osurg.plan_restore(path, target, rules).metadata()
    restored = osurg.restore(path, target, rules)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), metadata) == jax.tree.map(
        lambda x: (x.shape, x.dtype), restored
    )
    assert metadata['lm_head'].sharding == restored['lm_head'].sharding != sharding
    # Orbax's own metadata (what a handler's metadata() returns) is the stored tree.
    assert set(osurg.SurgeryCheckpointHandler().metadata(epath.Path(path)).tree) == {'embed'}
