"""Unstack and Stack: scanned <-> unrolled layers, checked against NumPy."""

import jax
import numpy as np
import pytest
from fixtures import counting_reads, random_array, save, sds, sharded
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orbax_surgery as osurg
from orbax_surgery.keys import flatten

L = 4
SCANNED = {
    'layers': {
        'mlp': {'kernel': np.arange(L * 3 * 2, dtype=np.float32).reshape(L, 3, 2)},
        'norm': {'scale': np.arange(L * 3, dtype=np.float32).reshape(L, 3)},
    },
    'embed': np.ones((5, 3), np.float32),
}
UNROLL = osurg.Unstack(r'layers/(.*)', r'layers_{i}/\1')
STACK = osurg.Stack(r'layers_{i}/(.*)', r'layers/\1')


def unrolled(tree=SCANNED, layers=range(L), axis=0):
    out = {'embed': tree['embed']}
    for i, layer in enumerate(layers):
        out[f'layers_{i}'] = jax.tree.map(
            lambda x, k=layer: np.take(x, k, axis=axis), tree['layers']
        )
    return out


def assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(g, w)


def shapes(tree):
    return jax.tree.map(lambda x: sds(x.shape, x.dtype), tree)


def stored(tree):
    """What `resolve` takes as a checkpoint: shapes by '/'-joined key."""
    return flatten(shapes(tree))[0]


def test_unstack_splits_every_leaf_of_a_subtree_into_layers():
    assert_trees_equal(osurg.apply_rules(SCANNED, None, [UNROLL]), unrolled())


def test_stack_is_the_inverse_of_unstack():
    assert_trees_equal(osurg.apply_rules(unrolled(), None, [STACK]), SCANNED)
    round_trip = osurg.apply_rules(SCANNED, shapes(SCANNED), [UNROLL, STACK])
    assert_trees_equal(round_trip, SCANNED)


@pytest.mark.parametrize('axis', [1, -1])
def test_layer_axis_may_be_any_axis(axis):
    moved = {'layers': {'w': np.moveaxis(SCANNED['layers']['mlp']['kernel'], 0, axis)}}
    got = osurg.apply_rules(
        moved, None, [osurg.Unstack(r'layers/(.*)', r'layers_{i}/\1', axis=axis)]
    )
    for i in range(L):
        np.testing.assert_array_equal(
            got[f'layers_{i}']['w'], SCANNED['layers']['mlp']['kernel'][i]
        )
    back = osurg.apply_rules(
        got, None, [osurg.Stack(r'layers_(?P<i>\d+)/w', 'layers/w', axis=axis)]
    )
    np.testing.assert_array_equal(back['layers']['w'], moved['layers']['w'])


@pytest.mark.parametrize('layers', [[0, 2], [3, 2, 1, 0], [-1, 0]])
def test_unstack_takes_a_subset_in_any_order(layers):
    rule = osurg.Unstack(r'layers/(.*)', r'layers_{i}/\1', layers=layers)
    got = osurg.apply_rules(SCANNED, None, [rule])
    assert_trees_equal(got, unrolled(layers=[i % L for i in layers]))


def test_stack_takes_a_subset_in_any_order():
    rule = osurg.Stack(r'layers_(?P<i>\d+)/(.*)', r'layers/\2', layers=[3, 1])
    got = osurg.apply_rules(unrolled(), None, [rule])
    np.testing.assert_array_equal(
        got['layers']['norm']['scale'], SCANNED['layers']['norm']['scale'][[3, 1]]
    )


def test_layers_left_out_of_a_stack_are_listed_as_dropped():
    rule = osurg.Stack(r'layers_(?P<i>\d+)/(.*)', r'layers/\2', layers=[3, 1])
    plan = osurg.resolve(stored(unrolled()), None, [rule])
    assert plan.errors == ()
    assert sorted(k for k, _ in plan.dropped) == [
        f'layers_{i}/{p}' for i in (0, 2) for p in ('mlp/kernel', 'norm/scale')
    ]


