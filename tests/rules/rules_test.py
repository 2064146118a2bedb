import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import orbax_surgery as osurg
from orbax_surgery.arrays import expr as ex
from orbax_surgery.rules.rule import Entry
from orbax_surgery.rules.target import read_target

SOURCE = {
    'dense_0/kernel': np.arange(12, dtype=np.float32).reshape(3, 4),
    'dense_0/bias': np.arange(4, dtype=np.float32),
    'dense_1/kernel': np.arange(8, dtype=np.float32).reshape(4, 2),
    'embed': np.arange(10, dtype=np.float32).reshape(5, 2),
}


def tree_of(values):
    return {k: Entry(ex.Source(k, v.shape, v.dtype)) for k, v in values.items()}


def applied(rule, values=SOURCE, target=None):
    leaves = read_target(target)[0] if target is not None else {}
    return rule.apply(tree_of(values), leaves)


def test_rename_moves_matching_keys_with_backreferences():
    out = applied(osurg.Rename(r'dense_(?P<n>\d)/(.*)', r'Dense_\g<n>/\2'))
    assert sorted(out) == ['Dense_0/bias', 'Dense_0/kernel', 'Dense_1/kernel', 'embed']
    assert out['Dense_1/kernel'].expr.key == 'dense_1/kernel'
    assert out['Dense_1/kernel'].via[0].pattern == r'dense_(?P<n>\d)/(.*)'


def test_rename_onto_an_existing_key_names_both():
    rule = osurg.Rename(r'dense_0/bias', 'embed')
    with pytest.raises(
        osurg.AmbiguousRuleError,
        match="'dense_0/bias' to 'embed', which checkpoint key 'embed' already has",
    ):
        applied(rule)
    with pytest.raises(
        osurg.AmbiguousRuleError,
        match=r"maps 'dense_0/bias' to 'w', which 'dense_0/kernel' \(made 'w' by Rename",
    ):
        applied(osurg.Rename(r'dense_0/.*', 'w'))


def test_two_rules_claiming_one_target_name_both_sources():
    plan = osurg.resolve(
        {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in SOURCE.items()},
        {'w': ...},
        [osurg.Rename('embed', 'w'), osurg.Rename('dense_1/kernel', 'w'), osurg.Drop('dense_0/.*')],
    )
    assert isinstance(plan.errors[0], osurg.AmbiguousRuleError)
    assert (
        "maps 'dense_1/kernel' to 'w', which 'embed' (made 'w' by Rename(pattern='embed', "
        "replacement='w')) already has"
    ) in str(plan.errors[0])


def test_copy_keeps_the_original_for_tied_weights():
    out = applied(osurg.Copy('embed', 'lm_head'))
    assert out['embed'].expr is out['lm_head'].expr


def test_drop_removes_and_a_rule_matching_nothing_is_an_error():
    assert 'embed' not in applied(osurg.Drop('emb.*'))
    with pytest.raises(
        osurg.UnmatchedKeyError, match=r"Drop\(pattern='dense_2/.*'\) matches none .*Did you mean"
    ):
        applied(osurg.Drop('dense_2/.*'))


def test_fallback_needs_a_concrete_target_value():
    target = {'head': np.zeros(3), 'other': jax.ShapeDtypeStruct((3,), np.float32)}
    out = applied(osurg.Fallback('head'), target=target)
    assert isinstance(out['head'].expr, ex.Constant)
    with pytest.raises(
        osurg.RuleError, match="takes 'other' from the target, but the target gives only its shape"
    ):
        applied(osurg.Fallback('other'), target=target)


