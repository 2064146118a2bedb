"""Fuzzing rules and targets: random trees, rules and targets, and an eager NumPy reference.

`cases()` draws a tree of arrays, a list of rule specs (sensible and nonsense)
and a target. `reference(...)` computes, independently of the package, what
`apply_rules` must give, or which kind of `SurgeryError` it must raise: a
malformed rule ('build'), a plan that cannot work ('plan'), or a value function
that fails when it runs ('run').
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import regex
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orbax_surgery as osurg

DTYPES = [
    np.dtype(d)
    for d in [
        np.bool_,
        np.int8,
        np.uint8,
        np.int16,
        np.int32,
        np.int64,
        np.uint32,
        np.uint64,
        np.float16,
        jnp.bfloat16,
        np.float32,
        np.float64,
        np.complex64,
        np.complex128,
    ]
]
JAX_DTYPES = [np.dtype(d) for d in [np.bool_, np.int32, np.float32, jnp.bfloat16, np.uint8]]
SIZES = [0, 1, 2, 3, 4]
NAMES = ['a', 'b', 'w', 'kernel', 'x']
LONG_KEY = 'a' * 34 + 'b'
"""A key that catastrophic regexes such as `(a|aa)+$` backtrack on for ever."""

CATASTROPHIC = [r'(a|aa)+$', r'(a+)+$', r'(.*)*x', r'(a|a?)+b?c', r'(\w|\w\w)+\d']
BAD_REGEXES = ['(', '[', 'a**', '(?P<i>', 'a{99999999999}', '(?<=a+)b', ')']
CAST_DTYPES = [
    *(d.name for d in DTYPES),
    'int4',
    'float8_e4m3fn',
    'bfloat17',
    'str',
    'object',
    'V4',
    'float128',
]
MESHES = {'8': ((8,), ('x',)), '2x4': ((2, 4), ('a', 'b'))}
MATCH_TIMEOUT = 1.0
"""Seconds the reference spends on one regex match before calling it catastrophic."""


class RefError(Exception):
    """The reference's verdict that the package must raise a SurgeryError."""

    def __init__(self, phase: str, why: str):
        super().__init__(f'{phase}: {why}')
        self.phase = phase


class RefTimeout(RefError):
    """A regex match the reference gave up on: the package must not hang."""


# ---------------------------------------------------------------- value functions


def _raise(x):
    raise ZeroDivisionError('the user function failed')


def _astype_f32(x):
    return x.astype(jnp.float32)  # A Python scalar has no astype: fails only when run.


def _untraceable(x):
    return np.asarray(x) + 1


@dataclasses.dataclass(frozen=True)
class Fn:
    """A value function, whether it is elementwise, and the `out=` it is given."""

    name: str
    fn: Callable[..., Any]
    elementwise: bool
    out: str | None = None  # None, 'same' (input's shape/dtype), 'int8', 'shape7'

    def out_for(self, x: np.ndarray) -> jax.ShapeDtypeStruct | None:
        if self.out is None:
            return None
        if self.out == 'same':
            return jax.ShapeDtypeStruct(x.shape, x.dtype)
        if self.out == 'int8':
            return jax.ShapeDtypeStruct(x.shape, np.int8)
        return jax.ShapeDtypeStruct((7,), x.dtype)


FNS = [
    Fn('double', lambda x: x * 2, True),
    Fn('neg', lambda x: -x, True),
    Fn('raise', _raise, True, 'same'),
    Fn('raise_untraced', _raise, False),
    Fn('wrong_shape', lambda x: np.zeros(7), False, 'same'),
    Fn('none', lambda x: None, False, 'same'),
    Fn('text', lambda x: 'hello', False, 'same'),
    Fn('untraceable', _untraceable, False),
    Fn('untraceable_out', _untraceable, False, 'same'),
    Fn('sum', lambda x: x.sum(), False),
    Fn('sum_elementwise', lambda x: x.sum(), True),
    Fn('astype', _astype_f32, True),
    Fn('pair', lambda x: (x, x), False),
    Fn('wrong_dtype', lambda x: x, True, 'int8'),
    Fn('declared_wrong_shape', lambda x: x, False, 'shape7'),
]

COMBINE_FNS = {
    'concat': lambda *xs: jnp.concatenate([jnp.ravel(x) for x in xs]),
    'add': lambda *xs: sum(xs[1:], xs[0]),
    'raise': lambda *xs: _raise(xs),
}


# ---------------------------------------------------------------- rule specs


@dataclasses.dataclass(frozen=True)
class Spec:
    """One rule to build: its class name and arguments."""

    kind: str
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...] = ()

    def build(self) -> Any:
        kwargs = dict(self.kwargs)
        if self.kind == 'MapValue':
            pattern, fn, out = self.args
            return osurg.MapValue(pattern, fn.fn, elementwise=fn.elementwise, out=out)
        if self.kind == 'Combine':
            pattern, inputs, name, out = self.args
            return osurg.Combine(pattern, inputs, COMBINE_FNS[name], out=out)
        if self.kind == 'OrbaxTransforms':
            (tree,) = self.args
            return osurg.OrbaxTransforms(_transforms(tree), **kwargs)
        return getattr(osurg, self.kind)(*self.args, **kwargs)

    def __repr__(self):
        return f'{self.kind}{self.args!r}{dict(self.kwargs) or ""}'


def _transforms(tree: dict[str, Any]) -> dict[str, Any]:
    """Orbax Transforms from `(original_key, value_fn name, use_fallback)` triples."""
    out = {}
    for key, t in tree.items():
        if not isinstance(t, tuple):
            out[key] = t  # Nonsense: not a Transform.
            continue
        original, fn, fallback = t
        value_fn = None if fn is None else next(f.fn for f in FNS if f.name == fn)
        out[key] = ocp.Transform(original_key=original, value_fn=value_fn, use_fallback=fallback)
    return out


# ---------------------------------------------------------------- the reference


