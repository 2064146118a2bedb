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
    .../weight_g, weight_v            .../parametrizations/weight/original0, original1
    layers_0/...                      layers/0/... (`nn.ModuleList`), or a stacked `layers/...`

`from_pytorch(...)` gives the rules for an import, `to_pytorch(...)` for an
export. The import is target-driven, as Hugging Face's is: a target key says
which PyTorch tensor it wants, so a model's target tree is needed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Literal

from orbax_surgery import expr as ex
from orbax_surgery.errors import ShapeMismatchError
from orbax_surgery.keys import SEP, KeyPath, compile_pattern
from orbax_surgery.rules import Drop, Entry, Rename, Rule, Target, Tree
from orbax_surgery.stacking import Stack, Unstack

Layers = Literal['unrolled', 'stacked']


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

    Attributes:
        fan_in_fan_out: Regex of PyTorch weight keys stored `(in, out)` already
            (GPT-2's `Conv1D`): taken as kernels without a transpose.
    """

    fan_in_fan_out: str | None = None

    def __post_init__(self):
        if self.fan_in_fan_out is not None:
            compile_pattern(self.fan_in_fan_out, repr(self))

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        out = {k: e for k, e in tree.items() if not k.endswith('num_batches_tracked')}
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
            value = tree[weight].expr
            if self.fan_in_fan_out and re.fullmatch(self.fan_in_fan_out, weight):
                return weight, value
            if len(value.shape) == 2:
                return weight, ex.Transpose(value, (1, 0))
            if len(value.shape) >= 3:
                return weight, ex.Transpose(value, _conv_to_flax(len(value.shape)))
            raise ShapeMismatchError(
                f'{weight!r} has shape {value.shape}; a kernel needs >= 2 axes.'
            )
        names = {
            'scale': ('weight', 'gamma'),
            'embedding': ('weight',),
            'bias': ('beta',),
            'weight_g': ('parametrizations/weight/original0',),
            'weight_v': ('parametrizations/weight/original1',),
        }.get(name, ())
        if module.startswith('batch_stats/') or module == 'batch_stats':
            stat = {'mean': 'running_mean', 'var': 'running_var'}.get(name)
            inner = module.removeprefix('batch_stats').removeprefix(SEP)
            names, at = ((stat,) if stat else ()), (inner + SEP if inner else '')
        for candidate in names:
            if at + candidate in tree:
                return at + candidate, tree[at + candidate].expr
        return None


@dataclasses.dataclass(frozen=True)
class ToPyTorch:
    """Rule: Flax names and layouts renamed to PyTorch's (the reverse of `FromPyTorch`).

    Attributes:
        fan_in_fan_out: Regex of (PyTorch-named) weight keys to keep `(in, out)`.
    """

    fan_in_fan_out: str | None = None

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        out: dict[KeyPath, Entry] = {}
        for key, entry in tree.items():
            new, expr = self._renamed(key, entry.expr)
            out[new] = entry if expr is entry.expr and new == key else entry.then(self, expr)
        return out

    def _renamed(self, key: KeyPath, value: ex.Expr) -> tuple[KeyPath, ex.Expr]:
        module, _, name = key.rpartition(SEP)
        at = (module + SEP) if module else ''
        if module.startswith('batch_stats'):
            inner = module.removeprefix('batch_stats').removeprefix(SEP)
            at = inner + SEP if inner else ''
            return at + {'mean': 'running_mean', 'var': 'running_var'}.get(name, name), value
        if name == 'kernel':
            weight = at + 'weight'
            if self.fan_in_fan_out and re.fullmatch(self.fan_in_fan_out, weight):
                return weight, value
            if len(value.shape) == 2:
                return weight, ex.Transpose(value, (1, 0))
            return weight, ex.Transpose(value, _conv_to_torch(len(value.shape)))
        renamed = {
            'scale': 'weight',
            'embedding': 'weight',
            'weight_g': 'parametrizations/weight/original0',
            'weight_v': 'parametrizations/weight/original1',
        }.get(name)
        return (at + renamed, value) if renamed else (key, value)


@dataclasses.dataclass(frozen=True)
class ModuleLists:
    """Rule: `nn.ModuleList` entries (`layers/0/...`) as Flax names (`layers_0/...`), or back.

    Attributes:
        to_flax: The direction: `layers/0` -> `layers_0`, else back.
        names: Regex of the lists' names. Going back it matters: Flax's own
            automatic names (`Dense_0`) are not lists.
    """

    to_flax: bool = True
    names: str = r'[^/]+'

    def __post_init__(self):
        compile_pattern(self.names, repr(self))

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        if self.to_flax:
            pattern = re.compile(rf'(?:^|(?<=/))({self.names})/(\d+)(?=/|$)')
            repl = r'\1_\2'
        else:
            pattern = re.compile(rf'(?:^|(?<=/))({self.names})_(\d+)(?=/|$)')
            repl = r'\1/\2'
        out: dict[KeyPath, Entry] = {}
        for key, entry in tree.items():
            out[pattern.sub(repl, key)] = entry
        return out


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

    Args:
        drop_prefix: A leading key part to remove (a base model's prefix,
            e.g. 'model' for Llama, 'transformer' for GPT-2).
        add_prefix: A leading key part to add (e.g. 'params').
        layers: 'unrolled' turns `layers/0/...` into `layers_0/...`; 'stacked'
            stacks the module list along a new leading axis (`nn.scan`);
            None leaves module lists alone.
        stacked: With `layers='stacked'`, the pattern of list entries (`{i}`
            is the index; `\\1`, `\\2` the rest of the key).
        fan_in_fan_out: Regex of weight keys stored `(in, out)` (GPT-2's Conv1D).
        drop: Regexes of checkpoint keys to leave unread (buffers, tied copies).

    Example:
        >>> import numpy as np, orbax_surgery as osurg
        >>> ckpt = {'model': {'layers': {'0': {'q_proj': {'weight': np.ones((4, 2))}}},
        ...         'norm': {'weight': np.ones(2)}}}
        >>> target = {'layers_0': {'q_proj': {'kernel': ...}}, 'norm': {'scale': ...}}
        >>> out = osurg.apply_rules(ckpt, target, from_pytorch(drop_prefix='model'))
        >>> out['layers_0']['q_proj']['kernel'].shape
        (2, 4)
    """
    rules: list[Rule] = [Drop(p) for p in drop]
    if drop_prefix:
        rules.append(Rename(f'{re.escape(drop_prefix)}/(.*)', r'\1'))
    if layers == 'unrolled':
        rules.append(ModuleLists(to_flax=True))
    elif layers == 'stacked':
        rules.append(Stack(stacked, r'\1/\2'))
    rules.append(FromPyTorch(fan_in_fan_out=fan_in_fan_out))
    if add_prefix:
        rules.append(Rename('(.*)', f'{add_prefix}/\\1'))
    return rules


def to_pytorch(
    *,
    drop_prefix: str | None = None,
    add_prefix: str | None = None,
    layers: Layers | None = 'unrolled',
    lists: str = 'layers|layer|h|blocks',
    stacked: str = r'(.*?)/(.*)',
    fan_in_fan_out: str | None = None,
    drop: Sequence[str] = (),
) -> list[Rule]:
    """Rules that export a Flax tree in Hugging Face PyTorch naming and layout.

    The reverse of `from_pytorch`: `drop_prefix` removes a Flax prefix (e.g.
    'params'), `add_prefix` adds the base model's (e.g. 'model'), and
    `layers='unrolled'` turns `layers_0` into `layers/0` for the lists named
    by `lists`, and `layers='stacked'` unstacks `layers/...` into
    `layers/0/...` (with `stacked` matching the stacked keys as `(list)/(rest)`).
    """
    rules: list[Rule] = [Drop(p) for p in drop]
    if drop_prefix:
        rules.append(Rename(f'{re.escape(drop_prefix)}/(.*)', r'\1'))
    if layers == 'unrolled':
        rules.append(ModuleLists(to_flax=False, names=lists))
    elif layers == 'stacked':
        rules.append(Unstack(stacked, r'\1/{i}/\2'))
    rules.append(ToPyTorch(fan_in_fan_out=fan_in_fan_out))
    if add_prefix:
        rules.append(Rename('(.*)', f'{add_prefix}/\\1'))
    return rules
