"""MaxText's parameter layout (as of MaxText 0.2.5) for the presets with to='maxtext'.

MaxText keeps parameters under `params/params/` (the `TrainState.params` its
converters save as the Orbax item `items`): `token_embedder/embedding`,
`decoder/decoder_norm/scale`, `decoder/logits_dense/kernel` (absent where the
logits come from the embedding: Gemma, tied Qwen), and per layer
`decoder/layers_{i}/...`, or scanned one `decoder/layers/...` with the layer
axis second (`param_scan_axis=1`). Heads are split out: query `(E, H, D)`, key
and value `(E, K, D)`, out `(H, D, E)`, Qwen 2's q/k/v biases `(heads, D)`.
Llama, Mistral, Gemma and Mixtral fold the attention scale `1/sqrt(D)` into the
query kernel, Gemma 2 `query_pre_attn_scalar**-0.5`; Qwen's layers scale the
query themselves, so its kernels are Hugging Face's. Qwen 3 keeps its per-head
q/k norms as `self_attention/query_norm` and `key_norm`. Gemma's norms store
`1 + w` and its embedding `sqrt(E) * w`. Mixtral's experts are stacked,
`MoeBlock_0/wi_0` `(X, E, F)` (X experts; scanned `(X, L, E, F)`) beside the
router `MoeBlock_0/gate/kernel` `(E, X)`. Gemma 2's MaxText layer i is a pair of
Hugging Face layers (see `maxtext_gemma2`). Llama 3.1-style RoPE (`rope_type`
'llama3') is interleaved in MaxText: query and key kernels are permuted on the
head axis (`mt[2i] = hf[i]`, `mt[2i + 1] = hf[i + D/2]`). Every step is lazy:
renames, reshapes, transposes, stacks and elementwise maps per shard.

These rules go from (and back to) the canonical unrolled Flax layout of
`architectures`, so a preset composes them after its own import rules.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from orbax_surgery.errors import RuleError
from orbax_surgery.huggingface import maxtext_gemma2
from orbax_surgery.huggingface.architectures import Family, Shapes, Sizes
from orbax_surgery.rules.layers import Stack, Unstack
from orbax_surgery.rules.moves import Drop, Rename
from orbax_surgery.rules.rule import Rule
from orbax_surgery.rules.values import MapValue, Reshape, Transpose

ROOT = 'params/params'
DECODER = f'{ROOT}/decoder'
FAMILIES = ('llama', 'gemma', 'gemma2', 'qwen2', 'qwen3', 'mixtral')
"""The families with a MaxText layout here (model_type mistral is a llama)."""
_ATTENTION = {'q_proj': 'query', 'k_proj': 'key', 'v_proj': 'value', 'o_proj': 'out'}
_MLP = {'gate_proj': 'wi_0', 'up_proj': 'wi_1', 'down_proj': 'wo'}


def check_family(family: Family) -> None:
    if family.name not in FAMILIES:
        raise RuleError(
            f"No MaxText layout for the {family.name!r} family here; to='maxtext' knows "
            "llama, mistral, gemma, gemma2, qwen2, qwen3 and mixtral. Use to='flax', or write "
            'the remaining rules.'
        )


def layer_count(family: Family, s: Sizes) -> int:
    """MaxText's number of decoder layers: Gemma 2's are pairs of Hugging Face layers."""
    if family.name != 'gemma2':
        return s.layers
    if s.layers % 2:
        raise RuleError(
            f'Gemma 2 in MaxText pairs a local and a global layer, but the config has '
            f'{s.layers} layers, an odd number.'
        )
    return s.layers // 2


def keeps_head(family: Family, s: Sizes) -> bool:
    """Whether MaxText keeps `logits_dense` (else `logits_via_embedding`: Gemma, tied Qwen)."""
    if family.name in ('gemma', 'gemma2'):
        return False
    return not (family.name in ('qwen2', 'qwen3') and s.tied)


def shapes(family: Family, s: Sizes) -> Shapes:
    """MaxText's parameter shapes, unscanned (`{i}` the layer), under `params/params`."""
    out: Shapes = {f'{ROOT}/token_embedder/embedding': (s.vocab, s.hidden)}
    out[f'{DECODER}/decoder_norm/scale'] = (s.hidden,)
    if keeps_head(family, s):
        out[f'{DECODER}/logits_dense/kernel'] = (s.hidden, s.vocab)
    at = f'{DECODER}/layers_{{i}}/'
    for name, shape in _layer_shapes(family, s).items():
        if family.name == 'gemma2':
            for paired in maxtext_gemma2.paired_names(name):
                out[at + paired] = shape
        else:
            out[at + name] = shape
    return out


