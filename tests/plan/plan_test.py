import re

import jax
import numpy as np
import pytest
from fixtures import sds
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orbax_surgery as osurg
from orbax_surgery.arrays.expr import Source
from orbax_surgery.plan.plan import plan_summary
from orbax_surgery.units import format_bytes

SOURCE = {
    'params/dense_0/kernel': sds((64, 32)),
    'params/dense_0/bias': sds((32,)),
    'params/embed': sds((100, 16)),
    'opt_state/mu/dense_0/kernel': sds((64, 32)),
    'step': sds((), np.int64),
}
RENAME = osurg.Rename(r'params/dense_(\d+)/(.*)', r'params/Dense_\1/\2')
TARGET = {
    'params': {'Dense_0': {'kernel': sds((64, 32)), 'bias': sds((32,))}, 'embed': sds((100, 16))}
}
DROP = osurg.Drop(r'opt_state/.*|step')


def test_a_clean_plan_maps_every_target_and_has_no_errors():
    plan = osurg.resolve(SOURCE, TARGET, [RENAME, DROP])
    assert plan.errors == ()
    assert {s.key: s.sources for s in plan.steps} == {
        'params/Dense_0/bias': ('params/dense_0/bias',),
        'params/Dense_0/kernel': ('params/dense_0/kernel',),
        'params/embed': ('params/embed',),
    }
    assert [k for k, _ in plan.dropped] == ['opt_state/mu/dense_0/kernel', 'step']
    assert plan.steps[0].rules == (RENAME,)
    plan.check()


def test_resolve_is_deterministic():
    first = osurg.resolve(SOURCE, TARGET, [RENAME, DROP])
    second = osurg.resolve(SOURCE, TARGET, [RENAME, DROP])
    assert first.steps == second.steps and str(first) == str(second)


def test_unused_checkpoint_keys_are_an_error_with_the_fix():
    plan = osurg.resolve(SOURCE, TARGET, [RENAME])
    (error,) = plan.errors
    assert isinstance(error, osurg.UnusedKeyError)
    assert "2 checkpoint keys are read by no target: 'opt_state/mu/dense_0/kernel', 'step'" in str(
        error
    )
    assert "Drop('opt_state/.*|step')" in str(error)


def test_a_target_nothing_fills_names_close_keys_and_fallback():
    target = {'params': {**TARGET['params'], 'Dense_1': {'kernel': sds((32, 8))}}}
    plan = osurg.resolve(SOURCE, target, [RENAME, DROP])
    with pytest.raises(osurg.UnmatchedKeyError, match=re.escape("'params/Dense_1/kernel'")) as info:
        plan.check()
    assert "Closest: 'params/Dense_0/kernel'" in str(info.value)
    assert "Fallback(pattern='params/Dense_1/kernel')" in str(info.value)


def test_more_layers_in_the_target_than_in_the_checkpoint_is_an_error():
    """google/orbax#2972: a 16-layer model must not restore from a 12-layer checkpoint."""
    source = {f'layers_{i}/w': sds((4,)) for i in range(12)}
    target = {f'layers_{i}': {'w': sds((4,))} for i in range(16)}
    plan = osurg.resolve(source, target)
    (error,) = plan.errors  # One cause: the four layers the checkpoint does not have.
    assert isinstance(error, osurg.UnmatchedKeyError) and len(error.consequences) == 4
    assert 'the 4 targets of layers 12..15' in str(error)
    assert 'the checkpoint has 12 layers (0..11), the target 16' in str(error)
    assert error.suggestions[0] == "a target with 12 layers (the checkpoint's count)"
    assert plan.missing == tuple(f'layers_{i}/w' for i in range(12, 16))
    fewer = osurg.resolve(source, {f'layers_{i}': {'w': sds((4,))} for i in range(8)})
    assert isinstance(fewer.errors[0], osurg.UnusedKeyError)


@pytest.mark.parametrize(
    'target_shape, hint',
    [
        ((32, 64), 'a forgotten transpose?'),
        ((2048,), 'The same number of elements: a reshape'),
        ((64, 48), 'Axis 1'),
    ],
    ids=['transposed', 'flattened', 'wider'],
)
def test_shape_mismatch_names_both_shapes_and_a_likely_fix(target_shape, hint):
    target = {
        'params': {**TARGET['params'], 'Dense_0': {'kernel': sds(target_shape), 'bias': sds((32,))}}
    }
    plan = osurg.resolve(SOURCE, target, [RENAME, DROP])
    with pytest.raises(
        osurg.ShapeMismatchError, match=re.escape(f'has shape {target_shape}, but')
    ) as info:
        plan.check()
    assert '(64, 32)' in str(info.value) and hint in str(info.value)


def test_dtype_change_needs_a_cast_rule():
    target = {'params': {**TARGET['params'], 'embed': sds((100, 16), np.dtype('bfloat16'))}}
    plan = osurg.resolve(SOURCE, target, [RENAME, DROP])
    with pytest.raises(osurg.DtypeMismatchError, match=r"Cast\('params/embed', 'bfloat16'\)"):
        plan.check()
    fixed = osurg.resolve(SOURCE, target, [RENAME, DROP, osurg.Cast('params/embed', 'bfloat16')])
    assert fixed.errors == ()


