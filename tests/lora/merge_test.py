"""LowRankUpdate: any region of W + scale * A @ B from just its rows of A and columns of B."""

import asyncio

import numpy as np
import pytest
from fixtures import NumpyContext, axis_request, random_array
from hypothesis import given, settings
from hypothesis import strategies as st

import orbax_surgery as osurg
from orbax_surgery.arrays import expr as ex
from orbax_surgery.arrays import regions
from orbax_surgery.errors import DtypeMismatchError, LoraMismatchError, UnmatchedKeyError
from orbax_surgery.lora import Adapter, LowRankUpdate, MergeAdapters
from orbax_surgery.lora.layout import LoraLayout
from orbax_surgery.rules.rule import Entry


@st.composite
def updates(draw):
    """A weight split into batch, input and output axes, with its adapters and values."""
    batch_axes = draw(st.integers(0, 1))
    in_axes = draw(st.integers(1, 2))
    out_axes = draw(st.integers(1, 2))
    shape = tuple(draw(st.integers(1, 5)) for _ in range(batch_axes + in_axes + out_axes))
    rank = draw(st.integers(1, 3))
    dtype = np.dtype(draw(st.sampled_from(['float32', 'bfloat16', 'float64'])))
    adapter = Adapter(
        key='w',
        a_key='a',
        b_key='b',
        shape=shape,
        rank=rank,
        alpha=draw(st.sampled_from([1.0, 4.0, 16.0])),
        rslora=draw(st.booleans()),
        batch_axes=batch_axes,
        in_axes=in_axes,
    )
    values = {
        'w': random_array(shape, seed=1).astype(dtype),
        'a': random_array(adapter.a_shape, seed=2),
        'b': random_array(adapter.b_shape, seed=3),
    }
    sources = {k: ex.Source(k, v.shape, v.dtype) for k, v in values.items()}
    sign = draw(st.sampled_from([1, -1]))
    node = LowRankUpdate(sources['w'], sources['a'], sources['b'], adapter, sign)
    region = tuple(draw(axis_request(n)) for n in shape)
    return node, values, region


def einsum_reference(node, values):
    adapter = node.adapter
    nb, ni = adapter.batch_axes, adapter.in_axes
    letters = 'bcdefg'
    batch, ins, outs = letters[:nb], letters[nb : nb + ni], letters[nb + ni : len(adapter.shape)]
    delta = np.einsum(f'{batch}{ins}r,{batch}r{outs}->{batch}{ins}{outs}', values['a'], values['b'])
    w = values['w'].astype(np.float64)
    return w + node.sign * adapter.scale * delta


@settings(max_examples=80, deadline=None)
@given(updates())
def test_any_region_equals_the_whole_merge_and_reads_only_its_rows(case):
    node, values, region = case
    ctx = NumpyContext(values)
    got = asyncio.run(node.evaluate(region, ctx))
    assert got.dtype == values['w'].dtype
    # BLAS may round a block's sums differently from the whole array's: equal to a few ulps.
    tolerance = 1e-2 if got.dtype.name == 'bfloat16' else 1e-5
    want = regions.take(node.eager(values), region)
    np.testing.assert_allclose(
        got.astype(np.float64), want.astype(np.float64), rtol=tolerance, atol=tolerance / 10
    )
    np.testing.assert_allclose(
        got.astype(np.float64),
        regions.take(einsum_reference(node, values), region),
        rtol=tolerance,
        atol=tolerance,
    )
    nb, ni = node.adapter.batch_axes, node.adapter.batch_axes + node.adapter.in_axes
    rank = range(node.adapter.rank)
    assert sorted(ctx.reads, key=str) == sorted(
        [('w', region), ('a', region[:ni] + (rank,)), ('b', region[:nb] + (rank,) + region[ni:])],
        key=str,
    )


