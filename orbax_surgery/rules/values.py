"""Rules that rewrite values: cast, transpose, reshape, slice and Python functions."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from orbax_surgery.arrays import expr as ex
from orbax_surgery.arrays import ops
from orbax_surgery.arrays.value_functions import Apply, Elementwise
from orbax_surgery.errors import (
    DtypeMismatchError,
    RuleError,
    ShapeMismatchError,
    SurgeryError,
    UnmatchedKeyError,
)
from orbax_surgery.keys import KeyPath, check_template, did_you_mean
from orbax_surgery.rules.arguments import (
    fn_name,
    is_numeric,
    parse_dtype,
    parse_ints,
    predict_or_explain,
    signature,
)
from orbax_surgery.rules.rule import Entry, PatternRule, Target, Tree


@dataclasses.dataclass(frozen=True)
class _Map(PatternRule):
    """Base for rules that rewrite the value of each matching key."""

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        out = dict(tree)
        for key, _ in self._matching(list(tree), 'checkpoint'):
            try:
                out[key] = tree[key].then(self, self.rewrite(tree[key].expr))
            except SurgeryError as e:
                raise type(e)(f'{self!r} on {key!r} {signature(tree[key].expr)}: {e}') from e
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
        if not is_numeric(value.dtype):
            raise DtypeMismatchError(f'{value.describe()!r} has dtype {value.dtype}, not numbers.')
        if jnp.issubdtype(value.dtype, jnp.complexfloating) and not jnp.issubdtype(
            self.dtype, jnp.complexfloating
        ):
            raise DtypeMismatchError(
                f'Casting {value.describe()!r} from {value.dtype} to {self.dtype} would drop the '
                'imaginary part; use MapValue(..., np.real) if that is meant.'
            )
        return value if value.dtype == self.dtype else ops.Cast(value, self.dtype)


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
        return value if axes == tuple(range(n)) else ops.Transpose(value, axes)


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
        return value if shape == value.shape else ops.Reshape(value, shape)


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
        return ops.Index.of(value, self.index)


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
class Combine(PatternRule):
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