def test_every_error_is_listed_and_check_raises_the_first_with_notes():
    plan = osurg.resolve(SOURCE, {'a': sds((1,)), 'b': sds((2,))}, [osurg.Drop('nothing')])
    # The Drop that matched nothing leaves the keys it was for unread: one cause; then
    # the two targets nothing fills, one error for both.
    assert [type(e) for e in plan.errors] == [osurg.UnmatchedKeyError] * 2
    assert [type(e) for e in plan.errors[0].consequences] == [osurg.UnusedKeyError]
    assert len(plan.errors[1].consequences) == 1 and plan.missing == ('a', 'b')
    with pytest.raises(osurg.UnmatchedKeyError) as info:
        plan.check()
    assert info.value.__notes__ == [f'Also: {plan.errors[1]}']
    with pytest.raises(osurg.UnmatchedKeyError) as again:
        plan.check()
    assert len(again.value.__notes__) == 1


def test_ellipsis_and_no_target_infer_shapes_from_the_rules():
    plan = osurg.resolve(
        SOURCE, {'e': ...}, [osurg.Rename('params/embed', 'e'), osurg.Drop('(?!e$).*')]
    )
    assert plan.errors == () and plan.steps[0].target.shape == (100, 16)
    inferred = osurg.resolve(SOURCE, None, [osurg.Transpose('params/embed', (1, 0))])
    assert {s.key: s.target.shape for s in inferred.steps}['params/embed'] == (16, 100)
    assert jax.tree_util.tree_structure(inferred.treedef.unflatten([0] * 5)) == inferred.treedef


def test_read_estimate_per_process_counts_each_chunk_once():
    mesh = jax.make_mesh((8,), ('x',))
    source = {'w': Source('w', (64, 32), np.dtype(np.float32), (8, 32))}
    rows = {'w': sds((64, 32), sharding=NamedSharding(mesh, P('x')))}
    cols = {'w': sds((64, 32), sharding=NamedSharding(mesh, P(None, 'x')))}
    replicated = {'w': sds((64, 32), sharding=NamedSharding(mesh, P()))}
    for target in (rows, cols, replicated):
        plan = osurg.resolve(source, target)
        assert plan.reads[0].chunked == 64 * 32 * 4
    assert osurg.resolve(source, rows).reads[0].amplification == 1.0
    half = osurg.resolve(source, {'w': ...}, [osurg.Slice('w', np.s_[:32])])
    assert half.reads[0].chunked == 32 * 32 * 4
    odd = osurg.resolve(source, {'w': ...}, [osurg.Slice('w', np.s_[4:12])])
    assert odd.reads[0].needed == 8 * 32 * 4 and odd.reads[0].chunked == 16 * 32 * 4


def test_plan_prints_a_table_and_every_section():
    target = {**TARGET, 'x': ...}
    rules = [RENAME, osurg.Drop('step'), osurg.Combine('x', ('params/embed',), lambda e: e.sum())]
    text = str(osurg.resolve(SOURCE, target, rules))
    assert text.startswith('Plan (1 error(s)): 4 target leaves from 5 checkpoint arrays')
    assert re.search(
        r'params/Dense_0/kernel\s+\(64, 32\)\s+float32\s+params/dense_0/kernel\s+yes', text
    )
    assert re.search(r'x\s+\(\)\s+float32\s+<lambda>\(params/embed\)\s+NO', text)
    for section in (
        'Not lazy (1)',
        'Unused checkpoint keys (1)',
        'Left unread by rules (1)',
        'Errors (1)',
    ):
        assert section in text


def test_summary_is_json_ready():
    import json

    summary = plan_summary(osurg.resolve(SOURCE, TARGET, [RENAME, DROP]))
    assert json.loads(json.dumps(summary))['targets'][0]['from'] == 'params/dense_0/bias'
    assert (
        summary['errors'] == []
        and summary['checkpoint_bytes'] == 2 * 64 * 32 * 4 + 32 * 4 + 1600 * 4 + 8
    )


def test_format_bytes():
    assert [format_bytes(n) for n in (5, 2048, 5 * 2**20)] == ['5 B', '2.0 KiB', '5.0 MiB']


def test_missing_and_unexpected_keys_are_listed_like_hugging_faces():
    source = {
        'a': jax.ShapeDtypeStruct((2,), np.float32),
        'extra': jax.ShapeDtypeStruct((1,), np.float32),
    }
    plan = osurg.resolve(source, {'a': ..., 'b': ...})
    assert plan.missing == ('b',)
    assert [k for k, _ in plan.unused] == ['extra']
    text = str(plan)
    assert 'Missing: target keys nothing fills (1):\n  b' in text
    assert 'Unused checkpoint keys (1):\n  extra' in text


def test_a_shape_mismatch_does_not_also_call_its_source_unused():
    plan = osurg.resolve({'w': jax.ShapeDtypeStruct((2, 3), np.float32)}, {'w': sds((3, 2))})
    assert [type(e).__name__ for e in plan.errors] == ['ShapeMismatchError']
    assert plan.unused == ()


@pytest.mark.parametrize('dtype', [np.float64, np.complex128, np.uint64, np.longdouble])
def test_a_jax_array_target_jax_cannot_hold_is_a_dtype_error(dtype):
    # Without jax_enable_x64, JAX would silently make float64 a float32.
    src = {'w': jax.ShapeDtypeStruct((2,), dtype)}
    plan = osurg.resolve(src, {'w': jax.ShapeDtypeStruct((2,), dtype)})
    assert len(plan.errors) == 1 and isinstance(plan.errors[0], osurg.DtypeMismatchError)
    assert "Target 'w' is a jax.Array of dtype" in str(plan.errors[0])
    assert not osurg.resolve(src, {'w': np.zeros(2, dtype)}).errors  # A NumPy target keeps it.