@pytest.mark.parametrize(
    'rule, key, want',
    [
        (osurg.Cast('embed', 'bfloat16'), 'embed', SOURCE['embed'].astype(jnp.bfloat16)),
        (osurg.Transpose('dense_0/kernel', (-1, 0)), 'dense_0/kernel', SOURCE['dense_0/kernel'].T),
        (
            osurg.Reshape('dense_0/kernel', (2, -1)),
            'dense_0/kernel',
            SOURCE['dense_0/kernel'].reshape(2, 6),
        ),
        (osurg.Slice('embed', np.s_[1:4, 0]), 'embed', SOURCE['embed'][1:4, 0]),
        (osurg.MapValue('embed', lambda x: x * 2, elementwise=True), 'embed', SOURCE['embed'] * 2),
        (osurg.MapValue('embed', lambda x: x.sum(0)), 'embed', SOURCE['embed'].sum(0)),
    ],
    ids=['cast', 'transpose', 'reshape', 'slice', 'map-elementwise', 'map-whole'],
)
def test_value_rules_compute_what_numpy_computes(rule, key, want):
    out = applied(rule)
    got = out[key].expr.eager(SOURCE)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_elementwise_map_is_lazy_and_whole_map_is_not():
    assert applied(osurg.MapValue('embed', jnp.tanh, elementwise=True))['embed'].expr.lazy
    assert not applied(osurg.MapValue('embed', jnp.tanh))['embed'].expr.lazy


@pytest.mark.parametrize(
    'rule, error, message',
    [
        (
            osurg.Transpose('embed', (0, 0)),
            osurg.ShapeMismatchError,
            r"Transpose.*on 'embed' \(5, 2\) float32: axes \(0, 0\)",
        ),
        (
            osurg.Reshape('embed', (3, 3)),
            osurg.ShapeMismatchError,
            r'cannot reshape shape \(5, 2\) \(10 elements\) into \(3, 3\)',
        ),
        (
            osurg.Slice('embed', 7),
            osurg.ShapeMismatchError,
            'Index 7 is out of range for axis 0 of size 5',
        ),
        (
            osurg.MapValue('embed', lambda x: x[0], elementwise=True),
            osurg.ShapeMismatchError,
            'elementwise function keeps the shape',
        ),
        (
            osurg.MapValue('embed', lambda x: np.asarray(x).tolist()),
            osurg.RuleError,
            r'cannot tell what <lambda> returns for \(5, 2\) float32 without running it '
            r'\(TracerArrayConversionError: [^\n]*\)\. Pass out=jax.ShapeDtypeStruct',
        ),
    ],
    ids=['transpose-axes', 'reshape-size', 'slice-range', 'elementwise-shape', 'untraceable'],
)
def test_value_rule_errors_name_the_rule_key_and_shape(rule, error, message):
    with pytest.raises(error, match=message):
        applied(rule)


def test_untraceable_function_works_with_a_declared_output():
    rule = osurg.MapValue(
        'embed', lambda x: np.asarray(x)[::-1].copy(), out=jax.ShapeDtypeStruct((5, 2), np.float32)
    )
    np.testing.assert_array_equal(applied(rule)['embed'].expr.eager(SOURCE), SOURCE['embed'][::-1])


def test_cast_rejects_names_that_are_not_dtypes_and_lossy_complex_casts():
    with pytest.raises(osurg.RuleError, match="'bfloat61' is not a dtype. Did you mean 'bfloat16'"):
        osurg.Cast('.*', 'bfloat61')
    with pytest.raises(osurg.RuleError, match='not a numeric dtype'):
        osurg.Cast('.*', object)
    with pytest.raises(osurg.DtypeMismatchError, match='drop the imaginary part'):
        applied(osurg.Cast('z', np.float32), {'z': np.ones(2, np.complex64)})


def test_combine_builds_a_target_from_several_keys():
    target = {'Dense_0/kernel_and_bias': ...}
    rule = osurg.Combine(
        r'Dense_(\d)/kernel_and_bias',
        (r'dense_\1/kernel', r'dense_\1/bias'),
        lambda k, b: jnp.concatenate([k, b[None]], axis=0),
    )
    out = applied(rule, target=target)
    node = out['Dense_0/kernel_and_bias'].expr
    assert node.shape == (4, 4) and not node.lazy
    np.testing.assert_array_equal(
        node.eager(SOURCE), np.concatenate([SOURCE['dense_0/kernel'], SOURCE['dense_0/bias'][None]])
    )
    with pytest.raises(
        osurg.UnmatchedKeyError, match=r"needs 'dense_0/scale' for target 'Dense_0/kernel_and_bias'"
    ):
        applied(
            osurg.Combine(r'Dense_(\d)/kernel_and_bias', (r'dense_\1/scale',), jnp.negative),
            target=target,
        )


