"""Presets: the rules and the target tree of a model family, from its `config.json` alone.

`preset(config_or_dir)` reads `model_type` and the sizes, and returns the rules
that import the family's Hugging Face checkpoints into its canonical Flax
layout (see `architectures`), the rules that export that layout back, and the
target tree with every shape, so `plan_restore` needs no model code.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, Literal

import jax
import numpy as np

from orbax_surgery.errors import RuleError
from orbax_surgery.huggingface import maxtext
from orbax_surgery.huggingface.architectures import (
    Family,
    Sizes,
    dtype_of,
    family_of,
    read_config,
)
from orbax_surgery.huggingface.pytorch_rules import ModuleLists, ToPyTorch, from_pytorch
from orbax_surgery.keys import KeyPath, PyTree, nest
from orbax_surgery.rules.fused import Concatenate, Split
from orbax_surgery.rules.layers import Stack, Unstack
from orbax_surgery.rules.moves import Copy, Drop, Rename
from orbax_surgery.rules.rule import Entry, Rule, Target, Tree
from orbax_surgery.rules.target import read_target
from orbax_surgery.rules.values import Reshape

LayerLayout = Literal['unrolled', 'stacked']
_EXPERTS = (('w1', 'gate_proj'), ('w3', 'up_proj'), ('w2', 'down_proj'))
_BUFFERS = (
    r'(.*/)?(rotary_emb/inv_freq|attn/bias|attn/masked_bias|attention/bias|attention/masked_bias)'
)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model family's rules both ways and its target tree, for one config.

    Attributes:
        family: The family's name ('llama', 'gpt2', ...); `config['model_type']`
            may name a member (e.g. 'mistral' is a 'llama').
        config: The config it was made from, as a dict.
        layers: 'unrolled' (`layers_0/...`) or 'stacked' (one `layers/...` with a
            leading layer axis, as `nn.scan` stores it; MaxText's is the second).
        import_rules: Hugging Face checkpoint -> the canonical Flax layout.
        export_rules: The canonical Flax layout -> Hugging Face names and layouts.
        target: The Flax parameter tree as `jax.ShapeDtypeStruct`s, in the
            config's dtype (place it with `jax.tree.map` before restoring).
        to: The layout: 'flax' or 'maxtext'.

    Example:
        >>> p = preset({'model_type': 'gpt2', 'vocab_size': 64, 'n_embd': 16,
        ...             'n_layer': 2, 'n_head': 2, 'n_positions': 32})
        >>> p.family, sorted(p.target['h_0']['attn'])
        ('gpt2', ['c_proj', 'k_proj', 'q_proj', 'v_proj'])
    """

    family: str
    config: Mapping[str, Any]
    layers: LayerLayout
    import_rules: tuple[Rule, ...]
    export_rules: tuple[Rule, ...]
    target: PyTree
    to: str = 'flax'

    def __repr__(self):
        model_type = self.config.get('model_type')
        return (
            f'Preset({self.family!r}, model_type={model_type!r}, to={self.to!r}, '
            f'layers={self.layers!r}, '
            f'{len(self.import_rules)} import rules, {len(self.export_rules)} export rules)'
        )


def preset(
    config: Any,
    *,
    layers: LayerLayout = 'unrolled',
    dtype: Any = None,
    to: Literal['flax', 'maxtext'] = 'flax',
) -> Preset:
    """The preset for a Hugging Face model: its `config.json`, directory, dict or config object.

    Args:
        config: A model directory (local or a URL) holding `config.json`, the
            file itself, a dict, or a `transformers` config.
        layers: 'unrolled' or 'stacked' (scanned) layers in the Flax layout.
        dtype: The target's dtype; the config's `dtype` (`torch_dtype`) by default.
        to: 'flax', the canonical Flax layout (see `architectures`), or 'maxtext',
            MaxText's parameter tree (Llama, Mistral, Gemma, Gemma 2, Qwen 2, Qwen 3
            and Mixtral; see `maxtext`).

    Raises:
        RuleError: an unknown `model_type` (the message lists the known ones) or
            a `layers` value other than 'unrolled' and 'stacked'.

    Example:
        >>> p = preset({'model_type': 'llama', 'vocab_size': 256, 'hidden_size': 64,
        ...     'intermediate_size': 128, 'num_hidden_layers': 2,
        ...     'num_attention_heads': 4, 'num_key_value_heads': 2}, layers='stacked')
        >>> p.family, p.target['layers']['self_attn']['k_proj']['kernel'].shape
        ('llama', (2, 64, 32))
    """
    data = read_config(config)
    family = family_of(data)
    if layers not in ('unrolled', 'stacked'):
        raise RuleError(f"layers={layers!r}: a preset's layers are 'unrolled' or 'stacked'.")
    if to not in ('flax', 'maxtext'):
        raise RuleError(f"to={to!r}: a preset writes 'flax' or 'maxtext' layouts.")
    sizes = family.sizes(data)
    dtype = np.dtype(dtype) if dtype is not None else dtype_of(data)
    if to == 'maxtext':
        maxtext.check_family(family)
        stacked = layers == 'stacked'
        return Preset(
            family=family.name,
            config=data,
            layers=layers,
            import_rules=(
                _Through(
                    tuple(_import_rules(family, sizes, 'unrolled')),
                    _target(family, sizes, 'unrolled', dtype),
                ),
                *maxtext.from_flax(family, sizes, data, stacked),
            ),
            export_rules=(
                *maxtext.to_flax(family, sizes, data, stacked),
                *_export_rules(
                    family, sizes, 'unrolled', with_head=maxtext.keeps_head(family, sizes)
                ),
            ),
            target=_layered(
                maxtext.shapes(family, sizes),
                'layers',
                maxtext.layer_count(family, sizes),
                stacked,
                1,
                dtype,
            ),
            to=to,
        )
    return Preset(
        family=family.name,
        config=data,
        layers=layers,
        import_rules=tuple(_import_rules(family, sizes, layers)),
        export_rules=tuple(_export_rules(family, sizes, layers)),
        target=_target(family, sizes, layers, dtype),
    )


