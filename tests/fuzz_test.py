"""Fuzzing: random trees, rules and targets give the reference's result or a SurgeryError.

Every outcome of building the rules, `resolve`, `apply_rules` and (for a share
of examples) `plan_restore` and a lazy `restore` from an Orbax checkpoint must
be either equal to `fuzz_strategies.Reference` (values, dtypes, shapes, kinds,
structure) or a `SurgeryError`; never another exception, a hang or a crash. A
hang is turned into a crash with every thread's traceback by `faulthandler`.

Reproducible: `derandomize=True` and no example database. The quick tier runs
100 examples and 40 of each rule composed with `Stack` and with `Unstack`; the
slow tier 2,000 in memory, 300 of each composition, 1,000 value-function-heavy, 300
through Orbax checkpoints, 300 metadata-only plans of huge arrays and 300 LoRA
merges. `--hypothesis-show-statistics` counts the outcomes.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

import fuzz_strategies as fz
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

import orbax_surgery as osurg
from orbax_surgery import keys as keys_module
from orbax_surgery.lora.merge import MergeAdapters

HANG_SECONDS = 120
"""No example takes near this long; past it the process dumps its threads and exits."""

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


_REAL_STDERR: list[Any] = []


@pytest.fixture(autouse=True, scope='module')
def _real_stderr(request):
    """A handle on the terminal's stderr, which pytest's capture would swallow on exit."""
    capture = request.config.pluginmanager.getplugin('capturemanager')
    with capture.global_and_fixture_disabled():
        _REAL_STDERR.append(os.fdopen(os.dup(2), 'w'))
    yield
    _REAL_STDERR.pop().close()


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """Fails loudly on a hang, and silences NumPy's overflow warnings.

    A cast that overflows (1e300 to float16) warns in NumPy and in the reference
    alike; the result is compared, not the warning.
    """
    out = _REAL_STDERR[-1] if _REAL_STDERR else sys.stderr
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True, file=out)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', RuntimeWarning)
            warnings.simplefilter('ignore', np.exceptions.ComplexWarning)
            yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True)
def _short_regex_timeout(monkeypatch):
    """Catastrophic regexes give up sooner than by default, to keep the fuzz quick."""
    if hasattr(keys_module, 'MATCH_TIMEOUT'):
        monkeypatch.setattr(keys_module, 'MATCH_TIMEOUT', 0.2)


def outcome(what: str) -> None:
    """Counts outcomes for `--hypothesis-show-statistics` (and allows runs outside Hypothesis)."""
    with contextlib.suppress(InvalidArgument):
        event(f'outcome: {what}')


def build(specs: list[fz.Spec]) -> list[Any] | fz.RefError:
    """The rules, or the build error the reference expects (checked against the package)."""
    rules = []
    for spec in specs:
        try:
            fz.check_spec(spec)
            want = None
        except fz.RefError as e:
            want = e
        try:
            rule = spec.build()
        except osurg.SurgeryError as e:
            assert want is not None, f'{spec!r} raised {e!r}, but it is a valid rule'
            outcome('a rule is malformed')
            return want
        assert want is None, f'{spec!r} built, but {want}'
        rules.append(rule)
    return rules


def expect(case: fz.Case, values, kinds) -> tuple[Any, dict] | fz.RefError:
    try:
        ref = fz.Reference(values, kinds, case.target, stored=case.tree)
        for spec in case.specs:
            ref.apply(spec)
        return ref.result()
    except fz.RefError as e:
        return e


def slow_patterns(case: fz.Case) -> bool:
    return any(p in fz.CATASTROPHIC for s in case.specs for p in map(str, _strings(s.args)))


def _strings(args: Any) -> Iterator[Any]:
    for a in args:
        if isinstance(a, dict):
            yield from a
        else:
            yield a


def allowed_error(e: BaseException, want: Any, case: fz.Case, phase: str | None = None) -> None:
    """Checks an exception the package raised: a SurgeryError the reference expects."""
    if not isinstance(e, osurg.SurgeryError):
        raise AssertionError(f'{type(e).__name__} is not a SurgeryError: {e}') from e
    if 'timed out' in str(e) and slow_patterns(case):
        return  # The package gives up on a catastrophic regex sooner than the reference.
    if not isinstance(want, fz.RefError):
        raise AssertionError(f'raised {e!r}, but the reference gives a result') from e
    if phase is not None and want.phase != phase:
        raise AssertionError(f'raised {e!r} when planning, but the reference says {want}') from e


def check_plan(plan_fn, want: Any, case: fz.Case) -> None:
    """`resolve`/`plan_restore` raise a SurgeryError or list errors exactly when they should."""
    try:
        plan = plan_fn()
    except Exception as e:
        allowed_error(e, want, case, 'plan')
        return
    assert all(isinstance(e, osurg.SurgeryError) for e in plan.errors), plan.errors
    str(plan)  # The report must not fail either.
    assert all(r.needed >= 0 and r.chunked >= 0 for r in plan.reads.values())
    if plan.errors:
        if any('timed out' in str(e) for e in plan.errors) and slow_patterns(case):
            return
        assert isinstance(want, fz.RefError) and want.phase == 'plan', (plan.errors, want)
    else:
        assert not (isinstance(want, fz.RefError) and want.phase == 'plan'), want


def check_result(got: Any, want: tuple[Any, dict]) -> None:
    treedef, leaves = want
    assert jax.tree_util.tree_structure(got) == treedef
    flat = fz.flat_keys(got)
    assert set(flat) == set(leaves), (set(flat), set(leaves))
    for key, (v, leaf) in leaves.items():
        check_leaf(key, flat[key], v, leaf)


def check_leaf(key: str, got: Any, v: fz.V, leaf: fz.T) -> None:
    want = v.value
    if leaf.kind == 'jax.Array':
        assert isinstance(got, jax.Array), (key, type(got))
        if leaf.sharding is not None:
            assert got.sharding == leaf.sharding, (key, got.sharding, leaf.sharding)
        for shard in got.addressable_shards:
            assert_same(np.asarray(shard.data), want[shard.index], key)
    elif leaf.kind == 'np.ndarray':
        assert isinstance(got, np.ndarray), (key, type(got))
    else:
        like = type(leaf.value)(want.item()) if leaf.has_value else want.item()
        assert type(got) is type(like), (key, type(got), type(like))
        assert got == like or got != got and like != like, (key, got, like)
        return
    assert got.shape == want.shape and got.dtype == want.dtype, (key, got, want)
    assert_same(np.asarray(got), want, key)


def assert_same(got: np.ndarray, want: np.ndarray, key: str) -> None:
    """Equal dtype, shape and values, NaN equal to NaN (also for bfloat16 and float8)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (key, got, want)
    if np.issubdtype(want.dtype, np.integer) or want.dtype == np.bool_ or want.dtype.kind in 'iub':
        wide = np.int64 if want.dtype != np.uint64 else np.uint64
        np.testing.assert_array_equal(got.astype(wide), want.astype(wide), err_msg=key)
        return
    wide = np.complex128 if np.iscomplexobj(want) else np.float64
    a, b = got.astype(wide), want.astype(wide)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=key)
    np.testing.assert_array_equal(a[~np.isnan(a)], b[~np.isnan(b)], err_msg=key)


