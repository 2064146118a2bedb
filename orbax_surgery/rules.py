"""Rules: ordered edits that turn the checkpoint's tree into the target tree.

Rules apply in order to a tree of lazy expressions keyed by path; each rule sees
the keys as the rules before it left them. Patterns are regexes matched with
`re.fullmatch`; replacements may use `\\1` and `\\g<name>` backreferences. A
rule whose pattern matches nothing is an error, since it is almost always a typo.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from orbax_surgery import expr as ex
from orbax_surgery.errors import (
    AmbiguousRuleError,
    DtypeMismatchError,
    RuleError,
    ShapeMismatchError,
    SurgeryError,
    UnmatchedKeyError,
)
from orbax_surgery.keys import KeyPath, KeyPattern, check_template, did_you_mean
from orbax_surgery.target import TargetLeaf
from orbax_surgery.value_fns import Apply, Elementwise, predict


@dataclasses.dataclass(frozen=True)
class Entry:
    """One key of the tree being rewritten: its value and the rules that shaped it."""

    expr: ex.Expr
    via: tuple[Rule, ...] = ()

    def then(self, rule: Rule, expr: ex.Expr | None = None) -> Entry:
        return Entry(self.expr if expr is None else expr, self.via + (rule,))


Tree = Mapping[KeyPath, Entry]
Target = Mapping[KeyPath, TargetLeaf]


class Rule(Protocol):
    """Anything with `apply(tree, target) -> tree`; see the classes below."""

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]: ...


@dataclasses.dataclass(frozen=True)
class _Pattern:
    """Base for rules that select keys with a regex."""

    pattern: str
    _re: KeyPattern = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, '_re', KeyPattern(self.pattern, repr(self)))

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        raise NotImplementedError(f'{type(self).__name__} is not a rule by itself.')

    def _matching(self, keys: Sequence[KeyPath], what: str) -> list[tuple[KeyPath, Any]]:
        found = [(k, m) for k in keys if (m := self._re.fullmatch(k))]
        if not found:
            raise UnmatchedKeyError(
                f'{self!r} matches none of the {len(keys)} {what} keys.'
                f'{did_you_mean(self.pattern, keys)}'
            )
        return found


@dataclasses.dataclass(frozen=True)
class _Move(_Pattern):
    """Base for Rename and Copy: new keys from a template."""

    replacement: str

    def __post_init__(self):
        super().__post_init__()
        check_template(self._re.compiled, self.replacement, repr(self))

    def _moved(self, tree: Tree, keep: bool) -> dict[KeyPath, Entry]:
        found = self._matching(list(tree), 'checkpoint')
        out = dict(tree) if keep else {k: e for k, e in tree.items() if not self._re.fullmatch(k)}
        for key, m in found:
            new = m.expand(self.replacement)
            if new in out:
                raise AmbiguousRuleError(
                    f'{self!r} maps {key!r} to {new!r}, which {_origin(new, out[new])} already '
                    'has. Drop one of them first, or make the pattern narrower.'
                )
            out[new] = tree[key].then(self)
        return out


@dataclasses.dataclass(frozen=True)
class Rename(_Move):
    r"""Renames checkpoint keys fully matching `pattern` to `replacement`.

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import apply_rules
        >>> rule = Rename(r'dense_(\d+)/(.*)', r'Dense_\1/\2')
        >>> out = apply_rules({'dense_0': {'w': np.ones(2)}}, None, [rule])
        >>> list(out), out['Dense_0']['w'].tolist()
        (['Dense_0'], [1.0, 1.0])
    """

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        return self._moved(tree, keep=False)


@dataclasses.dataclass(frozen=True)
class Copy(_Move):
    r"""Adds a copy of each matching key under `replacement`: tied weights.

    A host reads each stored chunk once however many targets use it (see
    `orbax_surgery.session`).

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import apply_rules
        >>> out = apply_rules({'embed': np.arange(3)}, None, [Copy('embed', 'lm_head')])
        >>> out['embed'].tolist(), out['lm_head'].tolist()
        ([0, 1, 2], [0, 1, 2])
    """

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        return self._moved(tree, keep=True)


@dataclasses.dataclass(frozen=True)
class Drop(_Pattern):
    """Leaves checkpoint keys fully matching `pattern` unread, on purpose.

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import apply_rules
        >>> tree = {'w': np.ones(2), 'opt_state': {'mu': np.zeros(2)}}
        >>> out = apply_rules(tree, {'w': ...}, [Drop(r'opt_state/.*')])
        >>> list(out), out['w'].tolist()
        (['w'], [1.0, 1.0])
    """

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        self._matching(list(tree), 'checkpoint')
        return {k: e for k, e in tree.items() if not self._re.fullmatch(k)}


@dataclasses.dataclass(frozen=True)
class Fallback(_Pattern):
    """Target keys matching `pattern` keep the value the target tree gives.

    Use it for new layers initialised by the model; any checkpoint array of the
    same name is left unread. The target leaf must be a concrete array.

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import apply_rules
        >>> target = {'w': ..., 'head': np.zeros(3)}  # The new head from model.init.
        >>> out = apply_rules({'w': np.ones(2)}, target, [Fallback('head')])
        >>> out['head'].tolist(), out['w'].tolist()
        ([0.0, 0.0, 0.0], [1.0, 1.0])
    """

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        out = dict(tree)
        for key, _ in self._matching(list(target), 'target'):
            leaf = target[key]
            if not leaf.has_value:
                raise RuleError(
                    f'{self!r} takes {key!r} from the target, but the target gives only its '
                    'shape there. Pass a concrete array for it (e.g. from model.init).'
                )
            out[key] = Entry(ex.Constant(leaf.value), (self,))
        return out


@dataclasses.dataclass(frozen=True)
class _Map(_Pattern):
    """Base for rules that rewrite the value of each matching key."""

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        out = dict(tree)
        for key, _ in self._matching(list(tree), 'checkpoint'):
            try:
                out[key] = tree[key].then(self, self.rewrite(tree[key].expr))
            except SurgeryError as e:
                raise type(e)(f'{self!r} on {key!r} {_sig(tree[key].expr)}: {e}') from e
        return out

    def rewrite(self, value: ex.Expr) -> ex.Expr:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Cast(_Map):
    """Casts matching arrays to `dtype` (NumPy `astype`: round to nearest even).

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import apply_rules
        >>> w = apply_rules({'w': np.ones(2)}, None, [Cast('w', 'bfloat16')])['w']
        >>> w.dtype.name, w.tolist()
        ('bfloat16', [1.0, 1.0])
    """

    dtype: Any

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, 'dtype', parse_dtype(self.dtype, repr(self)))

    def rewrite(self, value):
        if not _is_numeric(value.dtype):
            raise DtypeMismatchError(f'{value.describe()!r} has dtype {value.dtype}, not numbers.')
        if jnp.issubdtype(value.dtype, jnp.complexfloating) and not jnp.issubdtype(
            self.dtype, jnp.complexfloating
        ):
            raise DtypeMismatchError(
                f'Casting {value.describe()!r} from {value.dtype} to {self.dtype} would drop the '
                'imaginary part; use MapValue(..., np.real) if that is meant.'
            )
        return value if value.dtype == self.dtype else ex.Cast(value, self.dtype)


@dataclasses.dataclass(frozen=True)
class Transpose(_Map):
    """Permutes the axes of matching arrays, as `np.transpose(x, axes)`.

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import apply_rules
        >>> out = apply_rules({'w': np.arange(6).reshape(2, 3)}, None, [Transpose('w', (1, 0))])
        >>> out['w'].tolist()
        [[0, 3], [1, 4], [2, 5]]
    """

    axes: tuple[int, ...]

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, 'axes', parse_ints(self.axes, 'axes', repr(self)))

    def rewrite(self, value):
        n = len(value.shape)
        axes = tuple(a % n if -n <= a < n else a for a in self.axes)
        if sorted(axes) != list(range(n)):
            raise ShapeMismatchError(
                f'axes {self.axes} are not a permutation of the {n} axes of shape {value.shape}.'
            )
        return value if axes == tuple(range(n)) else ex.Transpose(value, axes)


@dataclasses.dataclass(frozen=True)
class Reshape(_Map):
    """Reshapes matching arrays in C order; one size may be -1.

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import apply_rules
        >>> tree = {'query': {'kernel': np.zeros((8, 6))}}  # (d, heads * head_dim)
        >>> out = apply_rules(tree, None, [Reshape(r'.*/kernel', (8, 2, -1))])
        >>> out['query']['kernel'].shape
        (8, 2, 3)
    """

    shape: tuple[int, ...]

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, 'shape', parse_ints(self.shape, 'shape', repr(self)))
        if sum(n == -1 for n in self.shape) > 1 or any(n < -1 for n in self.shape):
            raise RuleError(f'{self!r}: sizes must be >= 0, with at most one -1.')

    def rewrite(self, value):
        size = int(np.prod(value.shape))
        known = int(np.prod([n for n in self.shape if n != -1]))
        shape = self.shape
        if -1 in shape and known and size % known == 0:
            shape = tuple(size // known if n == -1 else n for n in shape)
        if -1 in shape or int(np.prod(shape)) != size:
            raise ShapeMismatchError(
                f'cannot reshape shape {value.shape} ({size} elements) into {self.shape}.'
            )
        return value if shape == value.shape else ex.Reshape(value, shape)


@dataclasses.dataclass(frozen=True)
class Slice(_Map):
    """Takes part of matching arrays with basic indexing (ints and slices).

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import apply_rules
        >>> out = apply_rules({'embed': np.arange(10)}, None, [Slice('embed', np.s_[:4])])
        >>> out['embed'].tolist()
        [0, 1, 2, 3]
    """

    index: Any

    def rewrite(self, value):
        return ex.Index.of(value, self.index)


@dataclasses.dataclass(frozen=True, repr=False)
class MapValue(_Map):
    """Applies `fn` to each matching array.

    By default `fn` gets the whole array, read on this host, and the plan marks
    the leaf as not lazy. With `elementwise=True` you promise that `fn` works
    element by element (`x * 2`, casts, `jnp.tanh`), and it runs per shard.
    The output's shape and dtype come from tracing `fn` with `jax.eval_shape`,
    or from `out` when `fn` cannot be traced.

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import apply_rules
        >>> rule = MapValue(r'.*/scale', lambda x: x + 1, elementwise=True)
        >>> rule
        MapValue('.*/scale', <lambda>, elementwise=True)
        >>> out = apply_rules({'norm': {'scale': np.zeros(2)}}, None, [rule])
        >>> out['norm']['scale'].tolist()
        [1.0, 1.0]
    """

    fn: Callable[[Any], Any]
    elementwise: bool = dataclasses.field(default=False, kw_only=True)
    out: jax.ShapeDtypeStruct | None = dataclasses.field(default=None, kw_only=True)

    def __repr__(self):
        extra = ', elementwise=True' if self.elementwise else ''
        return f'MapValue({self.pattern!r}, {fn_name(self.fn)}{extra})'

    def rewrite(self, value):
        out = self.out if self.out is not None else predict_or_explain(self.fn, value)
        label = fn_name(self.fn)
        if not self.elementwise:
            fn = self.fn
            return Apply(lambda xs: fn(xs[0]), (value,), tuple(out.shape), out.dtype, label)
        if tuple(out.shape) != value.shape:
            raise ShapeMismatchError(
                f'elementwise {label} turns shape {value.shape} into {out.shape}; an elementwise '
                'function keeps the shape. Drop elementwise=True.'
            )
        return Elementwise(self.fn, (value,), np.dtype(out.dtype), label)


@dataclasses.dataclass(frozen=True, repr=False)
class Combine(_Pattern):
    r"""Computes each target key matching `pattern` as `fn(*inputs)`.

    `inputs` are key templates expanded with the target key's match, so one rule
    serves every layer. `fn` gets whole arrays, read on this host (not lazy).

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from orbax_surgery import apply_rules
        >>> fuse = Combine(r'(.*)/qkv', (r'\1/q', r'\1/k', r'\1/v'), lambda *x: jnp.concatenate(x))
        >>> tree = {'attn': {n: np.full(2, i, np.float32) for i, n in enumerate('qkv')}}
        >>> qkv = apply_rules(tree, {'attn': {'qkv': ...}}, [fuse])['attn']['qkv']
        >>> qkv.dtype.name, qkv.tolist()
        ('float32', [0.0, 0.0, 1.0, 1.0, 2.0, 2.0])
    """

    inputs: tuple[str, ...]
    fn: Callable[..., Any]
    out: jax.ShapeDtypeStruct | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.inputs, str) or not isinstance(self.inputs, Sequence):
            raise RuleError(f'{self!r}: inputs is a sequence of key templates.')
        object.__setattr__(self, 'inputs', tuple(self.inputs))
        for template in self.inputs:
            check_template(self._re.compiled, template, repr(self))

    def __repr__(self):
        return f'Combine({self.pattern!r}, {self.inputs!r}, {fn_name(self.fn)})'

    def _call(self, values: list[Any]) -> Any:
        return self.fn(*values)

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        out = dict(tree)
        for key, m in self._matching(list(target), 'target'):
            names = [m.expand(t) for t in self.inputs]
            for name in names:
                if name not in tree:
                    raise UnmatchedKeyError(
                        f'{self!r} needs {name!r} for target {key!r}, which is not among the '
                        f'{len(tree)} keys.{did_you_mean(name, tree)}'
                    )
            parts = tuple(tree[n].expr for n in names)
            try:
                result = self.out if self.out is not None else predict_or_explain(self.fn, *parts)
            except RuleError as e:
                raise RuleError(f'{self!r} for target {key!r}: {e}') from e
            node = Apply(self._call, parts, tuple(result.shape), result.dtype, fn_name(self.fn))
            out[key] = Entry(node, (self,))
        return out


def predict_or_explain(
    fn: Callable[..., Any],
    *parts: ex.Expr,
    fix: str = 'Pass out=jax.ShapeDtypeStruct(shape, dtype).',
) -> jax.ShapeDtypeStruct:
    """The output a function will give on `parts`, or a RuleError saying why not."""
    try:
        return predict(fn, *(jax.ShapeDtypeStruct(p.shape, p.dtype) for p in parts))
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise RuleError(
            f'cannot tell what {fn_name(fn)} returns for {", ".join(_sig(p) for p in parts)} '
            f'without running it ({type(e).__name__}: {reason}). {fix}'
        ) from e


def parse_dtype(dtype: Any, owner: str) -> np.dtype:
    """A NumPy dtype from a name or type ('bfloat16' included), or a RuleError."""
    try:
        parsed = jnp.dtype(dtype)
    except TypeError as e:
        names = ['bfloat16', 'float16', 'float32', 'float64', 'int8', 'int32', 'int64', 'bool']
        raise RuleError(
            f'{owner}: {dtype!r} is not a dtype.{did_you_mean(str(dtype), names)}'
        ) from e
    if not _is_numeric(parsed):
        raise RuleError(f'{owner}: {parsed} is not a numeric dtype; arrays cannot be cast to it.')
    return np.dtype(parsed)


def parse_ints(values: Any, what: str, owner: str) -> tuple[int, ...]:
    """A sequence of ints (axes, sizes, layers), or a RuleError naming `what`.

    Example:
        >>> parse_ints([1, 0], 'axes', 'Transpose(...)')
        (1, 0)
        >>> parse_ints('ab', 'axes', 'Transpose(...)')  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        orbax_surgery.errors.RuleError: Transpose(...): axes must be a sequence of ints, not 'ab'.
    """
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        raise RuleError(f'{owner}: {what} must be a sequence of ints, not {values!r}.')
    return tuple(parse_int(v, what, owner, plural=True) for v in values)


def parse_int(value: Any, what: str, owner: str, *, plural: bool = False) -> int:
    """An int (a NumPy integer too; not a bool or float), or a RuleError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        kind = 'ints' if plural else 'an int'
        raise RuleError(f'{owner}: {what} must be {kind}, not {value!r}.')
    return int(value)


def fn_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, '__name__', None) or type(fn).__name__


def _origin(key: KeyPath, entry: Entry) -> str:
    """Where a key's value comes from, for messages."""
    if not entry.via:
        return f'checkpoint key {key!r}'
    return f'{entry.expr.describe()!r} (made {key!r} by {entry.via[-1]!r})'


def _is_numeric(dtype: np.dtype) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_))


def _sig(value: ex.Expr) -> str:
    return f'{value.shape} {value.dtype}'
