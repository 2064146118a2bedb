"""PyTorch (Hugging Face) naming and layouts as rules, both ways.

What Hugging Face's own PyTorch <-> Flax converter takes care of, as lazy rules:

    Flax target                       PyTorch (Hugging Face) source
    .../kernel (in, out)              .../weight (out, in), transposed (Linear)
    .../kernel (kH, kW, in, out)      .../weight (out, in, kH, kW) (Conv2d; likewise 1-d and 3-d)
    .../kernel (in, out)              .../weight (in, out) as is, for `fan_in_fan_out` keys
                                      (GPT-2's Conv1D)
    .../scale                         .../weight (LayerNorm, RMSNorm), or .../gamma (old names)
    .../bias                          .../bias, or .../beta (old LayerNorm names)
    .../embedding                     .../weight (Embedding)
    batch_stats/.../mean, var         .../running_mean, running_var (num_batches_tracked dropped)
    .../weight_g, weight_v            .../weight_g, weight_v (old `weight_norm`), or
                                      .../parametrizations/weight/original0, original1 (new)
    layers_0/...                      layers/0/... (`nn.ModuleList`), or a stacked `layers/...`

A stacked (scanned) parameter is converted layer by layer: a stack of Linear
weights `(L, out, in)` becomes kernels `(L, in, out)`, never a 3-d conv kernel.

`from_pytorch(...)` gives the rules for an import, `to_pytorch(...)` for an
export. The import is target-driven, as Hugging Face's is: a target key says
which PyTorch tensor it wants, so a model's target tree is needed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Literal

from orbax_surgery.arrays import expr as ex
from orbax_surgery.arrays import ops
from orbax_surgery.errors import RuleError, ShapeMismatchError
from orbax_surgery.huggingface.pytorch_names import DropPrefix, ModuleLists
from orbax_surgery.keys import SEP, KeyPath, KeyPattern, compile_pattern
from orbax_surgery.rules.generated import Generated
from orbax_surgery.rules.layers import Stack, Unstack
from orbax_surgery.rules.moves import Drop, Rename
from orbax_surgery.rules.rule import Entry, Rule, Target, Tree

Layers = Literal['unrolled', 'stacked']
_OLD_WEIGHT_NORM = ('weight_g', 'weight_v')


def _conv_to_flax(ndim: int) -> tuple[int, ...]:
    """(out, in, *window) -> (*window, in, out)."""
    return (*range(2, ndim), 1, 0)


def _conv_to_torch(ndim: int) -> tuple[int, ...]:
    """(*window, in, out) -> (out, in, *window)."""
    return (ndim - 1, ndim - 2, *range(ndim - 2))


@dataclasses.dataclass(frozen=True)
class FromPyTorch:
    """Rule: each target key takes the PyTorch tensor Hugging Face's converter would give it.

    Target keys already in the tree are left alone, so earlier rules win.
    Stacks made by `Stack` are converted layer by layer. It fills what it can
    where it stands, and once more after the last rule, so a `Rename` placed
    after `from_pytorch(...)` works as well as one placed before it.

    Attributes:
        fan_in_fan_out: Regex of PyTorch weight keys stored `(in, out)` already
            (GPT-2's `Conv1D`): taken as kernels without a transpose.
        collection: The Flax collection the tree's parameters are under (e.g.
            'params', as `from_pytorch(add_prefix=...)` puts them): a target
            `batch_stats/<module>/mean` then takes `<collection>/<module>/running_mean`.

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import apply_rules
        >>> state_dict = {'proj': {'weight': np.ones((3, 2)), 'bias': np.zeros(3)},
        ...               'norm': {'weight': np.ones(2)}}
        >>> target = {'proj': {'kernel': ..., 'bias': ...}, 'norm': {'scale': ...}}
        >>> out = apply_rules(state_dict, target, [FromPyTorch()])
        >>> out['proj']['kernel'].shape, out['norm']['scale'].shape  # (out, in) -> (in, out)
        ((2, 3), (2,))
    """

    fan_in_fan_out: str | None = None
    collection: str | None = None

    def __post_init__(self):
        if self.fan_in_fan_out is not None:
            compile_pattern(self.fan_in_fan_out, repr(self))

    def settle(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        """After the last rule, fills the targets still empty, so rules placed after the
        preset (a `Rename` of PyTorch names, say) still get PyTorch layouts converted."""
        return self.apply(tree, target)

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        out = {k: e for k, e in tree.items() if k.rpartition(SEP)[2] != 'num_batches_tracked'}
        for key in target:
            if key in out:
                continue
            found = self._source_of(key, out)
            if found is None:
                continue
            source, expr = found
            out[key] = out.pop(source).then(self, expr)
        return out

    def _source_of(self, key: KeyPath, tree: Tree) -> tuple[KeyPath, ex.Expr] | None:
        module, _, name = key.rpartition(SEP)
        at = (module + SEP) if module else ''
        if name == 'kernel':
            weight = at + 'weight'
            if weight not in tree:
                return None
            return weight, self._kernel(weight, tree[weight].expr)
        names = {
            'scale': ('weight', 'gamma'),
            'weight': ('gamma',),
            'embedding': ('weight',),
            'bias': ('beta',),
            'weight_g': ('parametrizations/weight/original0',),
            'weight_v': ('parametrizations/weight/original1',),
        }.get(name, ())
        if module == 'batch_stats' or module.startswith('batch_stats' + SEP):
            stat = {'mean': 'running_mean', 'var': 'running_var'}.get(name)
            inner = SEP.join(p for p in (self.collection, module[len('batch_stats') + 1 :]) if p)
            names, at = ((stat,) if stat else ()), (inner + SEP if inner else '')
        for candidate in names:
            if at + candidate in tree:
                return at + candidate, tree[at + candidate].expr
        return None

    def _kernel(self, weight: KeyPath, value: ex.Expr) -> ex.Expr:
        """A PyTorch weight as a Flax kernel; a `Stack` of weights, layer by layer."""
        if self.fan_in_fan_out and KeyPattern(self.fan_in_fan_out, repr(self)).fullmatch(weight):
            return value
        if isinstance(value, ops.Stack):
            return ops.Stack(tuple(self._kernel(weight, p) for p in value.parts), value.axis)
        if len(value.shape) == 2:
            return ops.Transpose(value, (1, 0))
        if len(value.shape) >= 3:
            return ops.Transpose(value, _conv_to_flax(len(value.shape)))
        raise ShapeMismatchError(
            f'{self!r}: {weight!r} has shape {value.shape}, but a kernel needs >= 2 axes '
            '(Linear (out, in), Conv (out, in, *window)). Is the target key meant to be a '
            '`scale` or `embedding`?'
        )


@dataclasses.dataclass(frozen=True)
class ToPyTorch:
    """Rule: Flax names and layouts renamed to PyTorch's (the reverse of `FromPyTorch`).

    `weight_g`/`weight_v` become the new `weight_norm` names
    (`parametrizations/weight/original0`/`1`) unless the target uses the old
    ones (as Hugging Face follows the PyTorch model's own names).

    Attributes:
        fan_in_fan_out: Regex of (PyTorch-named) weight keys to keep `(in, out)`.

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import apply_rules
        >>> params = {'proj': {'kernel': np.ones((2, 3))}, 'norm': {'scale': np.ones(2)}}
        >>> out = apply_rules(params, None, [ToPyTorch()])
        >>> out['proj']['weight'].shape, list(out['norm'])
        ((3, 2), ['weight'])
    """

    fan_in_fan_out: str | None = None

    def __post_init__(self):
        if self.fan_in_fan_out is not None:
            compile_pattern(self.fan_in_fan_out, repr(self))

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        old_norms = any(k.rpartition(SEP)[2] in _OLD_WEIGHT_NORM for k in target)
        out: dict[KeyPath, Entry] = {}
        for key, entry in tree.items():
            new, expr = self._renamed(key, entry.expr, old_norms)
            out[new] = entry if expr is entry.expr and new == key else entry.then(self, expr)
        return out

    def _renamed(self, key: KeyPath, value: ex.Expr, old_norms: bool) -> tuple[KeyPath, ex.Expr]:
        module, _, name = key.rpartition(SEP)
        at = (module + SEP) if module else ''
        if old_norms and name in _OLD_WEIGHT_NORM:
            return key, value
        if module == 'batch_stats' or module.startswith('batch_stats' + SEP):
            inner = module.removeprefix('batch_stats').removeprefix(SEP)
            at = inner + SEP if inner else ''
            return at + {'mean': 'running_mean', 'var': 'running_var'}.get(name, name), value
        if name == 'kernel':
            weight = at + 'weight'
            fan_in_fan_out = self.fan_in_fan_out and KeyPattern(self.fan_in_fan_out, repr(self))
            if fan_in_fan_out and fan_in_fan_out.fullmatch(weight):
                return weight, value
            if len(value.shape) == 2:
                return weight, ops.Transpose(value, (1, 0))
            return weight, ops.Transpose(value, _conv_to_torch(len(value.shape)))
        renamed = {
            'scale': 'weight',
            'embedding': 'weight',
            'weight_g': 'parametrizations/weight/original0',
            'weight_v': 'parametrizations/weight/original1',
        }.get(name)
        return (at + renamed, value) if renamed else (key, value)


def from_pytorch(
    *,
    drop_prefix: str | None = None,
    add_prefix: str | None = None,
    layers: Layers | None = 'unrolled',
    stacked: str = r'(.*)/{i}/(.*)',
    fan_in_fan_out: str | None = None,
    drop: Sequence[str] = (),
) -> list[Rule]:
    """Rules that import a Hugging Face PyTorch checkpoint into a Flax target.

    The rules run in this order: `drop`, `drop_prefix`, `layers`,
    `add_prefix`, then `FromPyTorch`, which names and lays out each tensor
    the way the target asks for it.

    Args:
        drop_prefix: A leading key part to remove (a base model's prefix,
            e.g. 'model' for Llama, 'transformer' for GPT-2). Keys without it
            (a head's, e.g. `lm_head`) keep their names.
        add_prefix: A leading key part to add (e.g. 'params'). Target batch
            statistics (`batch_stats/...`) are taken from under it.
        layers: 'unrolled' turns `layers/0/...` into `layers_0/...`; 'stacked'
            stacks the module list along a new leading axis (`nn.scan`),
            converting each layer as it would an unrolled one; None leaves
            module lists alone.
        stacked: With `layers='stacked'`, the pattern of list entries (`{i}`
            is the index; `\\1`, `\\2` the rest of the key).
        fan_in_fan_out: Regex of weight keys stored `(in, out)` (GPT-2's
            Conv1D), matched after the prefix and layer rules.
        drop: Regexes of checkpoint keys to leave unread (buffers, tied copies).

    Returns:
        The rules, a list to extend or put after your own (earlier rules win).

    Raises:
        RuleError: `layers` is none of 'unrolled', 'stacked' or None.

    Example:
        >>> import numpy as np, orbax_surgery as osurg
        >>> ckpt = {'model': {'layers': {'0': {'q_proj': {'weight': np.ones((4, 2))}}},
        ...         'norm': {'weight': np.ones(2)}}}
        >>> target = {'layers_0': {'q_proj': {'kernel': ...}}, 'norm': {'scale': ...}}
        >>> out = osurg.apply_rules(ckpt, target, from_pytorch(drop_prefix='model'))
        >>> out['layers_0']['q_proj']['kernel'].shape
        (2, 4)
    """
    _check_layers(layers)
    given = {'drop_prefix': drop_prefix, 'add_prefix': add_prefix, 'drop': tuple(drop)}
    given |= {'layers': layers, 'stacked': stacked}
    defaults = {'layers': 'unrolled', 'stacked': r'(.*)/{i}/(.*)', 'drop': ()}
    shown = ', '.join(
        f'{k}={v!r}' for k, v in given.items() if v is not None and v != defaults.get(k)
    )
    by = f'from_pytorch({shown})'
    rules: list[Rule] = [Generated(Drop(p), by) for p in drop]
    if drop_prefix:
        rules.append(DropPrefix(drop_prefix, by))
    if layers == 'unrolled':
        rules.append(Generated(ModuleLists(to_flax=True), by))
    elif layers == 'stacked':
        rules.append(Generated(Stack(stacked, r'\1/\2'), by))
    if add_prefix:
        rules.append(Generated(Rename('(.*)', f'{add_prefix}/\\1'), by))
    rules.append(FromPyTorch(fan_in_fan_out=fan_in_fan_out, collection=add_prefix))
    return rules


def to_pytorch(
    *,
    drop_prefix: str | None = None,
    add_prefix: str | None = None,
    layers: Layers | None = 'unrolled',
    lists: str = 'layers|layer|h|blocks',
    stacked: str | None = None,
    fan_in_fan_out: str | None = None,
    drop: Sequence[str] = (),
    heads: str = 'lm_head|score|classifier|qa_outputs',
) -> list[Rule]:
    """Rules that export a Flax tree in Hugging Face PyTorch naming and layout.

    The reverse of `from_pytorch`: `drop_prefix` removes a Flax prefix (e.g.
    'params'; `batch_stats/...` become `running_mean`/`running_var` beside
    the weights), `layers='unrolled'` turns `layers_0` into `layers/0` for
    the lists named by `lists`, `layers='stacked'` unstacks the lists named
    by `lists` (`layers/...` into `layers/0/...`; `stacked` overrides which
    keys, as `(list)/(rest)`), and `add_prefix` adds the base model's prefix
    (e.g. 'model') to every key but the task heads named by `heads`, which
    Hugging Face keeps outside the base model (`lm_head.weight`).

    Raises:
        RuleError: `layers` is none of 'unrolled', 'stacked' or None.

    Example:
        >>> import numpy as np, orbax_surgery as osurg
        >>> params = {'layers': {'q_proj': {'kernel': np.ones((3, 2, 4))}},
        ...           'norm': {'scale': np.ones(2)}}
        >>> out = osurg.apply_rules(params, None, to_pytorch(layers='stacked', add_prefix='model'))
        >>> sorted(out['model']['layers']), out['model']['layers']['0']['q_proj']['weight'].shape
        (['0', '1', '2'], (4, 2))
    """
    _check_layers(layers)
    rules: list[Rule] = [Drop(p) for p in drop]
    if drop_prefix:
        rules.append(Rename(f'{re.escape(drop_prefix)}/(.*)', r'\1'))
    if layers == 'unrolled':
        rules.append(ModuleLists(to_flax=False, names=lists))
    elif layers == 'stacked':
        pattern = stacked if stacked is not None else rf'((?:.*/)?(?:{lists}))/(.*)'
        rules.append(Unstack(pattern, r'\1/{i}/\2'))
    rules.append(ToPyTorch(fan_in_fan_out=fan_in_fan_out))
    if add_prefix:
        rules.append(Rename(f'(?!(?:{heads})(?:/|$))(.*)', f'{add_prefix}/\\1'))
    return rules


def _check_layers(layers: object) -> None:
    if layers not in ('unrolled', 'stacked', None):
        raise RuleError(
            f"layers={layers!r} is none of 'unrolled' (layers_0/...), 'stacked' "
            '(one scanned layers/...) or None (module lists left as layers/0/...).'
        )