def test_nested_stacks_unroll_with_two_rules():
    blocks = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # (block, layer, d)
    rules = [
        osurg.Unstack(r'blocks/(.*)', r'block_{i}/\1'),
        osurg.Unstack(r'block_(\d+)/(.*)', r'block_\1/layer_{i}/\2'),
    ]
    got = osurg.apply_rules({'blocks': {'w': blocks}}, None, rules)
    assert sorted(got) == ['block_0', 'block_1']
    np.testing.assert_array_equal(got['block_1']['layer_2']['w'], blocks[1, 2])
    restack = [
        osurg.Stack(r'block_(\d+)/layer_(?P<i>\d+)/(.*)', r'block_\1/\3'),
        osurg.Stack(r'block_(?P<i>\d+)/(.*)', r'blocks/\2'),
    ]
    np.testing.assert_array_equal(osurg.apply_rules(got, None, restack)['blocks']['w'], blocks)


def test_unstack_reads_only_the_layers_and_shards_it_needs(tmp_path, mesh8):
    stacked = random_array((L, 64, 256), seed=3)
    path = save(tmp_path / 'ckpt', {'layers': {'w': sharded(stacked, mesh8, None, None, 'x')}})
    source = osurg.OrbaxCheckpoint(path)
    assert source.arrays['layers/w'].chunk_shape == (L, 64, 32)
    rule = osurg.Unstack(r'layers/(.*)', r'layers_{i}/\1', layers=[2])
    target = {'layers_0': {'w': sds((64, 256), sharding=NamedSharding(mesh8, P(None, 'x')))}}
    with counting_reads() as read:
        got = osurg.apply_rules({'layers': {'w': stacked}}, target, [rule])  # in memory
    assert read[0] == 0
    plan = osurg.plan_restore(path, target, [rule])
    assert plan.reads[0].needed == stacked[2].nbytes
    with counting_reads() as read:
        restored = osurg.materialize(plan, source)
    np.testing.assert_array_equal(restored['layers_0']['w'], stacked[2])
    np.testing.assert_array_equal(got['layers_0']['w'], stacked[2])
    assert restored['layers_0']['w'].sharding == target['layers_0']['w'].sharding
    # Chunks hold all 4 layers of a column band; reading one layer reads them whole.
    assert plan.reads[0].chunked == stacked.nbytes
    assert stacked[2].nbytes <= read[0] <= 1.1 * plan.reads[0].chunked


def test_plan_names_each_layer_formula():
    plan = osurg.resolve(stored(SCANNED), shapes(unrolled()), [UNROLL])
    formulas = {s.key: s.expr.describe() for s in plan.steps}
    assert formulas['layers_2/mlp/kernel'] == 'layers/mlp/kernel[2, 0:3, 0:2]'
    assert all(s.lazy for s in plan.steps)


def test_unstack_into_a_target_with_other_layer_count_names_both_counts():
    student = shapes(unrolled(layers=[0, 1]))
    plan = osurg.resolve(stored(SCANNED), student, [UNROLL])
    with pytest.raises(osurg.ShapeMismatchError) as e:
        plan.check()
    msg = str(e.value)
    assert "makes 4 layers 'layers_{i}/mlp/kernel' (i = 0..3) from 'layers/mlp/kernel'" in msg
    assert 'the target has 2 (0, 1). Pass layers=[...]' in msg
    picked = osurg.Unstack(r'layers/(.*)', r'layers_{i}/\1', layers=[0, 2])
    assert osurg.resolve(stored(SCANNED), student, [picked]).errors == ()


def test_stack_into_a_target_with_other_layer_count_names_both_counts():
    target = shapes({'layers': {'w': np.zeros((6, 3, 2), np.float32)}})
    layers = {f'layers_{i}': {'w': np.zeros((3, 2), np.float32)} for i in range(L)}
    plan = osurg.resolve(
        stored(layers), target, [osurg.Stack(r'layers_(?P<i>\d+)/(.*)', r'layers/\2')]
    )
    assert 'stacks 4 layers into' in str(plan.errors[0])
    assert 'the target has 6 along axis 0 ((6, 3, 2))' in str(plan.errors[0])