def _layered(
    shapes: dict[str, tuple[int, ...]],
    layers: str,
    count: int,
    stacked: bool,
    axis: int,
    dtype: np.dtype,
) -> PyTree:
    """The target tree of `shapes`, whose `{layers}_{i}` keys become one key per layer or,
    stacked, one `{layers}` key with the layer axis at `axis` (Flax's 0, MaxText's 1)."""
    block = f'{layers}_{{i}}'
    flat: dict[KeyPath, jax.ShapeDtypeStruct] = {}
    for key, shape in shapes.items():
        if block not in key:
            flat[key] = jax.ShapeDtypeStruct(shape, dtype)
        elif stacked:
            stacked_shape = (*shape[:axis], count, *shape[axis:])
            flat[key.replace(block, layers)] = jax.ShapeDtypeStruct(stacked_shape, dtype)
        else:
            for i in range(count):
                flat[key.replace('{i}', str(i))] = jax.ShapeDtypeStruct(shape, dtype)
    return nest(flat)


def _target(family: Family, sizes: Sizes, layers: LayerLayout, dtype: np.dtype) -> PyTree:
    shapes = family.shapes(sizes)
    return _layered(shapes, family.layers, sizes.layers, layers == 'stacked', 0, dtype)


def _import_rules(family: Family, s: Sizes, layers: LayerLayout) -> list[Rule]:
    p = re.escape(family.prefix)
    rules: list[Rule] = [_IfPresent(Drop(_BUFFERS))]
    if family.name == 'phi3':
        q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
        rules.append(
            Split(r'(.*)/qkv_proj/weight', _names(r'\1/{}_proj/weight'), sizes=(q, kv, kv))
        )
        rules.append(
            Split(r'(.*)/gate_up_proj/weight', (r'\1/gate_proj/weight', r'\1/up_proj/weight'))
        )
    elif family.name == 'mixtral':
        for old, new in _EXPERTS:
            moe = r'(.*)/block_sparse_moe/experts/{i}/' + old + '/weight'
            rules.append(Stack(moe, rf'\1/mlp/experts/{new}/weight'))
        rules.append(Rename(r'(.*)/block_sparse_moe/gate/weight', r'\1/mlp/gate/weight'))
    elif family.name == 'gpt2':
        for leaf, axis in (('weight', 1), ('bias', 0)):  # Conv1D: (in, 3 * out).
            rules.append(
                Split(rf'(.*)/attn/c_attn/{leaf}', _names(rf'\1/attn/{{}}_proj/{leaf}'), axis)
            )
    elif family.name == 'gpt_neox':
        h, hd, d = s.heads, s.head_dim, s.hidden
        for leaf, per_head in (('weight', (hd, d)), ('bias', (hd,))):
            fused = rf'(.*)/attention/query_key_value/{leaf}'
            rules.append(Reshape(fused, (h, 3, *per_head)))  # Rows are (head, q|k|v, dim).
            rules.append(Split(fused, _names(rf'\1/attention/{{}}_proj/{leaf}'), axis=1))
            rules.append(Reshape(rf'(.*)/attention/[qkv]_proj/{leaf}', (h * hd, *per_head[1:])))
        rules.append(_IfPresent(Rename('lm_head/weight', 'embed_out/weight')))
    if s.tied and family.head:  # Unless the checkpoint stores the tied head too.
        copy = Copy(rf'{p}/{family.embedding}/weight', f'{family.head}/weight')
        rules.append(_IfPresent(copy, absent=f'{family.head}/weight'))
    gpt2_conv1d = r'.*/(attn/(q_proj|k_proj|v_proj|c_proj)|mlp/(c_fc|c_proj))/weight'
    rules += from_pytorch(
        drop_prefix=family.prefix,
        layers=layers,
        stacked=rf'({family.layers})/{{i}}/(.*)',
        fan_in_fan_out=gpt2_conv1d if family.name == 'gpt2' else None,
    )
    return rules


