"""Every example of Orbax's transformations guide, through Orbax and through us."""

import flax
import flax.linen as nn
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from fixtures import save
from flax.training.train_state import TrainState

import orbax_surgery as osurg

EXAMPLES = {
    'rename': (
        {'a': 1, 'b': 2},
        {'a2': ocp.Transform(original_key='a'), 'b2': ocp.Transform(original_key='b')},
        {'a2': ..., 'b2': ...},
    ),
    'rename-regex': (
        {'a1': 1, 'b5': 2},
        {r'([a-z])_([0-9])': ocp.Transform(original_key=r'\1\2')},
        {'a_1': ..., 'b_5': ...},
    ),
    'rename-nested-flat': (
        {'a': 1, 'dense_1': {'kernel': 2, 'bias': 3}, 'dense_2': {'kernel': 4, 'bias': 5}},
        {
            r'([a-z]+)_NEW': ocp.Transform(original_key=r'\1'),
            r'([a-z]+)_([0-9])_NEW/([a-z]+)_1': ocp.Transform(original_key=r'\1_\2/\3'),
        },
        {
            'a_NEW': ...,
            'dense_1_NEW': {'kernel_1': ..., 'bias_1': ...},
            'dense_2_NEW': {'kernel_1': ..., 'bias_1': ...},
        },
    ),
    'rename-nested-tree': (
        {'a': 1, 'dense_1': {'kernel': 2, 'bias': 3}, 'dense_2': {'kernel': 4, 'bias': 5}},
        {
            r'([a-z]+)_NEW': ocp.Transform(original_key=r'\1'),
            r'([a-z]+)_([0-9])_NEW': {'([a-z]+)_1': ocp.Transform(original_key=r'\1_\2/\3')},
        },
        {
            'a_NEW': ...,
            'dense_1_NEW': {'kernel_1': ..., 'bias_1': ...},
            'dense_2_NEW': {'kernel_1': ..., 'bias_1': ...},
        },
    ),
    'value-fn': (
        {'a': 1, 'b': 2},
        {
            'a': ocp.Transform(value_fn=lambda v: v * 2),
            'b2': ocp.Transform(value_fn=lambda v: v * 3, original_key='b'),
        },
        {'a': ..., 'b2': ...},
    ),
    'value-fn-regex': (
        {'a1': 1, 'a2': 2, 'b': 3},
        {
            r'a([0-9]?)\*2': ocp.Transform(value_fn=lambda v: v * 2, original_key=r'a\1'),
            r'b([0-9]?)\*3': ocp.Transform(value_fn=lambda v: v * 3, original_key=r'b\1'),
        },
        {'a1*2': ..., 'a2*2': ..., 'b*3': ...},
    ),
    'flatten-nested': (
        {'a': 1, 'dense_1': {'kernel': 2, 'bias': 3}, 'dense_2': {'kernel': 4, 'bias': 5}},
        {
            r'([a-z]+)': ocp.Transform(original_key=r'\1'),
            r'([a-z]+)_([0-9])_([a-z]+)': ocp.Transform(original_key=r'\1_\2/\3'),
        },
        {
            'a': ...,
            'dense_1_kernel': ...,
            'dense_1_bias': ...,
            'dense_2_kernel': ...,
            'dense_2_bias': ...,
        },
    ),
    'multi-value-fn': (
        {'a': np.array([1, 2, 3, 4]), 'b': {'c': np.array([5, 6, 7, 8])}},
        {
            'a': ocp.Transform(multi_value_fn=lambda _, kv: kv['a'][-1]),
            'b': {'c': ocp.Transform(multi_value_fn=lambda _, kv: kv['a'] + kv['b']['c'])},
        },
        {'a': ..., 'b': {'c': ...}},
    ),
    'multi-value-average': (
        {'a': {'a_1': 1, 'a_2': 2}, 'b': {'b_1': 3, 'b_2': 4, 'b_3': 5}},
        {r'([a-z]+)': ocp.Transform(multi_value_fn=lambda k, kv: sum(kv[k].values()) / len(kv[k]))},
        {'a': ..., 'b': ...},
    ),
    'named-groups': (
        {'dense_1': {'kernel': 2, 'bias': 3}},
        {
            r'(?P<layer>[a-z]+)_(?P<num>[0-9])_(?P<weight>[a-z]+)': ocp.Transform(
                original_key=r'\g<layer>_\g<num>/\g<weight>'
            )
        },
        {'dense_1_kernel': ..., 'dense_1_bias': ...},
    ),
}