def run_in_memory(case: fz.Case) -> None:
    """`resolve` and `apply_rules` on the tree in memory."""
    rules = build(case.specs)
    if isinstance(rules, fz.RefError):
        return
    try:
        source = osurg.TreeSource(case.tree)
    except Exception as e:
        allowed_error(e, fz.RefError('plan', 'tree'), case)
        return
    values = {k: np.asarray(v) for k, v in source.values.items()}
    compare(
        case,
        expect(case, values, {k: s.stored_kind for k, s in source.arrays.items()}),
        lambda: osurg.resolve(source.arrays, case.target, rules),
        lambda: osurg.apply_rules(case.tree, case.target, rules),
    )


def run_from_checkpoint(case: fz.Case, path: str) -> None:
    """`plan_restore` and a lazy `restore` from the tree saved by plain Orbax."""
    rules = build(case.specs)
    if isinstance(rules, fz.RefError):
        return
    arrays = osurg.OrbaxCheckpoint(path).arrays
    stored = fz.flat_keys(case.tree)
    values = {k: np.asarray(stored[k]).astype(s.dtype) for k, s in arrays.items()}
    compare(
        case,
        expect(case, values, {k: s.stored_kind for k, s in arrays.items()}),
        lambda: osurg.plan_restore(path, case.target, rules),
        lambda: osurg.restore(path, case.target, rules),
    )