@pytest.mark.parametrize(
    ('rule', 'error', 'message'),
    [
        (
            osurg.Unstack(r'layers/(.*)', r'layers_{i}/\1', axis=3),
            osurg.ShapeMismatchError,
            r"on 'layers/mlp/kernel' \(4, 3, 2\) float32: layer axis 3 is out of range for 3 axes",
        ),
        (
            osurg.Unstack(r'layers/(.*)', r'layers_{i}/\1', layers=[0, 4]),
            osurg.ShapeMismatchError,
            r'layers \[4\] do not exist: the stack has 4 layers along axis 0',
        ),
        (
            osurg.Unstack(r'layer/(.*)', r'layers_{i}/\1'),
            osurg.UnmatchedKeyError,
            r'matches none of the 4 checkpoint keys',
        ),
        (
            osurg.Unstack(r'layers/(.*)', r'embed_{i}'),
            osurg.AmbiguousRuleError,
            r"maps 'layers/norm/scale' to 'embed_0', which 'layers/mlp/kernel\[0",
        ),
    ],
)
def test_unstack_errors_name_the_key_and_shapes(rule, error, message):
    tree = {**SCANNED, 'other': np.zeros(2, np.float32)}
    with pytest.raises(error, match=message):
        osurg.resolve(stored(tree), None, [rule]).check()


def test_stack_errors_name_the_layers():
    layers = unrolled()
    del layers['layers_2']
    with pytest.raises(osurg.UnmatchedKeyError, match=r'layers 2 are missing \(found 0, 1, 3\)'):
        osurg.resolve(stored(layers), None, [STACK]).check()

    ragged = unrolled()
    del ragged['layers_3']['norm']
    with pytest.raises(
        osurg.UnmatchedKeyError, match='different layer counts: 3 for .*norm/scale.*; 4 for'
    ):
        osurg.resolve(stored(ragged), None, [STACK]).check()

    bad = unrolled()
    bad['layers_1']['mlp']['kernel'] = np.zeros((3, 5), np.float32)
    with pytest.raises(
        osurg.ShapeMismatchError,
        match=r"making 'layers/mlp/kernel': cannot stack 'layers_0/mlp/kernel' "
        r"\(\(3, 2\) float32\) with 'layers_1/mlp/kernel' \(\(3, 5\) float32\)",
    ):
        osurg.resolve(stored(bad), None, [STACK]).check()

    with pytest.raises(
        osurg.ShapeMismatchError, match=r'layer axis 3 is out of range for layers of shape \(3,\)'
    ):
        osurg.resolve(
            stored(unrolled()), None, [osurg.Stack(r'layers_(?P<i>\d+)/norm/(.*)', r'n/\2', axis=3)]
        ).check()


def test_rules_are_checked_when_built():
    with pytest.raises(
        osurg.RuleError, match=r"needs \{i\} where the layer number goes, e.g. 'layers_\{i\}'"
    ):
        osurg.Unstack('layers/(.*)', 'layers')
    with pytest.raises(osurg.RuleError, match=r'needs \{i\} \(or a named group'):
        osurg.Stack(r'layers_(\d+)/(.*)', r'layers/\2')
    with pytest.raises(osurg.RuleError, match='name a layer twice'):
        osurg.Unstack('layers/(.*)', r'l{i}/\1', layers=[1, 1])
    with pytest.raises(osurg.RuleError, match='refers to a group'):
        osurg.Unstack('layers/(.*)', r'l{i}/\2')