def assert_same_trees(ours, theirs):
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs)
    flat_ours, flat_theirs = jax.tree.leaves(ours), jax.tree.leaves(theirs)
    for a, b in zip(flat_ours, flat_theirs, strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype, (a, b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def restore(path, target, rules):
    with ocp.Checkpointer(osurg.SurgeryCheckpointHandler()) as ckptr:
        return ckptr.restore(path, args=osurg.SurgeryRestore(target=target, rules=rules))


@pytest.mark.parametrize('name', EXAMPLES)
def test_guide_example_matches_apply_transformations(name, tmp_path):
    original, transforms, new_tree = EXAMPLES[name]
    theirs = ocp.apply_transformations(original, transforms, new_tree)
    path = save(tmp_path / 'ckpt', original)
    assert_same_trees(restore(path, new_tree, transforms), theirs)
    assert_same_trees(osurg.apply_rules(original, new_tree, transforms), theirs)


def test_multi_value_fn_reads_only_the_leaves_it_uses(tmp_path):
    original, transforms, new_tree = EXAMPLES['multi-value-fn']
    plan = osurg.plan_restore(save(tmp_path / 'ckpt', original), new_tree, transforms)
    assert {s.key: s.sources for s in plan.steps} == {'a': ('a',), 'b/c': ('a', 'b/c')}
    assert [s.key for s in plan.not_lazy] == ['a', 'b/c']


@flax.struct.dataclass
class Small:
    key1: int


@flax.struct.dataclass
class Big:
    key1: int
    key2: int


@pytest.mark.parametrize(
    'transforms, expected',
    [({}, 10), ({r'(.*)key1(.*)': ocp.Transform(original_key=r'\1key2\2')}, 100)],
    ids=['partial', 'renamed'],
)
def test_guide_restoring_a_checkpoint(tmp_path, transforms, expected):
    path = tmp_path / 'ckpt'
    ocp.PyTreeCheckpointer().save(path, Big(key1=10, key2=100))
    to_restore = Small(key1=0)
    theirs = ocp.PyTreeCheckpointer().restore(
        path,
        args=ocp.args.PyTreeRestore(
            to_restore,
            restore_args=ocp.checkpoint_utils.construct_restore_args(to_restore),
            transforms=transforms,
        ),
    )
    ours = restore(path, to_restore, transforms)
    assert ours == theirs == Small(key1=expected)


class Model(nn.Module):
    layers: int

    @nn.compact
    def __call__(self, x):
        for _ in range(self.layers):
            x = nn.Dense(4)(x)
        return x


def train_state(layers, seed):
    model = Model(layers)
    params = model.init(jax.random.PRNGKey(seed), np.ones((1, 4)))['params']
    return TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-3))


def test_guide_real_world_example(tmp_path):
    original_state = train_state(2, seed=0)
    original_state = original_state.replace(step=7)
    new_state = train_state(4, seed=1)
    transforms = {
        r'(.*)Dense_0(.*)': ocp.Transform(use_fallback=True),
        r'(.*)Dense_1(.*)': ocp.Transform(original_key=r'\1Dense_0\2'),
        r'(.*)Dense_2(.*)': ocp.Transform(original_key=r'\1Dense_1\2'),
    }
    manager = ocp.CheckpointManager(tmp_path / 'run')
    manager.save(7, args=ocp.args.StandardSave(original_state))
    manager.wait_until_finished()
    restored_original = ocp.CheckpointManager(tmp_path / 'run').restore(
        7, args=ocp.args.StandardRestore(original_state)
    )
    theirs = ocp.apply_transformations(restored_original, transforms, new_state)
    ours = ocp.CheckpointManager(tmp_path / 'run').restore(
        7, args=osurg.SurgeryRestore(target=new_state, rules=transforms)
    )
    assert_same_trees(ours, theirs)
    assert int(ours.step) == 7
    np.testing.assert_array_equal(
        ours.params['Dense_2']['kernel'], original_state.params['Dense_1']['kernel']
    )
    np.testing.assert_array_equal(
        ours.params['Dense_3']['kernel'], new_state.params['Dense_3']['kernel']
    )
    via_orbax = ocp.PyTreeCheckpointer().restore(
        tmp_path / 'run' / '7' / 'default',
        args=ocp.args.PyTreeRestore(
            new_state,
            restore_args=ocp.checkpoint_utils.construct_restore_args(new_state),
            transforms=transforms,
        ),
    )
    assert_same_trees(ours, via_orbax)


