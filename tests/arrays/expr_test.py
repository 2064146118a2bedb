import asyncio
import re

import numpy as np
import pytest
from fixtures import NumpyContext, axis_request
from hypothesis import given, settings
from hypothesis import strategies as st

from orbax_surgery.arrays import expr as ex
from orbax_surgery.arrays import ops, regions
from orbax_surgery.arrays.value_functions import Apply, Elementwise
from orbax_surgery.errors import DtypeMismatchError, RuleError, ShapeMismatchError

VALUES = {
    'a': np.arange(4 * 6 * 5, dtype=np.float32).reshape(4, 6, 5),
    'b': np.arange(4 * 6 * 5, dtype=np.float32).reshape(4, 6, 5) * -1,
    'c': np.arange(4 * 3 * 5, dtype=np.float32).reshape(4, 3, 5),
}
A, B, C = (ex.Source(k, v.shape, v.dtype) for k, v in VALUES.items())

EXPRESSIONS = {
    'source': A,
    'index': ops.Index.of(A, (1, slice(None, None, -2))),
    'index-ellipsis': ops.Index.of(A, (..., 3)),
    'transpose': ops.Transpose(A, (2, 0, 1)),
    'reshape-split': ops.Reshape(A, (4, 2, 3, 5)),
    'reshape-merge': ops.Reshape(A, (24, 5)),
    'cast-bf16': ops.Cast(A, np.dtype('bfloat16')),
    'stack': ops.Stack((A, B), axis=1),
    'concat': ops.Concat((A, C, B), axis=1),
    'nested': ops.Transpose(
        ops.Reshape(ops.Index.of(ops.Stack((A, B), 0), (slice(None), 2)), (6, 10)), (1, 0)
    ),
    'elementwise': Elementwise(np.negative, (A,), np.dtype(np.float32), 'negative'),
    'apply': Apply(
        lambda xs: np.cumsum(xs[0], axis=0), (A,), A.shape, np.dtype(np.float32), 'cumsum'
    ),
    'constant': ex.Constant(np.ones((2, 3))),
}


@pytest.mark.parametrize('name', EXPRESSIONS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_lazy_region_equals_the_eager_reference(name, data):
    node = EXPRESSIONS[name]
    region = tuple(data.draw(axis_request(n)) for n in node.shape)
    ctx = NumpyContext(VALUES)
    got = asyncio.run(node.evaluate(region, ctx))
    want = regions.take(node.eager(VALUES), region)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    if node.lazy:
        assert sorted(ctx.reads, key=str) == sorted(
            ((s.key, r) for s, r in node.requests(region)), key=str
        )


def test_requests_for_one_row_of_a_transpose_read_one_column():
    node = ops.Transpose(ex.Source('w', (8, 16), np.dtype(np.float32)), (1, 0))
    assert list(node.requests((range(3, 4), range(8)))) == [(node.base, (range(8), range(3, 4)))]


def test_apply_runs_once_however_many_shards_ask():
    node = EXPRESSIONS['apply']
    ctx = NumpyContext(VALUES)

    async def shards():
        return await asyncio.gather(
            *(node.evaluate((range(i, i + 1), range(6), range(5)), ctx) for i in range(4))
        )

    class Memo(NumpyContext):
        def __init__(self, values):
            super().__init__(values)
            self.memo = {}

        async def whole(self, n):
            if id(n) not in self.memo:
                self.memo[id(n)] = asyncio.ensure_future(n.evaluate_whole(self))
                self.whole_calls += 1
            return await self.memo[id(n)]

    ctx = Memo(VALUES)
    blocks = asyncio.run(shards())
    np.testing.assert_array_equal(np.concatenate(blocks), np.cumsum(VALUES['a'], axis=0))
    assert ctx.whole_calls == 1
    assert not node.lazy and 'cumsum' in node.describe()


def test_index_errors_name_the_array_and_shape():
    with pytest.raises(
        ShapeMismatchError, match=r"Index 9 is out of range for axis 0 of size 4 of 'a'"
    ):
        ops.Index.of(A, 9)
    with pytest.raises(ShapeMismatchError, match='only basic indexing'):
        ops.Index.of(A, (np.array([0, 1]),))
    with pytest.raises(ShapeMismatchError, match='has 4 entries'):
        ops.Index.of(A, (0, 0, 0, 0))


def test_value_function_output_is_checked_against_the_plan():
    wrong_shape = Apply(lambda xs: xs[0][0], (A,), A.shape, A.dtype, 'first')
    with pytest.raises(ShapeMismatchError, match=r'first returned shape \(6, 5\)'):
        wrong_shape.eager(VALUES)
    wrong_dtype = Elementwise(lambda x: x.astype(np.int32), (A,), A.dtype, 'narrow')
    with pytest.raises(DtypeMismatchError, match='narrow returned dtype int32'):
        wrong_dtype.eager(VALUES)


def test_user_errors_are_rule_errors_naming_function_and_expression():
    broken = Apply(lambda xs: 1 / 0, (A,), (), np.dtype(np.float32), 'broken')
    message = r"broken raised ZeroDivisionError: division by zero \(computing 'broken\(a\)'\)"
    with pytest.raises(RuleError, match=message):
        broken.eager(VALUES)
    with pytest.raises(RuleError) as info:
        Elementwise(lambda x: 1 / 0, (A,), A.dtype, 'broken').eager(VALUES)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_describe_is_a_readable_formula():
    assert EXPRESSIONS['index'].describe() == 'a[1, 5:-1:-2, 0:5]'
    assert EXPRESSIONS['nested'].describe().startswith('transpose(reshape(stack(a, b, axis=0)[')
    many = ops.Stack(tuple(ex.Source(f'l{i}', (2,), np.dtype(np.float32)) for i in range(9)), 0)
    assert many.describe() == 'stack(l0, ..., l8 (9), axis=0)'


@pytest.mark.parametrize('index', [slice(0, 2, 0), slice(1.5, None)], ids=['zero-step', 'float'])
def test_a_bad_slice_is_a_shape_mismatch_naming_it(index):
    with pytest.raises(ShapeMismatchError, match=re.escape(f'Index entry {index!r} for axis 0')):
        ops.Index.of(A, (index,))