def test_describe_shows_the_formula():
    adapter = Adapter('w', 'a', 'b', (4, 6), rank=2, alpha=4.0)
    sources = [
        ex.Source(k, s, np.dtype('float32'))
        for k, s in [('w', (4, 6)), ('a', (4, 2)), ('b', (2, 6))]
    ]
    assert LowRankUpdate(*sources, adapter).describe() == 'w + 2 * a @ b'
    assert LowRankUpdate(*sources, adapter, sign=-1).describe() == 'w - 2 * a @ b'


def test_integer_weights_are_refused():
    adapter = Adapter('w', 'a', 'b', (4, 6), rank=2, alpha=4.0)
    w = ex.Source('w', (4, 6), np.dtype('int8'))
    a, b = ex.Source('a', (4, 2), np.dtype('float32')), ex.Source('b', (2, 6), np.dtype('float32'))
    with pytest.raises(DtypeMismatchError, match="'w'.*int8"):
        LowRankUpdate(w, a, b, adapter)


LAYOUT = LoraLayout(
    (Adapter('dense/kernel', 'dense/kernel_lora_a', 'dense/kernel_lora_b', (4, 6), 2, 2.0),)
)


def tree_of(shapes):
    return {k: Entry(ex.Source(k, s, np.dtype('float32'))) for k, s in shapes.items()}


def test_merge_rule_consumes_the_adapters():
    tree = tree_of(
        {'dense/kernel': (4, 6), 'dense/kernel_lora_a': (4, 2), 'dense/kernel_lora_b': (2, 6)}
    )
    out = MergeAdapters(LAYOUT).apply(tree, {})
    assert list(out) == ['dense/kernel']
    assert isinstance(out['dense/kernel'].expr, LowRankUpdate)


def test_merge_rule_accepts_nnx_value_suffixes():
    tree = tree_of(
        {
            'dense/kernel/value': (4, 6),
            'dense/kernel_lora_a/value': (4, 2),
            'dense/kernel_lora_b/value': (2, 6),
        }
    )
    assert list(MergeAdapters(LAYOUT).apply(tree, {})) == ['dense/kernel/value']


def test_adapters_that_do_not_fit_the_base_name_key_and_shapes():
    tree = tree_of(
        {'dense/kernel': (4, 6), 'dense/kernel_lora_a': (4, 3), 'dense/kernel_lora_b': (2, 6)}
    )
    with pytest.raises(LoraMismatchError, match=r"'dense/kernel_lora_a'.*\(4, 3\).*needs \(4, 2\)"):
        MergeAdapters(LAYOUT).apply(tree, {})
    tree = tree_of(
        {'dense/kernel': (5, 6), 'dense/kernel_lora_a': (4, 2), 'dense/kernel_lora_b': (2, 6)}
    )
    with pytest.raises(LoraMismatchError, match=r"'dense/kernel' has shape \(5, 6\).*\(4, 6\)"):
        MergeAdapters(LAYOUT).apply(tree, {})


def test_a_missing_base_weight_names_close_keys():
    tree = tree_of(
        {'Dense/kernel': (4, 6), 'dense/kernel_lora_a': (4, 2), 'dense/kernel_lora_b': (2, 6)}
    )
    with pytest.raises(
        UnmatchedKeyError, match=r"needs 'dense/kernel'.*Did you mean 'Dense/kernel'"
    ):
        MergeAdapters(LAYOUT).apply(tree, {})


@pytest.mark.parametrize('weight', [np.float32, 'bfloat16'])
def test_integer_adapters_are_a_dtype_error(weight):
    # A bfloat16 weight with an int32 B leaked NumPy's DTypePromotionError.
    joined = {
        'w': np.ones((2, 3), weight),
        'w_lora_a': np.ones((2, 1), np.float32),
        'w_lora_b': np.ones((1, 3), np.int32),
    }
    lora = osurg.LoraSpec(['w'], rank=1).bind(joined)
    with pytest.raises(osurg.DtypeMismatchError, match="'w_lora_b' has dtype int32, not a float"):
        osurg.apply_rules(joined, None, [MergeAdapters(lora)])
