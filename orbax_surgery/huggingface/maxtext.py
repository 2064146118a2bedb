"""MaxText's parameter layout (as of MaxText 0.2.5) for Llama, Mistral and Gemma presets.

MaxText keeps parameters under `params/params/` (the `TrainState.params` its
converters save as the Orbax item `items`): `token_embedder/embedding`,
`decoder/decoder_norm/scale`, `decoder/logits_dense/kernel` (not with tied Gemma
embeddings), and per layer `decoder/layers_{i}/...`, or scanned one
`decoder/layers/...` with the layer axis second (`param_scan_axis=1`). Heads are
split out: query `(E, H, D)`, key and value `(E, K, D)`, out `(H, D, E)`. The
attention scale `1/sqrt(D)` is folded into the query kernel. Gemma's norms store
`1 + w` and its embedding `sqrt(E) * w`. Llama 3.1-style RoPE (`rope_type`
'llama3') is interleaved in MaxText: query and key kernels are permuted on the
head axis (`mt[2i] = hf[i]`, `mt[2i + 1] = hf[i + D/2]`). Every step is lazy:
renames, reshapes, transposes and elementwise scales per shard.

These rules go from (and back to) the canonical unrolled Flax layout of
`architectures`, so a preset composes them after its own import rules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from orbax_surgery.errors import RuleError
from orbax_surgery.huggingface.architectures import Family, Shapes, Sizes
from orbax_surgery.rules.layers import Stack, Unstack
from orbax_surgery.rules.moves import Drop, Rename
from orbax_surgery.rules.rule import Rule
from orbax_surgery.rules.values import MapValue, Reshape, Transpose

ROOT = 'params/params'
FAMILIES = ('llama', 'gemma')
"""The families with a MaxText layout here: model_types llama, mistral and gemma."""


def check_family(family: Family) -> None:
    if family.name not in FAMILIES:
        raise RuleError(
            f"No MaxText layout for the {family.name!r} family here; to='maxtext' knows "
            "llama, mistral and gemma. Use to='flax', or write the remaining rules."
        )


def _norms(family: Family) -> dict[str, str]:
    """Canonical norm names -> MaxText's, per family."""
    if family.name == 'gemma':
        return {
            'input_layernorm': 'pre_self_attention_norm',
            'post_attention_layernorm': 'pre_ffw_norm',
        }
    return {
        'input_layernorm': 'pre_self_attention_layer_norm',
        'post_attention_layernorm': 'post_self_attention_layer_norm',
    }


def _interleaved_rope(config: Mapping[str, Any]) -> bool:
    """Whether MaxText uses its interleaved RoPE for this config (Llama 3.1's `llama3` type)."""
    rope = config.get('rope_parameters') or config.get('rope_scaling') or {}
    return isinstance(rope, Mapping) and rope.get('rope_type', rope.get('type')) == 'llama3'


def shapes(family: Family, s: Sizes) -> Shapes:
    """MaxText's parameter shapes, unscanned (`{i}` the layer), under `params/params`."""
    e, h, k, d, f = s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate
    at = f'{ROOT}/decoder/layers_{{i}}/'
    out: Shapes = {f'{ROOT}/token_embedder/embedding': (s.vocab, e)}
    out[f'{ROOT}/decoder/decoder_norm/scale'] = (e,)
    if family.name != 'gemma':
        out[f'{ROOT}/decoder/logits_dense/kernel'] = (e, s.vocab)
    for name in _norms(family).values():
        out[at + f'{name}/scale'] = (e,)
    out[at + 'self_attention/query/kernel'] = (e, h, d)
    out[at + 'self_attention/key/kernel'] = (e, k, d)
    out[at + 'self_attention/value/kernel'] = (e, k, d)
    out[at + 'self_attention/out/kernel'] = (h, d, e)
    out[at + 'mlp/wi_0/kernel'] = (e, f)
    out[at + 'mlp/wi_1/kernel'] = (e, f)
    out[at + 'mlp/wo/kernel'] = (f, e)
    return out


