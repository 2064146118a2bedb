"""Split and Concatenate: fused weights (qkv, gate_up) cut apart and joined, lazily."""

import numpy as np
import pytest
from fixtures import counting_reads, random_array, save, sds, sharded
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orbax_surgery as osurg

QKV = (r'\1/q', r'\1/k', r'\1/v')


def test_split_into_equal_parts_along_any_axis():
    w = np.arange(24.0).reshape(4, 6)
    got = osurg.apply_rules({'a': {'qkv': w}}, None, [osurg.Split(r'(.*)/qkv', QKV, axis=-1)])
    for i, name in enumerate('qkv'):
        np.testing.assert_array_equal(got['a'][name], w[:, 2 * i : 2 * i + 2])
    got = osurg.apply_rules({'gu': w}, None, [osurg.Split('gu', ('g', 'u'))])
    np.testing.assert_array_equal(got['g'], w[:2])
    np.testing.assert_array_equal(got['u'], w[2:])


def test_split_with_sizes_and_the_rest():
    w = np.arange(8 * 3.0).reshape(8, 3)  # Grouped-query attention: q wider than k and v.
    got = osurg.apply_rules(
        {'qkv': w}, None, [osurg.Split('qkv', ('q', 'k', 'v'), sizes=(4, -1, 2))]
    )
    np.testing.assert_array_equal(got['q'], w[:4])
    np.testing.assert_array_equal(got['k'], w[4:6])
    np.testing.assert_array_equal(got['v'], w[6:])
    empty = osurg.apply_rules({'x': w}, None, [osurg.Split('x', ('a', 'b'), sizes=(0, 8))])
    assert empty['a'].shape == (0, 3)


def test_concatenate_is_the_inverse_of_split():
    rng = np.random.default_rng(0)
    tree = {
        f'layer_{i}': {'qkv': rng.standard_normal((12, 5)).astype(np.float32)} for i in range(3)
    }
    split = osurg.Split(r'(.*)/qkv', QKV, sizes=(6, 3, 3))
    join = osurg.Concatenate((r'(.*)/q', r'\1/k', r'\1/v'), r'\1/qkv')
    parts = osurg.apply_rules(tree, None, [split])
    assert parts['layer_1']['k'].shape == (3, 5)
    back = osurg.apply_rules(tree, None, [split, join])
    for i in range(3):
        np.testing.assert_array_equal(back[f'layer_{i}']['qkv'], tree[f'layer_{i}']['qkv'])
        assert set(back[f'layer_{i}']) == {'qkv'}  # The parts are used up.


def test_concatenate_along_the_last_axis():
    tree = {'gate': np.ones((2, 3)), 'up': np.zeros((2, 4))}
    rule = osurg.Concatenate(('gate', 'up'), 'gate_up', axis=-1)
    got = osurg.apply_rules(tree, None, [rule])
    assert list(got) == ['gate_up']
    np.testing.assert_array_equal(got['gate_up'], np.concatenate([tree['gate'], tree['up']], 1))


def test_split_reads_only_the_rows_of_each_part_a_shard_needs(tmp_path, mesh8):
    fused = random_array((96, 64), seed=1)  # q: 64 rows, k and v: 16 rows each.
    path = save(tmp_path / 'ckpt', {'attn': {'qkv': sharded(fused, mesh8, 'x', None)}})
    rows = NamedSharding(mesh8, P('x', None))
    target = {'attn': {'k': sds((16, 64), sharding=rows)}}
    rules = [osurg.Split(r'(.*)/qkv', QKV, sizes=(64, 16, 16)), osurg.Drop(r'attn/[qv]')]
    plan = osurg.plan_restore(path, target, rules)
    assert plan.errors == () and plan.reads[0].needed == 16 * 64 * 4
    assert plan.steps[0].lazy
    with counting_reads() as read:
        got = osurg.restore(path, target, rules)
    np.testing.assert_array_equal(got['attn']['k'], fused[64:80])
    assert got['attn']['k'].sharding == rows
    # Two 12-row chunks of 8 (and the OCDBT index), not the whole fused array.
    assert plan.reads[0].chunked <= read[0] <= plan.reads[0].chunked + 2048
    assert plan.reads[0].chunked == 2 * 12 * 64 * 4