def from_flax(family: Family, s: Sizes, config: Mapping[str, Any], stacked: bool) -> list[Rule]:
    """Canonical unrolled Flax layout -> MaxText's."""
    rules: list[Rule] = []
    if not keeps_head(family, s):  # MaxText computes the logits from the embedding.
        rules.append(Drop('lm_head/kernel'))
    if family.name in ('gemma', 'gemma2'):
        rules.append(_scaled('embed_tokens/embedding', math.sqrt(s.hidden)))
        rules.append(_plus(r'(.*norm)/scale', 1.0))
    rules.append(Rename('embed_tokens/embedding', f'{ROOT}/token_embedder/embedding'))
    rules.append(Rename('norm/scale', f'{DECODER}/decoder_norm/scale'))
    if keeps_head(family, s):
        rules.append(Rename('lm_head/kernel', f'{DECODER}/logits_dense/kernel'))
    layer, at = r'layers_(\d+)/', rf'{DECODER}/layers_\1/'
    for old, new in _renamed(family, s).items():
        rules.append(Rename(layer + re.escape(old), at + new))
    for name, shape in _split_heads(family, s).items():
        rules.append(Reshape(rf'{DECODER}/layers_\d+/{name}', shape))
    factor = _query_scale(family, s, config)
    if factor != 1.0:
        rules.append(_scaled(rf'{DECODER}/layers_\d+/self_attention/query/kernel', factor))
    if _interleaved_rope(family, config):
        rules += _rope_pairs(s, interleave=True)
    if family.name == 'gemma2':
        rules += maxtext_gemma2.pair(DECODER, s.layers, stacked=stacked)
    elif stacked:
        rules.append(Stack(rf'{DECODER}/layers_{{i}}/(.*)', rf'{DECODER}/layers/\1', axis=1))
    return rules


def to_flax(family: Family, s: Sizes, config: Mapping[str, Any], stacked: bool) -> list[Rule]:
    """MaxText's layout -> the canonical unrolled Flax layout (the reverse of `from_flax`)."""
    rules: list[Rule] = []
    if family.name == 'gemma2':
        per_layer = _layer_shapes(family, s)
        rules += maxtext_gemma2.unpair(DECODER, per_layer, s.layers, stacked=stacked)
    elif stacked:
        rules.append(Unstack(rf'{DECODER}/layers/(.*)', rf'{DECODER}/layers_{{i}}/\1', axis=1))
    if _interleaved_rope(family, config):
        rules += _rope_pairs(s, interleave=False)
    factor = _query_scale(family, s, config)
    if factor != 1.0:
        rules.append(_scaled(rf'{DECODER}/layers_\d+/self_attention/query/kernel', 1 / factor))
    rules.append(Rename(f'{ROOT}/token_embedder/embedding', 'embed_tokens/embedding'))
    rules.append(Rename(f'{DECODER}/decoder_norm/scale', 'norm/scale'))
    if keeps_head(family, s):
        rules.append(Rename(f'{DECODER}/logits_dense/kernel', 'lm_head/kernel'))
    layer, at = rf'{DECODER}/layers_(\d+)/', r'layers_\1/'
    renamed = _renamed(family, s)
    for old, new in renamed.items():
        rules.append(Rename(layer + re.escape(new), at + old))
    canonical = family.shapes(s)
    back = {new: old for old, new in renamed.items()}
    for name in _split_heads(family, s):
        old = back[name]
        rules.append(Reshape(rf'layers_\d+/{old}', canonical[f'layers_{{i}}/{old}']))
    if family.name in ('gemma', 'gemma2'):
        rules.append(_plus(r'(.*norm)/scale', -1.0))
        rules.append(_scaled('embed_tokens/embedding', 1 / math.sqrt(s.hidden)))
    return rules


def _norms(family: Family) -> dict[str, str]:
    """Canonical norm names -> MaxText's, per family."""
    if family.name == 'gemma':
        return {
            'input_layernorm': 'pre_self_attention_norm',
            'post_attention_layernorm': 'pre_ffw_norm',
        }
    if family.name == 'gemma2':  # Per Hugging Face layer; `maxtext_gemma2` adds _local/_global.
        return {
            'input_layernorm': 'pre_self_attention_norm',
            'post_attention_layernorm': 'post_self_attention_norm',
            'pre_feedforward_layernorm': 'pre_ffw_norm',
            'post_feedforward_layernorm': 'post_ffw_norm',
        }
    return {
        'input_layernorm': 'pre_self_attention_layer_norm',
        'post_attention_layernorm': 'post_self_attention_layer_norm',
    }


