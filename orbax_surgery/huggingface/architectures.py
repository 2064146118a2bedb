"""Model families as `config.json` describes them: names, sizes and parameter shapes.

A Hugging Face `config.json` says which family a checkpoint is (`model_type`)
and its sizes; from those alone the Flax parameter tree of the family's
canonical layout is known, with every shape, before any weight is read. The
canonical layout keeps the PyTorch module names without the base-model prefix
(`model.`, `transformer.`, `gpt_neox.`), Flax leaf names (`kernel` `(in, out)`,
`scale`, `embedding`), one `layers_{i}` per layer (or one stacked `layers`),
fused projections split (`q_proj`, `k_proj`, `v_proj`; `gate_proj`, `up_proj`)
and mixture-of-experts weights stacked along a leading expert axis.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from etils import epath

from orbax_surgery import locations
from orbax_surgery.errors import RuleError, SurgeryError
from orbax_surgery.keys import did_you_mean

Shapes = dict[str, tuple[int, ...]]
"""Parameter shapes by key; `{i}` in a key stands for the layer number."""


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The sizes a config gives, under one set of names for every family."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    experts: int = 0
    positions: int = 0


@dataclasses.dataclass(frozen=True)
class Family:
    """What differs between model families, for presets and for shapes."""

    name: str
    model_types: tuple[str, ...]
    prefix: str  # The base model's key prefix in PyTorch checkpoints.
    layers: str  # The module list holding the blocks.
    shapes: Callable[[Sizes], Shapes]
    sizes: Callable[[Mapping[str, Any]], Sizes]
    embedding: str = 'embed_tokens'
    head: str | None = 'lm_head'  # Its own param in the Flax layout, even when tied; or None.


def read_config(config: Any) -> dict[str, Any]:
    """A config as a dict: a dict, a `transformers` config, or a `config.json` (or its dir).

    Raises:
        SurgeryError: the file is missing or not a JSON object.
    """
    if isinstance(config, Mapping):
        return dict(config)
    if callable(getattr(config, 'to_dict', None)):
        return config.to_dict()
    location = locations.absolute(str(config))
    path = epath.Path(location)
    if not location.endswith('.json'):
        path = path / 'config.json'
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError) as e:
        raise SurgeryError(
            f'No config.json at {locations.shown(str(path))}; pass the directory of a Hugging '
            'Face model (config.json beside its weights), the file, or a dict.'
        ) from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SurgeryError(f'{locations.shown(str(path))} is not valid JSON: {e}.') from e
    if not isinstance(data, dict):
        raise SurgeryError(f'{locations.shown(str(path))} holds {type(data).__name__}, not a dict.')
    return data


def family_of(config: Mapping[str, Any]) -> Family:
    """The family of `config['model_type']`, or a RuleError listing the known ones."""
    model_type = config.get('model_type')
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = sorted(t for f in FAMILIES for t in f.model_types)
    raise RuleError(
        f'No preset for model_type {model_type!r}; presets know {", ".join(known)}.'
        f'{did_you_mean(str(model_type), known)} For another architecture, write the rules: '
        "from_pytorch(drop_prefix='model') handles names and layouts, Split fused weights, and "
        '`orbax-surgery plan` shows what is left.'
    )


def dtype_of(config: Mapping[str, Any]) -> np.dtype:
    """The weights' dtype the config records (`dtype`, or `torch_dtype` before v5)."""
    import jax.numpy as jnp

    name = config.get('dtype') or config.get('torch_dtype') or 'float32'
    return np.dtype(jnp.dtype(str(name).removeprefix('torch.')))