def test_default_to_original_false_takes_unlisted_keys_from_the_target(tmp_path):
    original = {'a': np.arange(3.0), 'b': np.arange(3.0) + 10}
    new_tree = {'a': np.zeros(3), 'b': np.ones(3)}
    transforms = {'a': ocp.Transform(use_fallback=True)}
    theirs = ocp.apply_transformations(original, transforms, new_tree, default_to_original=False)
    rule = osurg.OrbaxTransforms(transforms, default_to_original=False)
    path = save(tmp_path / 'ckpt', original)
    assert_same_trees(restore(path, new_tree, [rule]), theirs)


def test_restore_transform_multi_value_fn_gets_restore_args(tmp_path):
    original = {'x': np.arange(4.0, dtype=np.float32), 'y': np.ones(4, np.float32)}
    seen = []

    def combine(key, tree, args):
        seen.append(args)
        return tree['x'] * 2

    transforms = {
        'z': ocp.RestoreTransform(
            multi_value_fn=combine, multi_value_fn_input_args={'x': ocp.RestoreArgs()}
        )
    }
    target = {'z': jax.ShapeDtypeStruct((4,), np.float32)}
    plan = osurg.plan_restore(save(tmp_path / 'ckpt', original), target, transforms)
    assert plan.steps[0].sources == ('x',)
    out = restore(str(tmp_path / 'ckpt'), target, transforms)
    np.testing.assert_array_equal(out['z'], np.arange(4.0) * 2)
    assert isinstance(seen[-1], ocp.ArrayRestoreArgs) and seen[-1].global_shape == (4,)


def test_a_target_matched_by_two_transforms_is_ambiguous(tmp_path):
    transforms = {r'a.*': ocp.Transform(original_key='a'), r'.*2': ocp.Transform(original_key='b')}
    plan = osurg.resolve(
        {'a': jax.ShapeDtypeStruct((), np.int64), 'b': jax.ShapeDtypeStruct((), np.int64)},
        {'a2': ...},
        transforms,
    )
    assert isinstance(plan.errors[0], osurg.AmbiguousRuleError)
    assert "'a2' matches the transforms '.*2' and 'a.*'" in str(plan.errors[0])


def test_missing_original_key_names_close_matches():
    plan = osurg.resolve(
        {'dense_0/kernel': jax.ShapeDtypeStruct((2,), np.float32)},
        {'Dense_0/kernel': ...},
        {r'Dense_(\d)/(.*)': ocp.Transform(original_key=r'dense_\1/\2s')},
    )
    with pytest.raises(
        osurg.UnmatchedKeyError, match=r"'dense_0/kernels'.*Did you mean 'dense_0/kernel'"
    ):
        plan.check()


def test_bad_transform_regex_and_backreference_fail_when_built():
    with pytest.raises(osurg.RuleError, match='not a valid regex'):
        osurg.OrbaxTransforms({'(a': ocp.Transform(original_key='a')})
    with pytest.raises(osurg.RuleError, match='group'):
        osurg.SurgeryRestore(target={}, rules={r'(a)': ocp.Transform(original_key=r'\2')})


def test_untraceable_value_fn_takes_the_target_shape_or_says_what_to_give():
    def reverse(v):
        return np.asarray(v)[::-1].copy()

    source = {'w': jax.ShapeDtypeStruct((3,), np.float32)}
    transforms = {'w': ocp.Transform(value_fn=reverse)}
    shaped = osurg.resolve(source, {'w': jax.ShapeDtypeStruct((3,), np.float32)}, transforms)
    assert shaped.errors == () and shaped.steps[0].target.shape == (3,)
    (error,) = osurg.resolve(source, {'w': ...}, transforms).errors
    assert isinstance(error, osurg.RuleError)
    assert "For target 'w': cannot tell what reverse returns for (3,) float32" in str(error)
    assert str(error).endswith('Give that target leaf a jax.ShapeDtypeStruct.')
    assert '\n' not in str(error)
    out = osurg.apply_rules(
        {'w': np.arange(3, dtype=np.float32)}, {'w': np.zeros(3, np.float32)}, transforms
    )
    np.testing.assert_array_equal(out['w'], [2.0, 1.0, 0.0])
