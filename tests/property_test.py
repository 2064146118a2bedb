"""Property: per-shard lazy restores equal an eager NumPy reference, bit for bit."""

import re
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orbax_surgery as osurg
from orbax_surgery.keys import nest

DTYPES = [np.dtype(np.float32), np.dtype(np.int32), np.dtype('bfloat16'), np.dtype(np.float16)]
MESHES = {'8': ((8,), ('x',)), '2x4': ((2, 4), ('a', 'b')), '4x2': ((4, 2), ('a', 'b'))}


@st.composite
def trees(draw):
    n = draw(st.integers(1, 4))
    values = {}
    for i in range(n):
        shape = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 4, 8]), min_size=1, max_size=3)))
        dtype = draw(st.sampled_from(DTYPES))
        seed = draw(st.integers(0, 2**16))
        values[f'g{i % 2}/w{i}'] = (np.random.default_rng(seed).standard_normal(shape) * 4).astype(
            dtype
        )
    return values


@st.composite
def basic_index(draw, shape):
    index = []
    for n in shape:
        if draw(st.booleans()) and n > 1:
            index.append(draw(st.integers(-n, n - 1)))
        else:
            step = draw(st.sampled_from([1, 1, 2, -1, -2]))
            a, b = sorted(draw(st.lists(st.integers(0, n), min_size=2, max_size=2)))
            index.append(
                slice(a, b, step)
                if step > 0
                else slice(b - 1 if b else None, a - 1 if a else None, step)
            )
    return tuple(index)


@st.composite
def rules_and_reference(draw, values):
    """Random rules, and the same rules applied to NumPy arrays by hand."""
    ref = dict(values)
    rules = []
    for n in range(draw(st.integers(1, 5))):
        key = draw(st.sampled_from(sorted(ref)))
        pattern = re.escape(key)
        kind = draw(st.sampled_from(['rename', 'slice', 'transpose', 'cast']))
        x = ref[key]
        if kind == 'rename':
            head, _, tail = key.partition('/')
            new = f'r{n}/{tail}' if tail else f'r{n}'
            if new in ref:
                continue
            if tail:  # A group and a backreference, matching exactly this key.
                rules.append(osurg.Rename(f'{re.escape(head)}/({re.escape(tail)})', f'r{n}/\\1'))
            else:
                rules.append(osurg.Rename(pattern, new))
            ref[new] = ref.pop(key)
            continue
        if kind == 'slice':
            index = draw(basic_index(x.shape))
            rules.append(osurg.Slice(pattern, index))
            ref[key] = x[index]
        elif kind == 'transpose' and x.ndim > 1:
            axes = tuple(draw(st.permutations(range(x.ndim))))
            rules.append(osurg.Transpose(pattern, axes))
            ref[key] = np.transpose(x, axes)
        elif kind == 'cast':
            dtype = draw(st.sampled_from(DTYPES))
            rules.append(osurg.Cast(pattern, dtype))
            ref[key] = x.astype(dtype)
    return rules, ref


@st.composite
def shardings(draw, shape):
    choice = draw(st.sampled_from(['single', 'replicated', *MESHES]))
    if choice == 'single':
        return jax.sharding.SingleDeviceSharding(jax.devices()[draw(st.integers(0, 7))])
    mesh_shape, names = MESHES['8' if choice == 'replicated' else choice]
    mesh = jax.make_mesh(mesh_shape, names)
    if choice == 'replicated':
        return NamedSharding(mesh, P())
    spec, free = [], list(zip(names, mesh_shape, strict=True))
    for n in shape:
        fits = [name for name, size in free if n % size == 0]
        pick = draw(st.sampled_from([None, *fits]))
        spec.append(pick)
        free = [(name, size) for name, size in free if name != pick]
    return NamedSharding(mesh, P(*spec))


@st.composite
def cases(draw):
    values = draw(trees())
    rules, ref = draw(rules_and_reference(values))
    target = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=draw(shardings(v.shape)))
        for k, v in ref.items()
    }
    return values, rules, ref, target


def assert_matches(out, ref, plan, values):
    flat = {s.key: s for s in plan.steps}
    for key, want in ref.items():
        got = out
        for part in key.split('/'):
            got = got[part]
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), want)
        for shard in got.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])
        np.testing.assert_array_equal(flat[key].expr.eager(values), want)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_lazy_equals_eager_in_memory(case):
    values, rules, ref, target = case
    source = osurg.TreeSource(values)
    plan = osurg.resolve(source.arrays, nest(target), rules)
    plan.check()
    assert_matches(osurg.materialize(plan, source), ref, plan, values)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_lazy_equals_eager_from_an_orbax_checkpoint(case):
    values, rules, ref, target = case
    with tempfile.TemporaryDirectory() as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(f'{tmp}/c', nest(values))
        with ocp.Checkpointer(osurg.SurgeryCheckpointHandler()) as ckptr:
            out = ckptr.restore(
                f'{tmp}/c', args=osurg.SurgeryRestore(target=nest(target), rules=rules)
            )
        plan = osurg.plan_restore(f'{tmp}/c', nest(target), rules)
    assert_matches(out, ref, plan, values)