def from_flax(family: Family, s: Sizes, config: Mapping[str, Any], stacked: bool) -> list[Rule]:
    """Canonical unrolled Flax layout -> MaxText's."""
    d = s.head_dim
    gemma = family.name == 'gemma'
    layer, at = r'layers_(\d+)/', rf'{ROOT}/decoder/layers_\1/'
    rules: list[Rule] = []
    if gemma:  # Tied: MaxText computes logits from the embedding.
        rules.append(Drop('lm_head/kernel'))
        rules.append(_scaled('embed_tokens/embedding', math.sqrt(s.hidden)))
        rules.append(_plus(r'(.*norm)/scale', 1.0))
    rules.append(Rename('embed_tokens/embedding', f'{ROOT}/token_embedder/embedding'))
    rules.append(Rename('norm/scale', f'{ROOT}/decoder/decoder_norm/scale'))
    if not gemma:
        rules.append(Rename('lm_head/kernel', f'{ROOT}/decoder/logits_dense/kernel'))
    for old, new in _norms(family).items():
        rules.append(Rename(layer + f'{old}/scale', at + f'{new}/scale'))
    attention = {'q_proj': 'query', 'k_proj': 'key', 'v_proj': 'value'}
    for old, new in attention.items():
        heads = s.heads if old == 'q_proj' else s.kv_heads
        rules.append(Reshape(layer + f'self_attn/{old}/kernel', (s.hidden, heads, d)))
        rules.append(Rename(layer + f'self_attn/{old}/kernel', at + f'self_attention/{new}/kernel'))
    rules.append(Reshape(layer + 'self_attn/o_proj/kernel', (s.heads, d, s.hidden)))
    rules.append(Rename(layer + 'self_attn/o_proj/kernel', at + 'self_attention/out/kernel'))
    query = rf'{ROOT}/decoder/layers_\d+/self_attention/query/kernel'
    rules.append(_scaled(query, 1 / math.sqrt(d)))
    if _interleaved_rope(config):
        rules += _rope_pairs(s, interleave=True)
    for old, new in {'gate_proj': 'wi_0', 'up_proj': 'wi_1', 'down_proj': 'wo'}.items():
        rules.append(Rename(layer + f'mlp/{old}/kernel', at + f'mlp/{new}/kernel'))
    if stacked:
        rules.append(
            Stack(rf'{ROOT}/decoder/layers_{{i}}/(.*)', rf'{ROOT}/decoder/layers/\1', axis=1)
        )
    return rules


def to_flax(family: Family, s: Sizes, config: Mapping[str, Any], stacked: bool) -> list[Rule]:
    """MaxText's layout -> the canonical unrolled Flax layout (the reverse of `from_flax`)."""
    d = s.head_dim
    gemma = family.name == 'gemma'
    layer, at = rf'{ROOT}/decoder/layers_(\d+)/', r'layers_\1/'
    rules: list[Rule] = []
    if stacked:
        rules.append(
            Unstack(rf'{ROOT}/decoder/layers/(.*)', rf'{ROOT}/decoder/layers_{{i}}/\1', axis=1)
        )
    if _interleaved_rope(config):
        rules += _rope_pairs(s, interleave=False)
    rules.append(_scaled(rf'{ROOT}/decoder/layers_\d+/self_attention/query/kernel', math.sqrt(d)))
    rules.append(Rename(f'{ROOT}/token_embedder/embedding', 'embed_tokens/embedding'))
    rules.append(Rename(f'{ROOT}/decoder/decoder_norm/scale', 'norm/scale'))
    if not gemma:
        rules.append(Rename(f'{ROOT}/decoder/logits_dense/kernel', 'lm_head/kernel'))
    for old, new in _norms(family).items():
        rules.append(Rename(layer + f'{new}/scale', at + f'{old}/scale'))
    for old, new in {
        'q_proj': 'query',
        'k_proj': 'key',
        'v_proj': 'value',
        'o_proj': 'out',
    }.items():
        rules.append(Rename(layer + f'self_attention/{new}/kernel', at + f'self_attn/{old}/kernel'))
    q, kv = s.heads * d, s.kv_heads * d
    for name, width in (('q_proj', q), ('k_proj', kv), ('v_proj', kv)):
        rules.append(Reshape(rf'layers_\d+/self_attn/{name}/kernel', (s.hidden, width)))
    rules.append(Reshape(r'layers_\d+/self_attn/o_proj/kernel', (q, s.hidden)))
    for old, new in {'gate_proj': 'wi_0', 'up_proj': 'wi_1', 'down_proj': 'wo'}.items():
        rules.append(Rename(layer + f'mlp/{new}/kernel', at + f'mlp/{old}/kernel'))
    if gemma:
        rules.append(_plus(r'(.*norm)/scale', -1.0))
        rules.append(_scaled('embed_tokens/embedding', 1 / math.sqrt(s.hidden)))
    return rules


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
        pattern = rf'{ROOT}/decoder/layers_\d+/self_attention/{name}/kernel'
        rules.append(Reshape(pattern, (s.hidden, heads, *split)))
        rules.append(Transpose(pattern, (0, 1, 3, 2)))
        rules.append(Reshape(pattern, (s.hidden, heads, d)))
    return rules