@dataclasses.dataclass(frozen=True)
class V:
    """A reference value: the array, how it comes back, what it reads, whether it fails."""

    value: np.ndarray
    kind: str
    refs: frozenset[str]
    tainted: bool = False  # Computing it runs a value function that fails.
    constant: bool = False


@dataclasses.dataclass(frozen=True)
class T:
    """A reference target leaf."""

    shape: tuple[int, ...] | None
    dtype: np.dtype | None
    kind: str | None
    sharding: Any = None
    value: Any = None
    has_value: bool = False


def _fullmatch(pattern: str, key: str) -> regex.Match | re.Match | None:
    if pattern in CATASTROPHIC:
        try:
            return regex.fullmatch(pattern, key, timeout=MATCH_TIMEOUT)
        except TimeoutError:
            raise RefTimeout('plan', f'{pattern!r} on {key!r} takes too long') from None
    return re.fullmatch(pattern, key)


def _check_regex(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as e:
        raise RefError('build', f'bad regex {pattern!r}: {e}') from None


def _check_template(pattern: re.Pattern[str], template: str) -> None:
    try:
        pattern.sub(template, '')
    except (re.error, IndexError) as e:
        raise RefError('build', f'bad template {template!r}: {e}') from None


def _combined_kind(parts: list[V], shape: tuple[int, ...]) -> str:
    kinds = [p.kind for p in parts]
    kind = 'jax.Array' if 'jax.Array' in kinds or not kinds else kinds[0]
    return 'np.ndarray' if kind == 'scalar' and shape != () else kind


def _derived(parts: list[V], value: np.ndarray, **kw: Any) -> V:
    return V(
        value,
        _combined_kind(parts, value.shape),
        frozenset().union(*(p.refs for p in parts)),
        any(p.tainted for p in parts),
        **kw,
    )


def _as_input(x: np.ndarray, kind: str) -> Any:
    if kind == 'jax.Array':
        return jax.device_put(x, jax.local_devices(backend='cpu')[0])
    if kind == 'scalar' and x.ndim == 0:
        return x.item()
    return x


def _predict(fn: Callable[..., Any], parts: list[V]) -> jax.ShapeDtypeStruct:
    specs = [jax.ShapeDtypeStruct(p.value.shape, p.value.dtype) for p in parts]
    try:
        with jax.enable_x64(any(p.value.dtype.itemsize == 8 for p in parts)):
            out = jax.eval_shape(fn, *specs)
    except Exception as e:
        raise RefError('plan', f'untraceable: {e!r}') from None
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise RefError('plan', 'not one array')
    return jax.ShapeDtypeStruct(tuple(out.shape), np.dtype(out.dtype))


def _run(fn: Callable[..., Any], parts: list[V], want: jax.ShapeDtypeStruct) -> tuple[Any, bool]:
    """The function's output, or placeholder zeros and True when it fails."""
    try:
        out = np.asarray(fn(*(_as_input(p.value, p.kind) for p in parts)))
    except Exception:
        out = None
    if out is None or out.shape != tuple(want.shape) or out.dtype != want.dtype:
        return np.zeros(want.shape, want.dtype), True
    return out, False


def _numeric(dtype: np.dtype) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_))


def _dtype(name: Any) -> np.dtype:
    try:
        dtype = jnp.dtype(name)
    except TypeError:
        raise RefError('build', f'not a dtype: {name!r}') from None
    if not _numeric(dtype):
        raise RefError('build', f'not numeric: {dtype}')
    return np.dtype(dtype)


def _matching(pattern: str, keys: list[str]) -> list[tuple[str, Any]]:
    found = [(k, m) for k in keys if (m := _fullmatch(pattern, k))]
    if not found:
        raise RefError('plan', f'{pattern!r} matches nothing')
    return found


def check_spec(spec: Spec) -> None:
    """Raises RefError('build') when building the rule must fail."""
    a = spec.args
    kw = dict(spec.kwargs)
    if spec.kind == 'OrbaxTransforms':
        for key, t in a[0].items():
            if not isinstance(t, tuple):
                raise RefError('build', 'not a Transform')
            p = _check_regex(key)
            if isinstance(t[0], str):
                _check_template(p, t[0])
        return
    if spec.kind == 'Stack':
        pattern = a[0]
        _check_regex(pattern)
        if '{i}' in pattern:
            _check_regex(pattern.replace('{i}', r'(?P<i>\d+)'))
            names = _check_regex(pattern.replace('{i}', r'\d+'))
        else:
            names = _check_regex(pattern)
            if 'i' not in names.groupindex:
                raise RefError('build', 'no {i}')
        _check_layers(kw.get('layers'))
        _check_template(names, a[1])
        return
    if spec.kind == 'Concatenate':
        if len(a[0]) < 2:
            raise RefError('build', 'one part')
        p = _check_regex(a[0][0])
        for t in (*a[0][1:], a[1]):
            _check_template(p, t)
        return
    p = _check_regex(a[0])
    if spec.kind == 'Split':
        if len(a[1]) < 2:
            raise RefError('build', 'one part')
        for t in a[1]:
            _check_template(p, t)
        sizes = kw.get('sizes')
        if sizes is not None and (
            len(sizes) != len(a[1]) or any(n < -1 for n in sizes) or sizes.count(-1) > 1
        ):
            raise RefError('build', 'bad sizes')
        return
    if spec.kind in ('Rename', 'Copy'):
        _check_template(p, a[1])
    elif spec.kind == 'Unstack':
        _check_layers(kw.get('layers'))
        if '{i}' not in a[1]:
            raise RefError('build', 'no {i}')
        _check_template(p, a[1].replace('{i}', '0'))
    elif spec.kind == 'Cast':
        _dtype(a[1])
    elif spec.kind == 'Reshape':
        if sum(n == -1 for n in a[1]) > 1 or any(n < -1 for n in a[1]):
            raise RefError('build', 'bad sizes')
    elif spec.kind == 'Combine':
        for t in a[1]:
            _check_template(p, t)


def _check_layers(layers: Any) -> None:
    if layers is not None and (not layers or len(set(layers)) != len(layers)):
        raise RefError('build', f'bad layers {layers}')