def _get(config: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if config.get(name) is not None:
            return config[name]
    if default is None:
        raise SurgeryError(
            f'The config has none of {", ".join(map(repr, names))}, which the '
            f'{config.get("model_type")!r} preset needs.'
        )
    return default


def _decoder_sizes(config: Mapping[str, Any]) -> Sizes:
    hidden = _get(config, 'hidden_size')
    heads = _get(config, 'num_attention_heads')
    return Sizes(
        vocab=_get(config, 'vocab_size'),
        hidden=hidden,
        intermediate=_get(config, 'intermediate_size'),
        layers=_get(config, 'num_hidden_layers'),
        heads=heads,
        kv_heads=_get(config, 'num_key_value_heads', default=heads),
        head_dim=_get(config, 'head_dim', default=hidden // heads),
        tied=bool(config.get('tie_word_embeddings', False)),
        experts=config.get('num_local_experts') or 0,
    )


def _gpt2_sizes(config: Mapping[str, Any]) -> Sizes:
    hidden = _get(config, 'n_embd')
    return Sizes(
        vocab=_get(config, 'vocab_size'),
        hidden=hidden,
        intermediate=config.get('n_inner') or 4 * hidden,
        layers=_get(config, 'n_layer'),
        heads=_get(config, 'n_head'),
        kv_heads=_get(config, 'n_head'),
        head_dim=hidden // _get(config, 'n_head'),
        tied=bool(config.get('tie_word_embeddings', True)),
        positions=_get(config, 'n_positions'),
    )


def _gpt_neox_sizes(config: Mapping[str, Any]) -> Sizes:
    return dataclasses.replace(_decoder_sizes(config), kv_heads=_get(config, 'num_attention_heads'))


def _decoder_shapes(
    *,
    qkv_bias: bool = False,
    qk_norm: bool = False,
    sandwich: bool = False,
) -> Callable[[Sizes], Shapes]:
    """The Llama-like decoders: Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, Mixtral."""

    def shapes(s: Sizes) -> Shapes:
        d, q, kv = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
        out: Shapes = {'embed_tokens/embedding': (s.vocab, d)}
        at = 'layers_{i}/'
        out[at + 'input_layernorm/scale'] = (d,)
        for name, width in (('q_proj', q), ('k_proj', kv), ('v_proj', kv)):
            out[at + f'self_attn/{name}/kernel'] = (d, width)
            if qkv_bias:
                out[at + f'self_attn/{name}/bias'] = (width,)
        out[at + 'self_attn/o_proj/kernel'] = (q, d)
        if qk_norm:
            out[at + 'self_attn/q_norm/scale'] = (s.head_dim,)
            out[at + 'self_attn/k_norm/scale'] = (s.head_dim,)
        out[at + 'post_attention_layernorm/scale'] = (d,)
        if sandwich:
            out[at + 'pre_feedforward_layernorm/scale'] = (d,)
            out[at + 'post_feedforward_layernorm/scale'] = (d,)
        if s.experts:
            e, i = s.experts, s.intermediate
            out[at + 'mlp/gate/kernel'] = (d, e)
            out[at + 'mlp/experts/gate_proj/kernel'] = (e, d, i)
            out[at + 'mlp/experts/up_proj/kernel'] = (e, d, i)
            out[at + 'mlp/experts/down_proj/kernel'] = (e, i, d)
        else:
            out[at + 'mlp/gate_proj/kernel'] = (d, s.intermediate)
            out[at + 'mlp/up_proj/kernel'] = (d, s.intermediate)
            out[at + 'mlp/down_proj/kernel'] = (s.intermediate, d)
        out['norm/scale'] = (d,)
        out['lm_head/kernel'] = (d, s.vocab)
        return out

    return shapes


def _gpt2_shapes(s: Sizes) -> Shapes:
    d = s.hidden
    out: Shapes = {'wte/embedding': (s.vocab, d), 'wpe/embedding': (s.positions, d)}
    for name in ('ln_1', 'ln_2'):
        out[f'h_{{i}}/{name}/scale'] = out[f'h_{{i}}/{name}/bias'] = (d,)
    for name in ('q_proj', 'k_proj', 'v_proj', 'c_proj'):
        out[f'h_{{i}}/attn/{name}/kernel'] = (d, d)
        out[f'h_{{i}}/attn/{name}/bias'] = (d,)
    out['h_{i}/mlp/c_fc/kernel'], out['h_{i}/mlp/c_fc/bias'] = (
        (d, s.intermediate),
        (s.intermediate,),
    )
    out['h_{i}/mlp/c_proj/kernel'], out['h_{i}/mlp/c_proj/bias'] = (s.intermediate, d), (d,)
    out['ln_f/scale'] = out['ln_f/bias'] = (d,)
    return out


def _gpt_neox_shapes(s: Sizes) -> Shapes:
    d = s.hidden
    out: Shapes = {'embed_in/embedding': (s.vocab, d)}
    at = 'layers_{i}/'
    for name in ('input_layernorm', 'post_attention_layernorm'):
        out[at + f'{name}/scale'] = out[at + f'{name}/bias'] = (d,)
    for name in ('q_proj', 'k_proj', 'v_proj', 'dense'):
        out[at + f'attention/{name}/kernel'] = (d, d)
        out[at + f'attention/{name}/bias'] = (d,)
    out[at + 'mlp/dense_h_to_4h/kernel'] = (d, s.intermediate)
    out[at + 'mlp/dense_h_to_4h/bias'] = (s.intermediate,)
    out[at + 'mlp/dense_4h_to_h/kernel'] = (s.intermediate, d)
    out[at + 'mlp/dense_4h_to_h/bias'] = (d,)
    out['final_layer_norm/scale'] = out['final_layer_norm/bias'] = (d,)
    out['embed_out/kernel'] = (d, s.vocab)
    return out


FAMILIES = (
    Family('llama', ('llama', 'mistral'), 'model', 'layers', _decoder_shapes(), _decoder_sizes),
    Family('qwen2', ('qwen2',), 'model', 'layers', _decoder_shapes(qkv_bias=True), _decoder_sizes),
    Family('qwen3', ('qwen3',), 'model', 'layers', _decoder_shapes(qk_norm=True), _decoder_sizes),
    Family('gemma', ('gemma',), 'model', 'layers', _decoder_shapes(), _decoder_sizes),
    Family(
        'gemma2', ('gemma2',), 'model', 'layers', _decoder_shapes(sandwich=True), _decoder_sizes
    ),
    Family(
        'gemma3',
        ('gemma3_text',),
        'model',
        'layers',
        _decoder_shapes(qk_norm=True, sandwich=True),
        _decoder_sizes,
    ),
    Family('phi3', ('phi3',), 'model', 'layers', _decoder_shapes(), _decoder_sizes),
    Family('mixtral', ('mixtral',), 'model', 'layers', _decoder_shapes(), _decoder_sizes),
    Family('gpt2', ('gpt2',), 'transformer', 'h', _gpt2_shapes, _gpt2_sizes, 'wte', None),
    Family(
        'gpt_neox',
        ('gpt_neox',),
        'gpt_neox',
        'layers',
        _gpt_neox_shapes,
        _gpt_neox_sizes,
        'embed_in',
        'embed_out',
    ),
)