@pytest.mark.parametrize(
    'make',
    [
        lambda: osurg.Rename('(a', 'b'),
        lambda: osurg.Copy('a', r'\1'),
        lambda: osurg.Drop('[z-a]'),
        lambda: osurg.Combine('(a)', (r'\g<x>',), np.negative),
        lambda: osurg.Reshape('a', (-1, -1)),
    ],
    ids=['bad-regex', 'missing-group', 'bad-range', 'missing-named-group', 'two-minus-ones'],
)
def test_malformed_rules_fail_when_built(make):
    with pytest.raises(osurg.RuleError):
        make()


def test_rule_reprs_are_readable():
    assert (
        repr(osurg.MapValue('w', jnp.tanh, elementwise=True))
        == "MapValue('w', tanh, elementwise=True)"
    )
    assert re.fullmatch(r"Rename\(pattern='a', replacement='b'\)", repr(osurg.Rename('a', 'b')))


def test_a_catastrophic_regex_is_a_rule_error_not_a_hang(monkeypatch):
    from orbax_surgery import keys

    monkeypatch.setattr(keys, 'MATCH_TIMEOUT', 0.05)
    tree = {'a' * 40 + 'b': np.ones(2), 'w': np.ones(2)}
    with pytest.raises(osurg.RuleError, match=re.escape("Drop(pattern='(a|aa)+$'): matching")):
        osurg.apply_rules(tree, {'w': ...}, [osurg.Drop(r'(a|aa)+$')])


@pytest.mark.parametrize('shape', [(), (0,)], ids=['scalar', 'empty'])
def test_a_declared_out_of_a_scalar_or_empty_shape_is_used(shape):
    # A ShapeDtypeStruct of shape () has no len(), and one of shape (0,) is falsy.
    untraceable = lambda x: np.asarray(x) * 2  # noqa: E731
    out = jax.ShapeDtypeStruct(shape, np.float64)
    got = osurg.apply_rules(
        {'w': np.ones(shape)}, None, [osurg.MapValue('w', untraceable, out=out)]
    )
    np.testing.assert_array_equal(got['w'], np.full(shape, 2.0))
    combine = osurg.Combine('c', ('w',), untraceable, out=out)
    got = osurg.apply_rules({'w': np.ones(shape)}, {'w': ..., 'c': ...}, [combine])
    np.testing.assert_array_equal(got['c'], np.full(shape, 2.0))


@pytest.mark.parametrize(
    ('build', 'message'),
    [
        (lambda: osurg.Transpose('w', None), 'axes must be a sequence of ints, not None'),
        (lambda: osurg.Transpose('w', (0.5, 1)), 'axes must be ints, not 0.5'),
        (lambda: osurg.Reshape('w', 'ab'), "shape must be a sequence of ints, not 'ab'"),
        (lambda: osurg.Rename('w', 3), 'a key template is a str, not int'),
        (lambda: osurg.Drop(3), 'a key pattern is a str regex, not int'),
        (lambda: osurg.Unstack('w', 'x_{i}', axis='a'), "axis must be an int, not 'a'"),
        (lambda: osurg.Combine('w', None, sum), 'inputs is a sequence of key templates'),
        (lambda: osurg.LoraTarget('w', in_axes='a'), "in_axes must be an int, not 'a'"),
    ],
)
def test_arguments_of_the_wrong_type_are_rule_errors(build, message):
    with pytest.raises(osurg.RuleError, match=re.escape(message)):
        build()