def _renamed(family: Family, s: Sizes) -> dict[str, str]:
    """A layer's canonical Flax names -> MaxText's, one per parameter."""
    names = {f'{old}/scale': f'{new}/scale' for old, new in _norms(family).items()}
    for old, new in _ATTENTION.items():
        names[f'self_attn/{old}/kernel'] = f'self_attention/{new}/kernel'
        if family.name == 'qwen2' and old != 'o_proj':
            names[f'self_attn/{old}/bias'] = f'self_attention/{new}/bias'
    if family.name == 'qwen3':
        names['self_attn/q_norm/scale'] = 'self_attention/query_norm/scale'
        names['self_attn/k_norm/scale'] = 'self_attention/key_norm/scale'
    if s.experts:  # Already stacked (X, in, out) in the canonical layout.
        names['mlp/gate/kernel'] = 'MoeBlock_0/gate/kernel'
        for old, new in _MLP.items():
            names[f'mlp/experts/{old}/kernel'] = f'MoeBlock_0/{new}'
    else:
        for old, new in _MLP.items():
            names[f'mlp/{old}/kernel'] = f'mlp/{new}/kernel'
    return names


def _split_heads(family: Family, s: Sizes) -> Shapes:
    """MaxText's shapes of the parameters it splits by head (the rest keep theirs)."""
    e, h, k, d = s.hidden, s.heads, s.kv_heads, s.head_dim
    split: Shapes = {
        'self_attention/query/kernel': (e, h, d),
        'self_attention/key/kernel': (e, k, d),
        'self_attention/value/kernel': (e, k, d),
        'self_attention/out/kernel': (h, d, e),
    }
    if family.name == 'qwen2':
        split |= {f'self_attention/{n}/bias': (k, d) for n in ('key', 'value')}
        split['self_attention/query/bias'] = (h, d)
    return split


def _layer_shapes(family: Family, s: Sizes) -> Shapes:
    """A layer's MaxText shapes, by MaxText name (per Hugging Face layer for Gemma 2)."""
    canonical, split = family.shapes(s), _split_heads(family, s)
    return {
        new: split.get(new, canonical[f'layers_{{i}}/{old}'])
        for old, new in _renamed(family, s).items()
    }


def _query_scale(family: Family, s: Sizes, config: Mapping[str, Any]) -> float:
    """The attention scale MaxText expects folded into the query kernel (1: none)."""
    if family.name in ('qwen2', 'qwen3'):  # Their MaxText layers scale by D**-0.5 themselves.
        return 1.0
    if family.name == 'gemma2':  # Not head_dim: they differ for Gemma 2 27B (144 vs 128).
        return float(config.get('query_pre_attn_scalar') or s.head_dim) ** -0.5
    return 1 / math.sqrt(s.head_dim)


def _interleaved_rope(family: Family, config: Mapping[str, Any]) -> bool:
    """Whether MaxText uses its interleaved RoPE for this config (Llama 3.1's `llama3` type)."""
    rope = config.get('rope_parameters') or config.get('rope_scaling') or {}
    llama3 = isinstance(rope, Mapping) and rope.get('rope_type', rope.get('type')) == 'llama3'
    return family.name == 'llama' and llama3


def _scaled(pattern: str, factor: float) -> MapValue:
    """Multiplies by `factor` in float32 (as MaxText's converters do), keeping the dtype."""
    factor32 = np.float32(factor)

    def scale(x):
        return (x.astype(np.float32) * factor32).astype(x.dtype)

    scale.__name__ = f'times_{factor:.6g}'
    return MapValue(pattern, scale, elementwise=True)


def _plus(pattern: str, amount: float) -> MapValue:
    """Adds `amount` in float32 (Gemma's norms: MaxText stores `1 + w`), keeping the dtype."""

    def add(x):
        return (x.astype(np.float32) + np.float32(amount)).astype(x.dtype)

    add.__name__ = f'plus_{amount:g}'
    return MapValue(pattern, add, elementwise=True)


def _rope_pairs(s: Sizes, *, interleave: bool) -> list[Rule]:
    """Permutes the head_dim axis of the query and key kernels `(E, heads, D)`, lazily.

    Interleaving views D as (2, D/2), swaps the two and flattens back:
    `mt[2i + k] = hf[k * D/2 + i]`; de-interleaving views D as (D/2, 2).
    """
    d = s.head_dim
    split = (2, d // 2) if interleave else (d // 2, 2)
    rules: list[Rule] = []
    for name, heads in (('query', s.heads), ('key', s.kv_heads)):
        pattern = rf'{DECODER}/layers_\d+/self_attention/{name}/kernel'
        rules.append(Reshape(pattern, (s.hidden, heads, *split)))
        rules.append(Transpose(pattern, (0, 1, 3, 2)))
        rules.append(Reshape(pattern, (s.hidden, heads, d)))
    return rules