def compare(case: fz.Case, want: Any, plan_fn, restore_fn) -> None:
    """The plan and the restored tree agree with the reference, or raise a SurgeryError."""
    check_plan(plan_fn, want, case)
    try:
        got = restore_fn()
    except Exception as e:
        allowed_error(e, want, case)
        phase = want.phase if isinstance(want, fz.RefError) else 'timeout'
        outcome(f'{type(e).__name__} ({phase})')
        return
    assert not isinstance(want, fz.RefError), f'gave a result, but the reference says {want}'
    check_result(got, want)
    outcome('the reference result')


def savable(tree: Any) -> bool:
    """Orbax writes no empty containers nor Python complex numbers: not what is fuzzed."""
    nodes = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, dict | list))
    empty = any(isinstance(x, dict | list) and not x for x in nodes)
    return not empty and not any(isinstance(x, complex) for x in jax.tree_util.tree_leaves(tree))


def in_memory(case: fz.Case) -> None:
    with guarded():
        run_in_memory(case)


def from_checkpoint(case: fz.Case) -> None:
    with guarded(), tempfile.TemporaryDirectory() as tmp:
        path = f'{tmp}/ckpt'
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(path, case.tree)
        run_from_checkpoint(case, path)


# Orbax saves no zero-size arrays and no empty containers: not what is fuzzed here.
checkpoint_trees = fz.trees(sizes=[1, 2, 3, 4]).filter(savable)


@settings(FUZZ, max_examples=100)
@given(fz.cases())
def test_fuzz_quick(case):
    in_memory(case)


@pytest.mark.slow
@settings(FUZZ, max_examples=2000)
@given(fz.cases())
def test_fuzz_in_memory(case):
    in_memory(case)


@pytest.mark.slow
@settings(FUZZ, max_examples=300)
@given(fz.cases(checkpoint_trees))
def test_fuzz_from_an_orbax_checkpoint(case):
    from_checkpoint(case)


@pytest.mark.slow
@settings(FUZZ, max_examples=1000)
@given(fz.cases(kinds=['MapValue', 'MapValue', 'Combine', 'Cast', 'Slice', 'OrbaxTransforms']))
def test_fuzz_value_functions(case):
    """Mostly value functions: raising, untraceable, or returning the wrong thing."""
    in_memory(case)


def composed(kind: str, stack: bool, examples: int) -> None:
    @settings(FUZZ, max_examples=examples)
    @given(fz.stack_compositions(kind, stack))
    def check(case):
        in_memory(case)

    check()


COMPOSED = pytest.mark.parametrize('stack', [True, False], ids=['then_stack', 'after_unstack'])
EACH_RULE = pytest.mark.parametrize('kind', fz.PER_LAYER_KINDS)


@COMPOSED
@EACH_RULE
def test_every_rule_composes_with_stack_and_unstack_quick(kind, stack):
    composed(kind, stack, 40)


@pytest.mark.slow
@COMPOSED
@EACH_RULE
def test_every_rule_composes_with_stack_and_unstack(kind, stack):
    composed(kind, stack, 300)


def test_fuzz_quick_checkpoint_smoke():
    """One checkpoint round trip in the quick tier, so the Orbax path is not slow-only."""
    from_checkpoint(
        fz.Case({'a': np.arange(6.0).reshape(2, 3)}, [fz.Spec('Transpose', ('a', (1, 0)))], None)
    )


HUGE = [(2**40, 2**30), (2**62,), (8, 2**40, 0), (2**31, 8), ()]