def test_a_fused_layer_restores_into_a_model_with_separate_projections(tmp_path, mesh8):
    d, kv = 32, 8
    rng = np.random.default_rng(2)
    fused = {
        f'layers_{i}': {'qkv': rng.standard_normal((d + 2 * kv, d)).astype(np.float32)}
        for i in range(2)
    }
    path = save(tmp_path / 'ckpt', fused)
    target = {
        'layers': {
            'q': sds((2, d, d), sharding=NamedSharding(mesh8, P(None, None, 'x'))),
            'k': sds((2, d, kv), sharding=NamedSharding(mesh8, P(None, None, 'x'))),
            'v': sds((2, d, kv), sharding=NamedSharding(mesh8, P(None, None, 'x'))),
        }
    }
    rules = [
        osurg.Split(r'(.*)/qkv', QKV, sizes=(d, kv, kv)),
        osurg.Transpose(r'layers_\d+/[qkv]', (1, 0)),  # PyTorch (out, in) -> Flax (in, out)
        osurg.Stack(r'layers_{i}/(.*)', r'layers/\1'),
    ]
    got = osurg.restore(path, target, rules)
    for i in range(2):
        w = fused[f'layers_{i}']['qkv']
        np.testing.assert_array_equal(got['layers']['q'][i], w[:d].T)
        np.testing.assert_array_equal(got['layers']['k'][i], w[d : d + kv].T)
        np.testing.assert_array_equal(got['layers']['v'][i], w[d + kv :].T)


@pytest.mark.parametrize(
    ('rule', 'error', 'message'),
    [
        (
            osurg.Split('qkv', ('q', 'k', 'v')),
            osurg.ShapeMismatchError,
            "on 'qkv' (10, 4) float32: axis 0 has 10 entries, which do not split into 3 equal "
            'parts; pass sizes=(...) with 3 lengths that add up to 10.',
        ),
        (
            osurg.Split('qkv', ('q', 'k'), sizes=(4, 4)),
            osurg.ShapeMismatchError,
            'sizes (4, 4) add up to 8, but axis 0 has 10 entries.',
        ),
        (
            osurg.Split('qkv', ('q', 'k'), sizes=(12, -1)),
            osurg.ShapeMismatchError,
            'sizes (12, -1) add up to 12, but axis 0 has 10 entries.',
        ),
        (
            osurg.Split('qkv', ('q', 'k'), axis=2),
            osurg.ShapeMismatchError,
            'axis 2 is out of range for 2 axes.',
        ),
        (
            osurg.Split('qkv', ('q', 'other')),
            osurg.AmbiguousRuleError,
            "splits 'qkv' into 'other', which checkpoint key 'other' already has.",
        ),
        (
            osurg.Split('qvk', ('q', 'k')),
            osurg.UnmatchedKeyError,
            "Did you mean 'qkv'?",
        ),
        (
            osurg.Concatenate(('qkv', 'otter'), 'x'),
            osurg.UnmatchedKeyError,
            "needs 'otter' to join with 'qkv', which is not among the 2 checkpoint keys. "
            "Did you mean 'other'?",
        ),
        (
            osurg.Concatenate(('qkv', 'other'), 'x', axis=1),
            osurg.ShapeMismatchError,
            "joining 'qkv' (10, 4) float32, 'other' (3,) float32:",
        ),
    ],
)
def test_errors_name_the_rule_the_key_and_the_shapes(rule, error, message):
    tree = {'qkv': np.zeros((10, 4), np.float32), 'other': np.zeros(3, np.float32)}
    with pytest.raises(error) as info:
        osurg.apply_rules(tree, None, [rule])
    assert message in str(info.value)
    assert repr(rule) in str(info.value)


def test_two_joins_into_one_key_are_ambiguous():
    tree = {'a': np.zeros(2), 'b': np.ones(2), 'c': np.ones(2)}
    rule = osurg.Concatenate(('a|b', 'c'), 'x')
    with pytest.raises(osurg.AmbiguousRuleError) as info:
        osurg.apply_rules(tree, None, [rule])
    assert "joins both ['a', 'c'] and ['b', 'c'] into 'x'" in str(info.value)


@pytest.mark.parametrize(
    ('build', 'message'),
    [
        (lambda: osurg.Split('w', ('a',)), 'give two or more replacements'),
        (lambda: osurg.Split('w', 'ab'), 'replacements is a sequence of key templates'),
        (lambda: osurg.Split('w', ('a', r'\1')), 'invalid group reference 1'),
        (lambda: osurg.Split('w', ('a', 'b'), sizes=(1,)), '1 sizes for 2 replacements'),
        (lambda: osurg.Split('w', ('a', 'b'), sizes=(-1, -1)), 'at most one -1'),
        (lambda: osurg.Split('w', ('a', 'b'), axis=0.5), 'axis must be an int'),
        (lambda: osurg.Concatenate('w', 'x'), 'parts is a sequence'),
        (lambda: osurg.Concatenate(('w',), 'x'), 'give two or more parts'),
        (lambda: osurg.Concatenate(('(w', 'v'), 'x'), 'is not a valid regex'),
        (lambda: osurg.Concatenate(('w', 'v'), r'\2'), 'invalid group reference 2'),
    ],
)
def test_malformed_rules_are_refused_when_built(build, message):
    with pytest.raises(osurg.RuleError) as info:
        build()
    assert message in str(info.value)