def test_unrolled_attention_splits_heads_and_ties_the_embedding(tmp_path, mesh8):
    d, h, k, vocab = 32, 8, 4, 64
    scanned = {
        'layers': {'query': random_array((L, d, h * k), seed=1)},
        'embed': random_array((vocab, d), seed=2),
    }
    path = save(tmp_path / 'c', scanned)
    heads = NamedSharding(mesh8, P(None, 'x'))
    target = {f'layers_{i}': {'query': sds((d, h, k), sharding=heads)} for i in range(L)}
    target['embed'] = sds((vocab, d), sharding=NamedSharding(mesh8, P('x')))
    target['lm_head'] = sds((d, vocab), np.dtype('bfloat16'), NamedSharding(mesh8, P(None, 'x')))
    rules = [
        UNROLL,
        osurg.Reshape(r'layers_\d+/query', (d, h, k)),
        osurg.Copy('embed', 'lm_head'),
        osurg.Transpose('lm_head', (1, 0)),
        osurg.Cast('lm_head', 'bfloat16'),
    ]
    plan = osurg.plan_restore(path, target, rules)
    assert all(step.lazy for step in plan.steps)
    with counting_reads() as read:
        out = osurg.materialize(plan, osurg.OrbaxCheckpoint(path))
    for i in range(L):
        want = scanned['layers']['query'][i].reshape(d, h, k)
        np.testing.assert_array_equal(out[f'layers_{i}']['query'], want)
    np.testing.assert_array_equal(out['lm_head'], scanned['embed'].T.astype(out['lm_head'].dtype))
    stored = sum(v.nbytes for v in jax.tree.leaves(scanned))
    assert read[0] <= 1.05 * stored  # The tied embedding is read once.


def test_unstacking_an_axis_of_absurd_length_is_an_error_not_an_oom():
    # 2**40 layers meant 2**40 keys: planning ran out of memory.
    source = {'a': jax.ShapeDtypeStruct((2**40, 4), np.float32)}
    plan = osurg.resolve(source, None, [osurg.Unstack('a', 'u_{i}')])
    assert 'more than the 65536 layers Unstack makes keys for' in str(plan.errors[0])
    plan = osurg.resolve(source, None, [osurg.Unstack('a', 'u_{i}', layers=[3, 2**40 - 1])])
    assert [s.key for s in plan.steps] == ['u_0', 'u_1'] and not plan.errors


@pytest.mark.parametrize(
    'template, names',
    [
        ('layers_{i}', ['layers_0', 'layers_1', 'layers_2']),
        ('layers.{i+1}', ['layers.1', 'layers.2', 'layers.3']),
        ('layers.{i:02d}', ['layers.00', 'layers.01', 'layers.02']),
        ('h{i+1:03d}', ['h001', 'h002', 'h003']),
    ],
    ids=['plain', 'offset', 'format', 'both'],
)
def test_layer_numbers_take_an_offset_and_a_format_both_ways(template, names):
    scanned = {'stack': {'w': np.arange(6).reshape(3, 2)}}
    unrolled = osurg.apply_rules(scanned, None, [osurg.Unstack(r'stack/(.*)', template + r'/\1')])
    assert sorted(unrolled) == names
    np.testing.assert_array_equal(unrolled[names[2]]['w'], [4, 5])
    back = osurg.apply_rules(unrolled, None, [osurg.Stack(template + r'/(.*)', r'stack/\1')])
    np.testing.assert_array_equal(back['stack']['w'], scanned['stack']['w'])


def test_a_target_numbered_from_one_counts_its_layers():
    scanned = {'stack': {'w': np.zeros((3, 2))}}
    target = {'layers.1': {'w': ...}, 'layers.2': {'w': ...}}
    with pytest.raises(osurg.ShapeMismatchError, match=r'makes 3 layers .* but the target has 2'):
        osurg.apply_rules(scanned, target, [osurg.Unstack(r'stack/(.*)', r'layers.{i+1}/\1')])


def test_a_stack_numbered_below_its_offset_is_an_error():
    unrolled = {'l0': {'w': np.zeros(1)}, 'l1': {'w': np.zeros(1)}}
    with pytest.raises(
        osurg.RuleError, match=r"'l0/w' is numbered 0, which the pattern makes layer -1"
    ):
        osurg.apply_rules(unrolled, None, [osurg.Stack(r'l{i+1}/(.*)', r'L/\1')])


def test_slice_then_stack_stacks_the_sliced_layers():
    tree = {'l_0': {'w': np.arange(8.0)}, 'l_1': {'w': np.arange(8.0) + 10}}
    rules = [osurg.Slice(r'l_\d+/w', np.s_[:4]), osurg.Stack(r'l_{i}/w', 'w')]
    out = osurg.apply_rules(tree, None, rules)
    assert out['w'].tolist() == [[0, 1, 2, 3], [10, 11, 12, 13]]