def _export_rules(
    family: Family, s: Sizes, layers: LayerLayout, *, with_head: bool = True
) -> list[Rule]:
    """The canonical Flax layout -> Hugging Face's; `with_head=False` where a tied layout
    keeps no head (MaxText's Gemma and tied Qwen), so there is none to drop."""
    rules: list[Rule] = []
    if s.tied and family.head and with_head:
        rules.append(Drop(f'{family.head}/kernel'))  # Hugging Face ties it to the embedding.
    if layers == 'stacked':
        rules.append(Unstack(rf'({family.layers})/(.*)', r'\1/{i}/\2'))
    else:
        rules.append(ModuleLists(to_flax=False, names=family.layers))
    if family.name == 'mixtral':
        for old, new in _EXPERTS:
            experts = rf'(.*)/mlp/experts/{new}/kernel'
            rules.append(Unstack(experts, rf'\1/block_sparse_moe/experts/{{i}}/{old}/kernel'))
        rules.append(Rename(r'(.*)/mlp/gate/kernel', r'\1/block_sparse_moe/gate/kernel'))
    gpt2_conv1d = r'.*/(attn/(q_proj|k_proj|v_proj|c_proj)|mlp/(c_fc|c_proj))/weight'
    rules.append(ToPyTorch(fan_in_fan_out=gpt2_conv1d if family.name == 'gpt2' else None))
    if family.name == 'phi3':
        rules.append(
            Concatenate(_parts(r'(.*)/self_attn/q_proj/weight'), r'\1/self_attn/qkv_proj/weight')
        )
        rules.append(
            Concatenate(
                (r'(.*)/mlp/gate_proj/weight', r'\1/mlp/up_proj/weight'),
                r'\1/mlp/gate_up_proj/weight',
            )
        )
    elif family.name == 'gpt2':
        for leaf, axis in (('weight', 1), ('bias', 0)):
            rules.append(
                Concatenate(_parts(rf'(.*)/attn/q_proj/{leaf}'), rf'\1/attn/c_attn/{leaf}', axis)
            )
    elif family.name == 'gpt_neox':
        h, hd, d = s.heads, s.head_dim, s.hidden
        for leaf, per_head in (('weight', (hd, d)), ('bias', (hd,))):
            rules.append(Reshape(rf'(.*)/attention/[qkv]_proj/{leaf}', (h, 1, *per_head)))
            fused = rf'\1/attention/query_key_value/{leaf}'
            rules.append(Concatenate(_parts(rf'(.*)/attention/q_proj/{leaf}'), fused, axis=1))
            rules.append(
                Reshape(rf'(.*)/attention/query_key_value/{leaf}', (3 * h * hd, *per_head[1:]))
            )
    heads = 'lm_head|embed_out'
    rules.append(Rename(f'(?!(?:{heads})(?:/|$))(.*)', f'{family.prefix}/\\1'))
    return rules


def _names(template: str) -> tuple[str, str, str]:
    """`template` for q, k and v: `_names(r'\\1/{}_proj/weight')`."""
    return (template.format('q'), template.format('k'), template.format('v'))


def _parts(q_pattern: str) -> tuple[str, str, str]:
    """A `Concatenate`'s parts: the q key's pattern, then its k and v templates."""
    rest = q_pattern.removeprefix('(.*)')
    return (
        q_pattern,
        r'\1' + rest.replace('q_proj', 'k_proj'),
        r'\1' + rest.replace('q_proj', 'v_proj'),
    )


@dataclasses.dataclass(frozen=True)
class _IfPresent:
    """`rule` where its pattern matches some key (and `absent` is no key); else nothing.

    For what checkpoints of one family may or may not hold: buffers, old names, a
    tied head stored beside its embedding.
    """

    rule: Rename | Drop | Copy
    absent: str | None = None

    def __repr__(self):
        unless = f' and {self.absent!r} is not' if self.absent else ''
        return f'{self.rule!r} (if present{unless})'

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        if self.absent not in tree and any(self.rule._re.fullmatch(k) for k in tree):
            return self.rule.apply(tree, target)
        return dict(tree)


@dataclasses.dataclass(frozen=True)
class _Through:
    """`rules` applied as if the target were `target`: a layout reached through another.

    The MaxText presets import into the canonical Flax layout first, whose
    target-driven `FromPyTorch` needs that layout's keys, then rename onward.
    """

    rules: tuple[Rule, ...]
    target: PyTree

    def __repr__(self):
        return f'{len(self.rules)} rules into the canonical Flax layout'

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        leaves, _ = read_target(self.target)
        out = dict(tree)
        for rule in self.rules:
            out = rule.apply(out, leaves)
        return out