@st.composite
def huge_plans(draw):
    """Metadata-only sources of huge arrays (bytes past int64), rules and sharded targets."""
    names = draw(st.lists(st.sampled_from(fz.NAMES), min_size=1, max_size=3, unique=True))
    sources = {
        n: jax.ShapeDtypeStruct(draw(st.sampled_from(HUGE)), draw(st.sampled_from(fz.DTYPES)))
        for n in names
    }
    keys = dict(sources)
    specs = []
    for n in range(draw(st.integers(0, 3))):
        spec = draw(fz.rule_spec(n, keys))
        if spec.kind not in ('MapValue', 'Combine', 'OrbaxTransforms'):
            specs.append(spec)  # Value functions would be traced on 2**70-byte inputs.
    target = None
    if draw(st.booleans()):
        target = {}
        for key, x in keys.items():
            shape = draw(st.sampled_from([x.shape, *HUGE]))
            target[key] = jax.ShapeDtypeStruct(shape, x.dtype, sharding=draw(fz.shardings(shape)))
    return sources, specs, target


@pytest.mark.slow
@settings(FUZZ, max_examples=300)
@given(huge_plans())
def test_fuzz_plans_of_huge_arrays(case):
    """Planning reads no data, so arrays of 2**70 bytes plan, print and estimate reads."""
    sources, specs, target = case
    with guarded():
        rules = build(specs)
        if isinstance(rules, fz.RefError):
            return
        try:
            plan = osurg.resolve(sources, None if target is None else fz.nest(target), rules)
        except osurg.SurgeryError:
            return
        assert all(isinstance(e, osurg.SurgeryError) for e in plan.errors), plan.errors
        str(plan)
        assert all(0 <= r.needed <= r.chunked for r in plan.reads.values()), plan.reads


LORA_DTYPES = [np.dtype(d) for d in [np.float32, np.float16, 'bfloat16', np.float64, np.int32]]


@st.composite
def lora_cases(draw):
    """A weight with its adapters (shapes and dtypes sometimes wrong), and a LoRA spec."""
    m, n = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    rank = draw(st.integers(1, 3))
    wrong = draw(st.sampled_from([None] * 4 + ['a-rows', 'b-cols', 'rank', 'dtype', 'spec']))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    dtype = draw(st.sampled_from(LORA_DTYPES))
    tree = {
        'w': rng.standard_normal((m, n)).astype(dtype),
        'w_lora_a': rng.standard_normal((m + (wrong == 'a-rows'), rank)).astype(np.float32),
        'w_lora_b': rng.standard_normal((rank + (wrong == 'rank'), n + (wrong == 'b-cols'))),
    }
    tree['w_lora_b'] = tree['w_lora_b'].astype(np.int32 if wrong == 'dtype' else np.float32)
    spec_rank = rank + (wrong == 'spec')
    alpha = draw(st.sampled_from([None, 1.0, 16.0, 0.0, -2.0]))
    too_big = spec_rank > min(m, n)  # A rank past the matrix's is refused on purpose.
    return tree, spec_rank, alpha, bool(wrong) or dtype == np.int32 or too_big


@pytest.mark.slow
@settings(FUZZ, max_examples=300)
@given(lora_cases())
def test_fuzz_merge_adapters(case):
    """MergeAdapters gives W + scale * A @ B or raises a SurgeryError, never another error."""
    tree, rank, alpha, bad = case
    with guarded():
        try:
            layout = osurg.LoraSpec(['w'], rank=rank, alpha=alpha).bind(tree)
            got = osurg.apply_rules(tree, None, [MergeAdapters(layout)])
        except Exception as e:
            assert isinstance(e, osurg.SurgeryError), f'{type(e).__name__}: {e}'
            assert bad, f'raised {e!r} on consistent adapters'
            return
    assert not bad, f'merged inconsistent adapters: {case}'  # Integer adapters included.
    w = tree['w']
    scale = (rank if alpha is None else alpha) / rank
    acc = np.float64 if w.dtype == np.float64 else np.float32
    want = w.astype(acc) + tree['w_lora_a'].astype(acc) @ tree['w_lora_b'].astype(acc) * scale
    assert set(got) == {'w'} and got['w'].dtype == w.dtype and got['w'].shape == w.shape
    tol = {np.dtype(np.float16): 1e-2, np.dtype('bfloat16'): 2e-2}.get(w.dtype, 1e-5)
    np.testing.assert_allclose(
        got['w'].astype(np.float64), want.astype(w.dtype).astype(np.float64), rtol=tol, atol=tol
    )