class Reference:
    """Applies rule specs to whole NumPy arrays, eagerly, as the docs describe them."""

    def __init__(
        self,
        values: dict[str, np.ndarray],
        kinds: dict[str, str],
        target: Any,
        stored: Any = None,
    ):
        self.stored = stored  # The tree as saved: without a target, its containers come back.
        self.vals = {k: V(np.asarray(v), kinds[k], frozenset([k])) for k, v in values.items()}
        self.sources = set(values)
        self.dropped: set[str] = set()
        self.target = target
        self.leaves = {} if target is None else read_target(target)
        self.errors: list[RefError] = []

    def apply(self, spec: Spec) -> None:
        before = {r for v in self.vals.values() for r in v.refs}
        try:
            check_spec(spec)
            rule = getattr(self, '_' + spec.kind.lower())
            self.vals = rule(self.vals, *spec.args, **dict(spec.kwargs))
        except RefError as e:
            self.errors.append(e)
            return
        self.dropped |= before - {r for v in self.vals.values() for r in v.refs}

    # -- rules

    def _rename(self, vals, pattern, template, keep=False):
        found = _matching(pattern, list(vals))
        names = {k for k, _ in found}
        out = dict(vals) if keep else {k: v for k, v in vals.items() if k not in names}
        for key, m in found:
            new = m.expand(template)
            if new in out:
                raise RefError('plan', f'{new!r} taken')
            out[new] = vals[key]
        return out

    def _copy(self, vals, pattern, template):
        return self._rename(vals, pattern, template, keep=True)

    def _drop(self, vals, pattern):
        names = {k for k, _ in _matching(pattern, list(vals))}
        return {k: v for k, v in vals.items() if k not in names}

    def _fallback(self, vals, pattern):
        out = dict(vals)
        for key, _ in _matching(pattern, list(self.leaves)):
            leaf = self.leaves[key]
            if not leaf.has_value:
                raise RefError('plan', 'fallback without a value')
            out[key] = _constant(leaf.value)
        return out

    def _each(self, vals, pattern, fn):
        out = dict(vals)
        for key, _ in _matching(pattern, list(vals)):
            v = fn(vals[key])
            if v.kind == 'scalar' and v.value.shape != ():
                v = dataclasses.replace(v, kind='np.ndarray')  # Only 0-d is a Python scalar.
            out[key] = v
        return out

    def _cast(self, vals, pattern, name):
        dtype = _dtype(name)

        def cast(v: V) -> V:
            if not _numeric(v.value.dtype):
                raise RefError('plan', 'not numbers')
            if np.iscomplexobj(v.value) and not jnp.issubdtype(dtype, jnp.complexfloating):
                raise RefError('plan', 'drops the imaginary part')
            return dataclasses.replace(v, value=v.value.astype(dtype), constant=False)

        return self._each(vals, pattern, cast)

    def _transpose(self, vals, pattern, axes):
        def transpose(v: V) -> V:
            n = v.value.ndim
            norm = tuple(a % n if -n <= a < n else a for a in axes)
            if sorted(norm) != list(range(n)):
                raise RefError('plan', 'not a permutation')
            return dataclasses.replace(v, value=np.transpose(v.value, norm), constant=False)

        return self._each(vals, pattern, transpose)

    def _reshape(self, vals, pattern, shape):
        def reshape(v: V) -> V:
            if -1 not in shape and math.prod(shape) != v.value.size:
                raise RefError('plan', 'other size')
            try:
                out = np.reshape(v.value, shape)
            except ValueError as e:
                raise RefError('plan', str(e)) from None
            return dataclasses.replace(v, value=out, constant=False)

        return self._each(vals, pattern, reshape)

    def _slice(self, vals, pattern, index):
        entries = index if isinstance(index, tuple) else (index,)

        def take(v: V) -> V:
            for i in entries:
                integer = isinstance(i, int | np.integer) and not isinstance(i, bool | np.bool_)
                ok = i is Ellipsis or isinstance(i, slice) or integer
                if not ok or isinstance(i, slice) and _bad_slice(i):
                    raise RefError('plan', f'not basic: {i!r}')
            if entries.count(Ellipsis) > 1:
                raise RefError('plan', 'two ellipses')
            try:
                out = np.asarray(v.value[entries])
            except (IndexError, ValueError) as e:
                raise RefError('plan', str(e)) from None
            return dataclasses.replace(v, value=out, constant=False)

        return self._each(vals, pattern, take)

    def _mapvalue(self, vals, pattern, fn: Fn, out):
        def apply(v: V) -> V:
            want = fn.out_for(v.value) if out is not None else _predict(fn.fn, [v])
            if fn.elementwise and tuple(want.shape) != v.value.shape:
                raise RefError('plan', 'elementwise changes the shape')
            value, failed = _run(fn.fn, [v], want)
            return (
                _derived(
                    [v],
                    value,
                )
                if not failed
                else dataclasses.replace(_derived([v], value), tainted=True)
            )

        return self._each(vals, pattern, apply)

    def _combine(self, vals, pattern, inputs, name, out):
        res = dict(vals)
        fn = COMBINE_FNS[name]
        for key, m in _matching(pattern, list(self.leaves)):
            names = [m.expand(t) for t in inputs]
            if any(n not in vals for n in names):
                raise RefError('plan', 'input missing')
            parts = [vals[n] for n in names]
            want = out if out is not None else _predict(fn, parts)
            value, failed = _run(fn, parts, want)
            res[key] = dataclasses.replace(
                _derived(parts, value), tainted=failed or any(p.tainted for p in parts)
            )
        return res

    def _split(self, vals, pattern, templates, axis=0, sizes=None):
        found = _matching(pattern, list(vals))
        names = {k for k, _ in found}
        out = {k: v for k, v in vals.items() if k not in names}
        for key, m in found:
            v = vals[key]
            n = v.value.ndim
            if not -n <= axis < n:
                raise RefError('plan', 'axis')
            total = v.value.shape[axis]
            if sizes is None:
                if total % len(templates):
                    raise RefError('plan', 'unequal parts')
                lengths = [total // len(templates)] * len(templates)
            else:
                known = sum(x for x in sizes if x != -1)
                if known > total or (-1 not in sizes and known != total):
                    raise RefError('plan', 'sizes')
                lengths = [total - known if x == -1 else x for x in sizes]
            pieces = np.split(v.value, np.cumsum(lengths)[:-1], axis=axis)
            for template, piece in zip(templates, pieces, strict=True):
                new = m.expand(template)
                if new in out:
                    raise RefError('plan', f'{new!r} taken')
                out[new] = dataclasses.replace(v, value=np.asarray(piece), constant=False)
        return out

    def _concatenate(self, vals, parts, template, axis=0):
        found = _matching(parts[0], list(vals))
        joined: dict[str, tuple[list[str], V]] = {}
        for key, m in found:
            names = [key, *(m.expand(t) for t in parts[1:])]
            if any(n not in vals for n in names):
                raise RefError('plan', 'part missing')
            values = [vals[n] for n in names]
            ndim = values[0].value.ndim
            if not -ndim <= axis < ndim:
                raise RefError('plan', 'axis')
            if any(
                v.value.dtype != values[0].value.dtype
                or v.value.ndim != ndim
                or np.delete(v.value.shape, axis % ndim).tolist()
                != np.delete(values[0].value.shape, axis % ndim).tolist()
                for v in values
            ):
                raise RefError('plan', 'parts differ')
            new = m.expand(template)
            if new in joined:
                raise RefError('plan', f'{new!r} joined twice')
            value = np.concatenate([v.value for v in values], axis=axis)
            joined[new] = (names, _derived(values, value))
        used = {n for names, _ in joined.values() for n in names}
        out = {k: v for k, v in vals.items() if k not in used}
        for new, (_, v) in joined.items():
            if new in out:
                raise RefError('plan', f'{new!r} taken')
            out[new] = v
        return out

    def _unstack(self, vals, pattern, template, axis=0, layers=None):
        found = _matching(pattern, list(vals))
        names = {k for k, _ in found}
        out = {k: v for k, v in vals.items() if k not in names}
        for key, m in found:
            v = vals[key]
            n = v.value.ndim
            if not -n <= axis < n:
                raise RefError('plan', 'axis')
            ax = axis % n
            count = v.value.shape[ax]
            chosen = range(count) if layers is None else layers
            if any(not -count <= i < count for i in chosen):
                raise RefError('plan', 'no such layer')
            family = m.expand(template)
            slot = re.compile(re.escape(family).replace(re.escape('{i}'), r'(\d+)'))
            wanted = sorted({int(s[1]) for k in self.leaves if (s := slot.fullmatch(k))})
            if wanted and wanted != list(range(len(chosen))):
                raise RefError('plan', 'target layer count')
            for i, layer in enumerate(chosen):
                new = family.replace('{i}', str(i))
                if new in out:
                    raise RefError('plan', f'{new!r} taken')
                value = np.asarray(np.take(v.value, layer % count, axis=ax))
                out[new] = dataclasses.replace(v, value=value, constant=False)
        return out

    def _stack(self, vals, pattern, template, axis=0, layers=None):
        if '{i}' in pattern:
            numbered = re.compile(pattern.replace('{i}', r'(?P<i>\d+)'))
            names = re.compile(pattern.replace('{i}', r'\d+'))
        else:
            numbered = names = re.compile(pattern)
        found = _matching(numbered.pattern, list(vals))
        families: dict[str, dict[int, str]] = {}
        for key, m in found:
            if not m['i'].isdigit():
                raise RefError('plan', 'layer not digits')
            family = families.setdefault(names.fullmatch(key).expand(template), {})
            if int(m['i']) in family:
                raise RefError('plan', 'layer twice')
            family[int(m['i'])] = key
        orders = {}
        for family, layer in families.items():
            if layers is None:
                if set(range(max(layer) + 1)) - set(layer):
                    raise RefError('plan', 'layers missing')
                orders[family] = sorted(layer)
            elif any(i not in layer for i in layers):
                raise RefError('plan', 'layers missing')
            else:
                orders[family] = list(layers)
        if len({len(o) for o in orders.values()}) > 1:
            raise RefError('plan', 'different counts')
        matched = {k for k, _ in found}
        out = {k: v for k, v in vals.items() if k not in matched}
        for family, order in orders.items():
            parts = [vals[families[family][i]] for i in order]
            ndim = parts[0].value.ndim + 1
            if not -ndim <= axis < ndim:
                raise RefError('plan', 'axis')
            if any(p.value.shape != parts[0].value.shape for p in parts) or any(
                p.value.dtype != parts[0].value.dtype for p in parts
            ):
                raise RefError('plan', 'parts differ')
            value = np.stack([p.value for p in parts], axis=axis % ndim)
            leaf = self.leaves.get(family)
            if leaf is not None and leaf.shape is not None and len(leaf.shape) == ndim:
                if leaf.shape[axis % ndim] != value.shape[axis % ndim]:
                    raise RefError('plan', 'target layer count')
            if family in out:
                raise RefError('plan', f'{family!r} taken')
            out[family] = _derived(parts, value)
        return out

    def _orbaxtransforms(self, vals, tree, default_to_original=True):
        out = {}
        for key, leaf in self.leaves.items():
            hits = [(k, t, m) for k, t in tree.items() if (m := _fullmatch(k, key))]
            if len(hits) > 1:
                raise RefError('plan', 'two transforms')
            if hits:
                _, (original, fn_name, fallback), m = hits[0]
                if fallback:
                    if default_to_original:
                        v = _target_value(leaf)
                    elif key not in vals:
                        raise RefError('plan', 'fallback key missing')
                    else:
                        v = vals[key]
                else:
                    source = m.expand(original) if original is not None else key
                    if source not in vals:
                        raise RefError('plan', 'original missing')
                    v = vals[source]
                    if fn_name is not None:
                        fn = next(f for f in FNS if f.name == fn_name)
                        try:
                            want = _predict(fn.fn, [v])
                        except RefError:
                            if leaf.shape is None:
                                raise
                            want = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
                        value, failed = _run(fn.fn, [v], want)
                        v = dataclasses.replace(_derived([v], value), tainted=failed or v.tainted)
            elif key in vals:
                v = vals[key] if default_to_original else _target_value(leaf)
            elif leaf.has_value:
                v = _target_value(leaf)
            else:
                continue
            if leaf.dtype is not None and v.value.dtype != leaf.dtype and not v.constant:
                v = dataclasses.replace(v, value=v.value.astype(leaf.dtype))
            out[key] = v
        return out

    # -- the result

    def result(self) -> tuple[Any, dict[str, tuple[V, T]]]:
        """The expected tree and, per key, the value and its target leaf; or RefError."""
        if self.errors:
            raise self.errors[0]
        leaves = self.leaves
        treedef = None
        if self.target is None:
            nested = nest(dict.fromkeys(self.vals, ...))
            if (
                self.stored is not None
                and self.vals
                and set(flat_keys(self.stored)) == set(self.vals)
            ):
                nested = jax.tree.map(lambda _: ..., self.stored)
            leaves = read_target(nested)
            treedef = jax.tree_util.tree_structure(nested)
        else:
            treedef = jax.tree_util.tree_structure(self.target)
        missing = [k for k in leaves if k not in self.vals]
        if missing:
            raise RefError('plan', f'missing {missing}')
        used = {r for k in leaves for r in self.vals[k].refs}
        if self.sources - used - self.dropped:
            raise RefError('plan', f'unused {self.sources - used - self.dropped}')
        out = {}
        for key, leaf in leaves.items():
            v = self.vals[key]
            if leaf.shape is not None:
                if leaf.shape != v.value.shape or leaf.dtype != v.value.dtype:
                    raise RefError('plan', f'{key!r} shape/dtype')
            kind = leaf.kind or v.kind
            if kind == 'jax.Array' and not _jax_holds(v.value.dtype):
                raise RefError('plan', f'{key!r}: JAX cannot hold {v.value.dtype}')
            out[key] = (v, dataclasses.replace(leaf, kind=kind))
        if any(v.tainted for v, _ in out.values()):
            raise RefError('run', 'a value function fails')
        return treedef, out


def _jax_holds(dtype: np.dtype) -> bool:
    """Whether a jax.Array keeps this dtype as it is (no x64: float64 becomes float32)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # 'float64 is not available': the answer is no.
            held = jax.numpy.zeros((), dtype).dtype
    except TypeError:
        return False
    return held == dtype


def _bad_slice(s: slice) -> bool:
    parts = (s.start, s.stop, s.step)
    return any(p is not None and type(p) is not int for p in parts) or s.step == 0


def _constant(value: Any) -> V:
    if isinstance(value, jax.Array):
        kind = 'jax.Array'
    elif isinstance(value, np.ndarray):
        kind = 'np.ndarray'
    else:
        kind = 'scalar'
    return V(np.asarray(value), kind, frozenset(), constant=True)


def _target_value(leaf: T) -> V:
    if not leaf.has_value:
        raise RefError('plan', 'target value missing')
    return _constant(leaf.value)


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, last = key.split('/')
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RefError('plan', 'leaf and subtree')
        if last in node:
            raise RefError('plan', 'leaf and subtree')
        node[last] = value
    return out


def read_target(tree: Any) -> dict[str, T]:
    flat = {}
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    for path, x in leaves:
        key = '/'.join(str(getattr(p, 'key', getattr(p, 'idx', None))) for p in path)
        if key in flat:
            raise RefError('plan', 'duplicate key path')
        if x is Ellipsis:
            flat[key] = T(None, None, None)
        elif isinstance(x, jax.ShapeDtypeStruct):
            flat[key] = T(tuple(x.shape), np.dtype(x.dtype), 'jax.Array', x.sharding)
        elif isinstance(x, jax.Array):
            flat[key] = T(tuple(x.shape), np.dtype(x.dtype), 'jax.Array', x.sharding, x, True)
        elif isinstance(x, np.ndarray):
            flat[key] = T(x.shape, x.dtype, 'np.ndarray', None, x, True)
        elif isinstance(x, np.generic):
            flat[key] = T((), x.dtype, 'scalar', None, x, True)
        elif isinstance(x, bool | int | float | complex):
            flat[key] = T((), np.asarray(x).dtype, 'scalar', None, x, True)
        else:
            raise RefError('plan', f'bad target leaf {x!r}')
    for key, leaf in flat.items():
        if leaf.sharding is not None:
            for n, axis in zip(leaf.shape, _spec_sizes(leaf), strict=False):
                if axis and n % axis:
                    raise RefError('plan', f'{key!r}: sharding does not divide')
    return flat


def _spec_sizes(leaf: T) -> list[int]:
    sharding = leaf.sharding
    if not isinstance(sharding, NamedSharding):
        return []
    sizes = []
    for entry in sharding.spec:
        names = () if entry is None else (entry,) if isinstance(entry, str) else entry
        sizes.append(math.prod(sharding.mesh.shape[n] for n in names))
    return sizes


# ---------------------------------------------------------------- strategies


@st.composite
def arrays(draw, dtypes=DTYPES, max_dims=3, sizes=SIZES, min_dims=0):
    dtype = draw(st.sampled_from(dtypes))
    shape = tuple(draw(st.lists(st.sampled_from(sizes), min_size=min_dims, max_size=max_dims)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if jnp.issubdtype(dtype, jnp.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    scale = draw(st.sampled_from([1.0, 1e4, 1e300 if dtype.itemsize >= 8 else 1e30]))
    x = rng.standard_normal(shape) * scale
    if jnp.issubdtype(dtype, jnp.complexfloating):
        x = x + 1j * rng.standard_normal(shape)
    if x.size and draw(st.booleans()):
        x.flat[0] = draw(st.sampled_from([np.inf, -np.inf, np.nan, -0.0]))
    with np.errstate(over='ignore', invalid='ignore'):
        return x.astype(dtype)


@st.composite
def leaves(draw, sizes=SIZES):
    what = draw(st.sampled_from(['array'] * 6 + ['jax', 'generic', 'python', 'zero-d']))
    if what == 'array':
        return draw(arrays(sizes=sizes))
    if what == 'zero-d':
        return draw(arrays(max_dims=0))
    if what == 'generic':
        return draw(arrays(max_dims=0))[()]
    if what == 'jax':
        return jax.device_put(draw(arrays(JAX_DTYPES, sizes=sizes)), jax.devices()[0])
    return draw(st.sampled_from([True, 3, -(2**40), 2.5, float('nan'), 1e300, 1 + 2j]))


@st.composite
def trees(draw, sizes=SIZES):
    """Nested dicts and lists, maybe with a layer family, an empty dict and a long key."""
    leaf = leaves(sizes)
    tree: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(NAMES), max_size=3, unique=True)):
        shape = draw(st.sampled_from(['leaf', 'dict', 'list']))
        if shape == 'leaf':
            tree[name] = draw(leaf)
        elif shape == 'dict':
            subs = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=2, unique=True))
            tree[name] = {s: draw(leaf) for s in subs}
        else:
            tree[name] = [draw(leaf) for _ in range(draw(st.integers(1, 2)))]
    if draw(st.booleans()):
        layer = draw(arrays(max_dims=2, sizes=sizes))
        for i in range(draw(st.integers(1, 3))):
            tree[f'layers_{i}'] = {'w': layer + 0 if layer.dtype != np.bool_ else layer.copy()}
    if draw(st.integers(0, 9)) == 0:
        tree['empty'] = {}
    if draw(st.integers(0, 14)) == 0:
        tree[LONG_KEY] = draw(arrays(max_dims=1, sizes=sizes))
    if not tree or draw(st.integers(0, 19)) == 0:
        tree['w'] = draw(arrays(sizes=sizes))
    return tree


def flat_keys(tree: Any) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {
        '/'.join(str(getattr(p, 'key', getattr(p, 'idx', None))) for p in path): x
        for path, x in leaves
    }


@st.composite
def patterns(draw, keys: list[str]):
    """A regex: one key exactly, one with a group, everything, nothing, or nonsense."""
    key = draw(st.sampled_from(keys)) if keys else 'nothing'
    how = draw(
        st.sampled_from(['exact'] * 10 + ['group'] * 3 + ['all', 'none', 'empty', 'bad', 'slow'])
    )
    if how == 'exact':
        return re.escape(key)
    if how == 'group':
        head, _, tail = key.rpartition('/')
        return f'{re.escape(head)}/(.*)' if head else '(.*)'
    if how == 'slow':
        return draw(st.sampled_from(CATASTROPHIC))
    return {
        'all': '.*',
        'none': 'no_such_key',
        'empty': '',
        'bad': draw(st.sampled_from(BAD_REGEXES)),
    }[how]


TEMPLATES = ['r{n}', r'r{n}/\1', r'\1', r'\2', r'\g<nope>', 'r{n}\\', r'\g<1>_{n}', '']
SPLIT_TEMPLATES = ['p{n}', 'q{n}', r'\1_p{n}', r'\1_q{n}', r'\2', 'a']


@st.composite
def basic_index(draw, ndim: int):
    entries = []
    for _ in range(draw(st.integers(0, ndim + 1))):
        what = draw(st.sampled_from(['int'] * 3 + ['slice'] * 4 + ['nonsense'] * 3))
        if what == 'int':
            entries.append(draw(st.integers(-5, 5)))
        elif what == 'slice':
            bound = st.one_of(st.none(), st.integers(-5, 5))
            step = st.sampled_from([None, 1, 2, -1, -3])
            entries.append(slice(draw(bound), draw(bound), draw(step)))
        else:
            entries.append(
                draw(
                    st.sampled_from(
                        [..., ..., None, True, 1.5, slice(0, 2, 0), slice(1.5, None), np.int8(0)]
                    )
                )
            )
    if len(entries) == 1 and draw(st.booleans()):
        return entries[0]
    return tuple(entries)


@st.composite
def rule_spec(
    draw,
    n: int,
    keys: dict[str, np.ndarray],
    kinds: list[str] | None = None,
    family: tuple[str, np.ndarray] | None = None,
):
    """One rule aimed at `keys`, or at every key of `family` (its pattern and one member)."""
    names = sorted(keys)
    if family is None:
        pattern = draw(patterns(names))
        key = next((k for k in names if re.escape(k) == pattern), None)
        x = keys.get(key) if key else None
    else:
        pattern, x = family
    ndim = x.ndim if x is not None else draw(st.integers(0, 3))
    kind = draw(
        st.sampled_from(
            kinds
            or ['Rename'] * 3
            + ['Copy', 'Drop', 'Drop', 'Cast', 'Cast', 'Transpose', 'Reshape', 'Slice', 'Slice']
            + ['MapValue'] * 3
            + ['Combine', 'Fallback', 'Stack', 'Unstack', 'OrbaxTransforms']
            + ['Split', 'Concatenate']
        )
    )
    if kind in ('Rename', 'Copy'):
        template = draw(st.sampled_from(TEMPLATES)).replace('{n}', str(n))
        return Spec(kind, (pattern, template))
    if kind in ('Drop', 'Fallback'):
        return Spec(kind, (pattern,))
    if kind == 'Cast':
        return Spec(kind, (pattern, draw(st.sampled_from(CAST_DTYPES))))
    if kind == 'Transpose':
        if draw(st.booleans()):
            axes = tuple(draw(st.permutations(range(ndim))))
        else:
            axes = tuple(draw(st.lists(st.integers(-4, 4), max_size=4)))
        return Spec(kind, (pattern, axes))
    if kind == 'Reshape':
        if x is not None and draw(st.booleans()):
            shape = draw(st.sampled_from([(-1,), (x.size,), x.shape[::-1], (1, -1), (-1, 1)]))
        else:
            shape = tuple(draw(st.lists(st.sampled_from([-2, -1, 0, 1, 2, 3, 2**40]), max_size=3)))
        return Spec(kind, (pattern, shape))
    if kind == 'Slice':
        return Spec(kind, (pattern, draw(basic_index(ndim))))
    if kind == 'Split':
        count = draw(st.sampled_from([2, 3, 1, 2, 3]))
        templates = tuple(
            draw(
                st.lists(
                    st.sampled_from(SPLIT_TEMPLATES), min_size=count, max_size=count, unique=True
                )
            )
        )
        kw: list[tuple[str, Any]] = []
        if draw(st.booleans()):
            kw.append(('axis', draw(st.integers(-ndim - 1, ndim))))
        if draw(st.booleans()):
            sizes = draw(st.lists(st.integers(-2, 4), min_size=count, max_size=count))
            kw.append(('sizes', tuple(sizes)))
        return Spec(kind, (pattern, tuple(t.replace('{n}', str(n)) for t in templates)), tuple(kw))
    if kind == 'Concatenate':
        some = draw(st.sampled_from([1, 2, 0, 1, 2]))
        others = draw(
            st.lists(st.sampled_from([*names, r'\1', 'no_such']), min_size=some, max_size=some)
        )
        template = draw(st.sampled_from(TEMPLATES)).replace('{n}', str(n))
        axis = (('axis', draw(st.integers(-ndim - 1, ndim))),) if draw(st.booleans()) else ()
        return Spec(kind, ((pattern, *others), template), axis)
    if kind == 'MapValue':
        fn = draw(st.sampled_from(FNS))
        out = None if fn.out is None or x is None else fn.out_for(x)
        if fn.out is not None and x is None:
            fn = dataclasses.replace(fn, out=None)
        return Spec(kind, (pattern, fn, out))
    if kind == 'Combine':
        inputs = tuple(
            draw(st.lists(st.sampled_from([*names, r'\1', 'no_such']), min_size=1, max_size=3))
        )
        return Spec(kind, (f'c{n}', inputs, draw(st.sampled_from(sorted(COMBINE_FNS))), None))
    if kind == 'Unstack':
        template = draw(st.sampled_from(['u{n}_{i}', r'\1_{i}', 'u{n}', 'layers_{i}/w']))
        kw = _layer_kwargs(draw)
        return Spec(kind, (pattern, template.replace('{n}', str(n))), kw)
    if kind == 'Stack':
        p = draw(
            st.sampled_from(
                [r'layers_{i}/(.*)', r'layers_(?P<i>\d+)/w', r'layers_(?P<i>.*)/w', pattern]
            )
        )
        template = draw(st.sampled_from([r's{n}/\1', 's{n}', r'\2']))
        return Spec(kind, (p, template.replace('{n}', str(n))), _layer_kwargs(draw))
    tree: dict[str, Any] = {}
    for _ in range(draw(st.integers(0, 2))):
        tkey = draw(st.sampled_from([pattern, f't{n}', r'(.*)_t', '(']))
        tree[tkey] = draw(
            st.sampled_from(
                [
                    (None, None, False),
                    (key or 'w', None, False),
                    (r'\1', None, False),
                    (None, None, True),
                    (key or 'w', 'double', False),
                    (key or 'w', 'raise_untraced', False),
                    'not a transform',
                ]
            )
        )
    return Spec(kind, (tree,), (('default_to_original', draw(st.booleans())),))


def _layer_kwargs(draw) -> tuple[tuple[str, Any], ...]:
    kw: list[tuple[str, Any]] = []
    if draw(st.booleans()):
        kw.append(('axis', draw(st.integers(-3, 3))))
    if draw(st.booleans()):
        kw.append(('layers', tuple(draw(st.lists(st.integers(-3, 3), max_size=3)))))
    return tuple(kw)


@st.composite
def shardings(draw, shape: tuple[int, ...]):
    choice = draw(st.sampled_from(['none', 'single', 'replicated', *MESHES]))
    if choice == 'none':
        return None
    if choice == 'single':
        return jax.sharding.SingleDeviceSharding(jax.devices()[draw(st.integers(0, 7))])
    mesh_shape, names = MESHES['8' if choice == 'replicated' else choice]
    mesh = jax.make_mesh(mesh_shape, names)
    if choice == 'replicated':
        return NamedSharding(mesh, P())
    spec = [draw(st.sampled_from([None, *names])) for _ in shape]
    if len(set(s for s in spec if s)) < len([s for s in spec if s]):
        spec = [None] * len(shape)  # A mesh axis used twice is not a sharding at all.
    return NamedSharding(mesh, P(*spec))


@st.composite
def target_leaf(draw, x: np.ndarray | None, kind: str | None):
    """A target leaf for a value like `x`: exact, wrong, or nonsense."""
    how = draw(st.sampled_from(['...'] * 3 + ['sds'] * 4 + ['numpy', 'python', 'wrong', 'huge']))
    if x is None or how == '...':
        return ...
    shape, dtype = x.shape, x.dtype
    if how == 'wrong':
        if draw(st.booleans()):
            shape = tuple(draw(st.lists(st.sampled_from(SIZES), max_size=3)))
        else:
            dtype = draw(st.sampled_from(DTYPES))
    if how == 'huge':
        return jax.ShapeDtypeStruct((2**40, 2**40, 8), np.float64)
    if how == 'numpy':
        return np.zeros(shape, dtype)
    if how == 'python':
        return draw(st.sampled_from([0.0, 1, True, 1j]))
    return jax.ShapeDtypeStruct(shape, dtype, sharding=draw(shardings(shape)))


@dataclasses.dataclass
class Case:
    tree: Any
    specs: list[Spec]
    target: Any

    def __repr__(self):
        return f'Case(tree={self.tree!r},\n     specs={self.specs!r},\n     target={self.target!r})'


@st.composite
def cases(draw, tree_strategy=None, kinds: list[str] | None = None):
    tree = draw(trees() if tree_strategy is None else tree_strategy)
    values = {k: np.asarray(v) for k, v in flat_keys(tree).items()}
    specs = []
    keys = dict(values)
    for n in range(draw(st.integers(0, 4))):
        spec = draw(rule_spec(n, keys, kinds))
        specs.append(spec)
        keys = _guess_keys(keys, spec)
    return draw(_with_target(tree, specs, keys))


PER_LAYER_KINDS = ['Rename', 'Copy', 'Drop', 'Cast', 'Transpose', 'Reshape', 'Slice', 'MapValue']
PER_LAYER_KINDS += ['Fallback', 'Split', 'Concatenate']


@st.composite
def stack_compositions(draw, kind: str, stack: bool):
    """A `kind` rule on every layer of a family and then `Stack`, or `Unstack` and then it."""
    fused = kind in ('Split', 'Concatenate')  # Mostly of arrays with an axis to cut or join.
    layer = draw(
        arrays(max_dims=2, sizes=[1, 2, 3], min_dims=int(fused and draw(st.integers(0, 4)) < 4))
    )
    count = draw(st.integers(1, 3))
    layers = [np.roll(layer, i) for i in range(count)]
    kw: list[tuple[str, Any]] = []
    if draw(st.booleans()):
        kw.append(('axis', draw(st.integers(-layer.ndim - 1, layer.ndim))))
    if draw(st.booleans()):
        order = draw(st.permutations(range(count)))
        kw.append(('layers', tuple(order[: draw(st.integers(1, count))])))
    if stack:
        tree = {f'layers_{i}': {'w': x} for i, x in enumerate(layers)}
        rule = draw(_per_layer(kind, r'layers_(\d+)/w', layer, [r'layers_\1/v', 'r0']))
        stack = Spec('Stack', (r'layers_{i}/(.*)', r's/\1'), tuple(kw))
        specs = [rule, stack]
    else:
        axis = dict(kw).get('axis', 0) % (layer.ndim + 1)
        tree = {'s': {'w': np.stack(layers, axis)}}
        unstack = Spec('Unstack', ('s/w', 'u_{i}'), tuple(kw))
        specs = [unstack, draw(_per_layer(kind, r'u_(\d+)', layer, [r'v_\1', r'u_\1/w', 'r1']))]
    keys = {k: np.asarray(v) for k, v in flat_keys(tree).items()}
    for spec in specs:
        keys = _guess_keys(keys, spec)
    return draw(_with_target(tree, specs, keys))


@st.composite
def _per_layer(draw, kind: str, pattern: str, layer: np.ndarray, templates: list[str]) -> Spec:
    """A rule on every layer, valid more often than not (names, indexes in range)."""
    if kind in ('Rename', 'Copy') and draw(st.integers(0, 3)) < 3:
        return Spec(kind, (pattern, draw(st.sampled_from(templates))))
    if kind == 'Slice' and draw(st.integers(0, 3)) < 3:
        return Spec(kind, (pattern, draw(_index_within(layer.shape))))
    if kind == 'Split' and layer.ndim and draw(st.integers(0, 3)) < 3:
        axis = draw(st.integers(-layer.ndim, layer.ndim - 1))
        n = layer.shape[axis]
        cut = draw(st.integers(0, n))
        sizes = draw(st.sampled_from([(cut, n - cut), None, (cut, -1), (-1, n - cut)]))
        family = templates[0]
        parts = (family, family.replace('v', 'v2') if 'v' in family else family + '_2')
        kw = (('axis', axis),) + ((('sizes', sizes),) if sizes else ())
        return Spec(kind, (pattern, parts), kw)
    if kind == 'Concatenate' and layer.ndim and draw(st.integers(0, 3)) < 3:
        axis = (('axis', draw(st.integers(-layer.ndim, layer.ndim - 1))),)
        return Spec(kind, ((pattern, r'\g<0>'), templates[0]), axis)
    return draw(rule_spec(0, {}, [kind], family=(pattern, layer)))


@st.composite
def _index_within(draw, shape: tuple[int, ...]):
    bound = st.one_of(st.none(), st.integers(-4, 4))
    index: list[Any] = []
    for n in shape[: draw(st.integers(0, len(shape)))]:
        if n and draw(st.booleans()):
            index.append(draw(st.integers(-n, n - 1)))
        else:
            index.append(slice(draw(bound), draw(bound), draw(st.sampled_from([None, 1, 2, -1]))))
    return index[0] if len(index) == 1 and draw(st.booleans()) else tuple(index)


@st.composite
def _with_target(draw, tree: Any, specs: list[Spec], keys: dict[str, np.ndarray]) -> Case:
    """The case with no target, a target of (most of) the expected keys, or nonsense in it."""
    how = draw(st.sampled_from(['none', 'none', 'leaves', 'leaves', 'leaves', 'nonsense']))
    if how == 'none':
        return Case(tree, specs, None)
    target: dict[str, Any] = {}
    for key in keys:
        if draw(st.integers(0, 9)) == 0:
            continue  # A missing key.
        target[key] = draw(target_leaf(keys[key], None))
    for spec in specs:
        name = spec.args[0]
        if spec.kind in ('Fallback', 'Combine') and re.fullmatch(r'[\w/]+', name):
            if draw(st.booleans()):
                target[name] = draw(arrays(max_dims=1)) if spec.kind == 'Fallback' else ...
    if how == 'nonsense':
        target[draw(st.sampled_from(['extra', 'w']))] = draw(
            st.sampled_from(['a string', None, jax.ShapeDtypeStruct((3,), np.float32), ...])
        )
    try:
        return Case(tree, specs, nest(target))
    except RefError:
        return Case(tree, specs, target)


def _guess_keys(keys: dict[str, np.ndarray], spec: Spec) -> dict[str, np.ndarray]:
    """The keys after `spec`, to aim later rules and the target at them (errors ignored)."""
    if any(p in CATASTROPHIC for p in map(str, spec.args)):
        return keys
    ref = Reference(keys, {k: 'np.ndarray' for k in keys}, None)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)
        warnings.simplefilter('ignore', np.exceptions.ComplexWarning)
        ref.apply(spec)
    return {k: v.value for k, v in ref.vals.items()}
