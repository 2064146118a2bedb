"""Small Flax linen models that compute what Hugging Face's PyTorch models compute.

Parameter names follow the PyTorch modules (`self_attn/q_proj`, `attn/c_attn`),
so `from_pytorch` fills them; `scan=True` stacks the blocks with `nn.scan`
(`layers/...` or `h/...` with a leading layer axis), else they are
`layers_0 ...` / `h_0 ...`. Everything runs in float32, without dropout,
caches or padding masks: the forward pass of `model.eval()` on full sequences.

`flax_model(hf_config, scan)` builds one from a `transformers` config for the
Llama family (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3,
mixtral), gpt2 and gpt_neox, in the canonical layout that an import preset
produces (fused PyTorch weights split: Phi-3's `qkv_proj`/`gate_up_proj`,
GPT-2's `c_attn`, GPT-NeoX's `query_key_value`; Mixtral's experts stacked);
`canonical_params(hf_model)` is that layout computed with NumPy from a PyTorch
model's state dict, and `tiny_config(model_type)` a tiny config for each.
"""

import dataclasses
import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    scan: bool = False

    @classmethod
    def of(cls, hf, scan: bool = False) -> 'LlamaConfig':
        """The Flax model's config for a `transformers.LlamaConfig`."""
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_hidden_layers=hf.num_hidden_layers,
            num_attention_heads=hf.num_attention_heads,
            num_key_value_heads=hf.num_key_value_heads,
            head_dim=hf.hidden_size // hf.num_attention_heads,
            rope_theta=hf.rope_parameters['rope_theta'],
            rms_norm_eps=hf.rms_norm_eps,
            scan=scan,
        )


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    layer_norm_epsilon: float
    scan: bool = False
    split_qkv: bool = False  # `attn/{q,k,v}_proj` instead of the fused `attn/c_attn`
    activation_function: str = 'gelu_new'

    @classmethod
    def of(cls, hf, scan: bool = False, split_qkv: bool = False) -> 'GPT2Config':
        """The Flax model's config for a `transformers.GPT2Config`."""
        if hf.scale_attn_by_inverse_layer_idx or not hf.scale_attn_weights:
            raise NotImplementedError('GPT-2 attention scaled other than by 1/sqrt(head_dim)')
        return cls(
            vocab_size=hf.vocab_size,
            n_positions=hf.n_positions,
            n_embd=hf.n_embd,
            n_layer=hf.n_layer,
            n_head=hf.n_head,
            layer_norm_epsilon=hf.layer_norm_epsilon,
            scan=scan,
            split_qkv=split_qkv,
            activation_function=hf.activation_function,
        )


NO_WINDOW = np.iinfo(np.int32).max


def causal_attention(q, k, v, *, scale=None, softcap=None, window=None):
    """softmax(q k^T * scale + causal mask) v, heads on axis 2: (batch, seq, heads, dim).

    `scale` defaults to 1/sqrt(dim); `softcap` caps the scores with `softcap *
    tanh(scores / softcap)` before the mask (Gemma 2); with `window` (an int,
    maybe traced) query i sees keys j with i - window < j <= i (Hugging Face's
    sliding window).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    seq = q.shape[1]
    query, key = jnp.arange(seq)[:, None], jnp.arange(seq)[None, :]
    mask = key <= query
    if window is not None:
        mask &= query - key < window
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum('bhqk,bkhd->bqhd', weights, v)


class RMSNorm(nn.Module):
    """LlamaRMSNorm: x / sqrt(mean(x^2) + eps) * weight; Gemma's (`offset`) * (1 + weight)."""

    eps: float
    offset: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param('scale', init, (x.shape[-1],))
        variance = jnp.mean(x * x, axis=-1, keepdims=True)
        normed = x * jax.lax.rsqrt(variance + self.eps)
        return normed * (1.0 + scale) if self.offset else scale * normed


def rotary(x, theta=None, *, inv_freq=None):
    """Hugging Face's rotate-half RoPE at positions 0..seq-1: x is (batch, seq, heads, dim).

    With `inv_freq` (maybe traced, e.g. one row per scanned layer) only the
    first `2 * len(inv_freq)` dims rotate and the rest pass (partial rotary);
    else all dims with frequencies `theta ** (-2i / dim)`.
    """
    if inv_freq is None:
        dim = x.shape[-1]
        inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    rot = 2 * inv_freq.shape[-1]
    x, rest = x[..., :rot], x[..., rot:]
    freqs = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)[None, :, None, :]
    half = rot // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return jnp.concatenate([x * jnp.cos(emb) + rotated * jnp.sin(emb), rest], axis=-1)


class LlamaAttention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        batch, seq, _ = x.shape

        def proj(name, heads):
            y = nn.Dense(heads * c.head_dim, use_bias=False, name=name)(x)
            return y.reshape(batch, seq, heads, c.head_dim)

        q = rotary(proj('q_proj', c.num_attention_heads), c.rope_theta)
        k = rotary(proj('k_proj', c.num_key_value_heads), c.rope_theta)
        v = proj('v_proj', c.num_key_value_heads)
        groups = c.num_attention_heads // c.num_key_value_heads
        # repeat_kv: query head h reads key/value head h // groups.
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        out = causal_attention(q, k, v).reshape(batch, seq, -1)
        return nn.Dense(c.hidden_size, use_bias=False, name='o_proj')(out)


class LlamaMLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate = nn.Dense(c.intermediate_size, use_bias=False, name='gate_proj')(x)
        up = nn.Dense(c.intermediate_size, use_bias=False, name='up_proj')(x)
        return nn.Dense(c.hidden_size, use_bias=False, name='down_proj')(nn.silu(gate) * up)


class LlamaBlock(nn.Module):
    """One decoder layer; `(x, None) -> (x, None)` so that `nn.scan` can carry it."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, _=None):
        c = self.config
        x = x + LlamaAttention(c, name='self_attn')(
            RMSNorm(c.rms_norm_eps, name='input_layernorm')(x)
        )
        h = RMSNorm(c.rms_norm_eps, name='post_attention_layernorm')(x)
        return x + LlamaMLP(c, name='mlp')(h), None


class Llama(nn.Module):
    """LlamaForCausalLM without its base-model prefix.

    Its own `lm_head` even when Hugging Face ties it: a tied checkpoint then
    fills it from `embed_tokens` (a `Copy` rule).
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, ids):
        c = self.config
        x = nn.Embed(c.vocab_size, c.hidden_size, name='embed_tokens')(ids)
        x = blocks(LlamaBlock, c, c.num_hidden_layers, 'layers', x)
        x = RMSNorm(c.rms_norm_eps, name='norm')(x)
        return nn.Dense(c.vocab_size, use_bias=False, name='lm_head')(x)


def blocks(block, config, n, name, x, xs=None):
    """`n` blocks unrolled (`name_0 ...`) or, with `config.scan`, one stacked `name`.

    `xs`, if given, is a pytree of per-layer inputs with a leading axis `n`
    (scanned over, or indexed for the unrolled blocks): `block(x, xs[i])`.
    """
    if config.scan:
        scanned = nn.scan(
            block,
            variable_axes={'params': 0},
            split_rngs={'params': True},
            length=n,
        )
        x, _ = scanned(config, name=name)(x, xs)
        return x
    for i in range(n):
        if xs is None:
            x, _ = block(config, name=f'{name}_{i}')(x)
        else:
            layer = jax.tree.map(lambda a, i=i: a[i], xs)
            x, _ = block(config, name=f'{name}_{i}')(x, layer)
    return x


class GPT2Attention(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x):
        c = self.config
        batch, seq, width = x.shape
        if c.split_qkv:
            qkv = [nn.Dense(width, name=f'{n}_proj')(x) for n in 'qkv']
        else:
            qkv = jnp.split(nn.Dense(3 * width, name='c_attn')(x), 3, axis=-1)
        q, k, v = (t.reshape(batch, seq, c.n_head, -1) for t in qkv)
        out = causal_attention(q, k, v).reshape(batch, seq, width)
        return nn.Dense(width, name='c_proj')(out)


def activation(name):
    """Hugging Face's `ACT2FN[name]` for the activations these models use."""
    fns = {
        'silu': nn.silu,
        'swish': nn.silu,
        'relu': nn.relu,
        'gelu': functools.partial(nn.gelu, approximate=False),
        'gelu_new': functools.partial(nn.gelu, approximate=True),
        'gelu_pytorch_tanh': functools.partial(nn.gelu, approximate=True),
    }
    if name not in fns:
        raise NotImplementedError(f'activation {name!r}')
    return fns[name]


class GPT2MLP(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        h = activation(self.config.activation_function)(nn.Dense(4 * width, name='c_fc')(x))
        return nn.Dense(width, name='c_proj')(h)


def layer_norm(config, name):
    # PyTorch's LayerNorm: var = mean((x - mean)^2), not E[x^2] - E[x]^2.
    return nn.LayerNorm(epsilon=config.layer_norm_epsilon, use_fast_variance=False, name=name)


class GPT2Block(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x, _=None):
        c = self.config
        x = x + GPT2Attention(c, name='attn')(layer_norm(c, 'ln_1')(x))
        return x + GPT2MLP(c, name='mlp')(layer_norm(c, 'ln_2')(x)), None


class GPT2(nn.Module):
    """GPT2LMHeadModel without its `transformer` prefix; the head is tied to `wte`."""

    config: GPT2Config

    @nn.compact
    def __call__(self, ids):
        c = self.config
        wte = nn.Embed(c.vocab_size, c.n_embd, name='wte')
        wpe = nn.Embed(c.n_positions, c.n_embd, name='wpe')
        x = wte(ids) + wpe(jnp.arange(ids.shape[1]))[None]
        x = blocks(GPT2Block, c, c.n_layer, 'h', x)
        return wte.attend(layer_norm(c, 'ln_f')(x))


# RoPE from a transformers config ----------------------------------------------


def rope_parameters(hf, layer_type=None) -> dict:
    """The RoPE parameters of a config (of one layer type where they differ per type).

    transformers v5 keeps them in `config.rope_parameters` (per layer type for
    Gemma 3: `{'sliding_attention': {...}, 'full_attention': {...}}`); older
    configs have a top-level `rope_theta` (and `rope_local_base_freq` for
    Gemma 3's sliding layers) and `rope_scaling`.
    """
    params = getattr(hf, 'rope_parameters', None) or getattr(hf, 'rope_scaling', None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    params = dict(params)
    if params.get('rope_theta') is None:
        theta = getattr(hf, 'rope_theta', None)
        if layer_type == 'sliding_attention' and getattr(hf, 'rope_local_base_freq', None):
            theta = hf.rope_local_base_freq
        params['rope_theta'] = 10_000.0 if theta is None else theta
    return params


def inv_freq(hf, head_dim: int, layer_type=None) -> np.ndarray:
    """RoPE's inverse frequencies (float32, as transformers computes them) for one layer type.

    Supports the `default`, `linear` and `llama3` rope types and a partial
    rotary factor (`rope_parameters['partial_rotary_factor']`, or the config's
    `partial_rotary_factor` / `rotary_pct`).
    """
    p = rope_parameters(hf, layer_type)
    partial = p.get('partial_rotary_factor')
    if partial is None:
        partial = getattr(hf, 'partial_rotary_factor', None) or getattr(hf, 'rotary_pct', 1.0)
    dim = int(head_dim * partial)
    base = p['rope_theta']
    freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    kind = p.get('rope_type', p.get('type', 'default'))
    if kind == 'linear':
        freq = freq / np.float32(p['factor'])
    elif kind == 'llama3':
        factor, low, high = p['factor'], p['low_freq_factor'], p['high_freq_factor']
        old = p['original_max_position_embeddings']
        wavelen = 2 * math.pi / freq
        scaled = np.where(wavelen > old / low, freq / factor, freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        freq = np.where(medium, smoothed, scaled)
    elif kind != 'default':
        raise NotImplementedError(f'rope_type {kind!r}')
    return np.asarray(freq, np.float32)


def head_dim_of(hf) -> int:
    """`config.head_dim` if set, else hidden_size // num_attention_heads."""
    return getattr(hf, 'head_dim', None) or hf.hidden_size // hf.num_attention_heads


# The Llama family --------------------------------------------------------------

LLAMA_FAMILY = (
    'llama',
    'mistral',
    'qwen2',
    'qwen3',
    'gemma',
    'gemma2',
    'gemma3_text',
    'phi3',
    'mixtral',
)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """A Llama-family decoder (`Decoder`) as read from a transformers config by `of`.

    Per layer: `inv_freqs[i]` (RoPE frequencies, so Gemma 3's local and global
    layers may differ) and `windows[i]` (sliding window, None for global
    attention); both are scanned over with `scan=True`.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    inv_freqs: tuple[tuple[float, ...], ...]
    windows: tuple[int | None, ...]
    activation: str = 'silu'
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_offset: bool = False  # Gemma: x * (1 + weight)
    embed_scale: float | None = None  # Gemma: sqrt(hidden_size)
    sandwich_norms: bool = False  # Gemma 2/3: pre/post norms around attention and MLP
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    num_experts: int = 0  # Mixtral: a sparse MoE instead of the dense MLP
    num_experts_per_tok: int = 0
    scan: bool = False

    @classmethod
    def of(cls, hf, scan: bool = False) -> 'DecoderConfig':
        kind = hf.model_type
        if kind not in LLAMA_FAMILY:
            raise NotImplementedError(f'model_type {kind!r}')
        if getattr(hf, 'use_bidirectional_attention', False):
            raise NotImplementedError('bidirectional attention')
        n = hf.num_hidden_layers
        head_dim = head_dim_of(hf)
        if kind in ('qwen2', 'qwen3', 'gemma2', 'gemma3_text'):
            # Per-layer attention types; their sliding layers use the window.
            types = list(getattr(hf, 'layer_types', None) or ['full_attention'] * n)
            windows = [hf.sliding_window if t == 'sliding_attention' else None for t in types]
        elif kind in ('mistral', 'mixtral', 'phi3'):
            # One window (or none) for every layer; `layer_types` are ignored by these models.
            types = ['full_attention'] * n
            windows = [getattr(hf, 'sliding_window', None)] * n
        else:
            types, windows = ['full_attention'] * n, [None] * n
        per_type = kind == 'gemma3_text'  # RoPE parameters per layer type
        freqs = {t: inv_freq(hf, head_dim, t if per_type else None) for t in set(types)}
        gemma = kind.startswith('gemma')
        gemma23 = kind in ('gemma2', 'gemma3_text')
        act = hf.hidden_act if kind == 'gemma' else getattr(hf, 'hidden_activation', None)
        attention_bias = bool(getattr(hf, 'attention_bias', False))
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_hidden_layers=n,
            num_attention_heads=hf.num_attention_heads,
            num_key_value_heads=getattr(hf, 'num_key_value_heads', None) or hf.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            inv_freqs=tuple(tuple(float(f) for f in freqs[t]) for t in types),
            windows=tuple(windows),
            activation=act or hf.hidden_act,
            qkv_bias=kind == 'qwen2' or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(getattr(hf, 'mlp_bias', False)),
            qk_norm=kind in ('qwen3', 'gemma3_text'),
            norm_offset=gemma,
            embed_scale=hf.hidden_size**0.5 if gemma else None,
            sandwich_norms=gemma23,
            attn_scale=hf.query_pre_attn_scalar**-0.5 if gemma23 else None,
            # Gemma 3 keeps `attn_logit_softcapping` in its config but never applies it.
            attn_softcap=hf.attn_logit_softcapping if kind == 'gemma2' else None,
            final_softcap=getattr(hf, 'final_logit_softcapping', None),
            num_experts=hf.num_local_experts if kind == 'mixtral' else 0,
            num_experts_per_tok=hf.num_experts_per_tok if kind == 'mixtral' else 0,
            scan=scan,
        )

    def layer_inputs(self):
        """Per-layer inputs of the blocks, leading axis the layer: RoPE frequencies, windows."""
        windows = [NO_WINDOW if w is None else w for w in self.windows]
        return {
            'inv_freq': np.asarray(self.inv_freqs, np.float32),
            'window': np.asarray(windows, np.int32),
        }


class DecoderAttention(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x, inv_freq, window):
        c = self.config
        batch, seq, _ = x.shape

        def proj(name, heads):
            y = nn.Dense(heads * c.head_dim, use_bias=c.qkv_bias, name=name)(x)
            y = y.reshape(batch, seq, heads, c.head_dim)
            if c.qk_norm and name != 'v_proj':  # per head, before RoPE
                y = RMSNorm(c.rms_norm_eps, c.norm_offset, name=f'{name[0]}_norm')(y)
            return y

        q = rotary(proj('q_proj', c.num_attention_heads), inv_freq=inv_freq)
        k = rotary(proj('k_proj', c.num_key_value_heads), inv_freq=inv_freq)
        v = proj('v_proj', c.num_key_value_heads)
        groups = c.num_attention_heads // c.num_key_value_heads
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        out = causal_attention(
            q, k, v, scale=c.attn_scale, softcap=c.attn_softcap, window=window
        ).reshape(batch, seq, -1)
        return nn.Dense(c.hidden_size, use_bias=c.o_bias, name='o_proj')(out)


class DecoderMLP(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x):
        c = self.config

        def dense(name, width):
            return nn.Dense(width, use_bias=c.mlp_bias, name=name)

        h = activation(c.activation)(dense('gate_proj', c.intermediate_size)(x))
        h = h * dense('up_proj', c.intermediate_size)(x)
        return dense('down_proj', c.hidden_size)(h)


class Experts(nn.Module):
    """Every expert's `down(act(gate(x)) * up(x))`: (batch, seq, d) -> (batch, seq, E, d)."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        e, d, i = c.num_experts, c.hidden_size, c.intermediate_size

        def kernel(name, shape, spec):
            return nn.Einsum(shape, spec, use_bias=False, name=name)

        gate = kernel('gate_proj', (e, d, i), 'bsd,edi->bsei')(x)
        up = kernel('up_proj', (e, d, i), 'bsd,edi->bsei')(x)
        return kernel('down_proj', (e, i, d), 'bsei,eid->bsed')(activation(c.activation)(gate) * up)


class SparseMoE(nn.Module):
    """MixtralSparseMoeBlock, dense: every expert runs, weighted by a (tokens, E) matrix.

    Router softmax over the experts, the top `num_experts_per_tok` weights
    renormalized to sum 1, zero for the experts not chosen.
    """

    config: DecoderConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        logits = nn.Dense(c.num_experts, use_bias=False, name='gate')(x)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        top, index = jax.lax.top_k(probs, c.num_experts_per_tok)
        top = top / jnp.sum(top, axis=-1, keepdims=True)
        weights = jnp.sum(jax.nn.one_hot(index, c.num_experts) * top[..., None], axis=-2)
        return jnp.einsum('bsed,bse->bsd', Experts(c, name='experts')(x), weights)


class DecoderBlock(nn.Module):
    """One decoder layer; `(x, layer inputs) -> (x, None)` so that `nn.scan` can carry it."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x, layer):
        c = self.config

        def norm(name):
            return RMSNorm(c.rms_norm_eps, c.norm_offset, name=name)

        mlp = SparseMoE(c, name='mlp') if c.num_experts else DecoderMLP(c, name='mlp')
        h = norm('input_layernorm')(x)
        h = DecoderAttention(c, name='self_attn')(h, layer['inv_freq'], layer['window'])
        if c.sandwich_norms:
            x = x + norm('post_attention_layernorm')(h)
            h = mlp(norm('pre_feedforward_layernorm')(x))
            return x + norm('post_feedforward_layernorm')(h), None
        x = x + h
        return x + mlp(norm('post_attention_layernorm')(x)), None


class Decoder(nn.Module):
    """`*ForCausalLM` of the Llama family without the `model` prefix.

    Its own `lm_head` even when Hugging Face ties it (an import fills it from
    `embed_tokens`).
    """

    config: DecoderConfig

    @nn.compact
    def __call__(self, ids):
        c = self.config
        x = nn.Embed(c.vocab_size, c.hidden_size, name='embed_tokens')(ids)
        if c.embed_scale is not None:
            x = x * jnp.asarray(c.embed_scale, x.dtype)  # Gemma: cast to the weights' dtype
        x = blocks(DecoderBlock, c, c.num_hidden_layers, 'layers', x, c.layer_inputs())
        x = RMSNorm(c.rms_norm_eps, c.norm_offset, name='norm')(x)
        logits = nn.Dense(c.vocab_size, use_bias=False, name='lm_head')(x)
        if c.final_softcap is not None:
            logits = jnp.tanh(logits / c.final_softcap) * c.final_softcap
        return logits


# GPT-NeoX ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GPTNeoXConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    layer_norm_epsilon: float
    inv_freq: tuple[float, ...]
    hidden_act: str = 'gelu'
    use_parallel_residual: bool = True
    attention_bias: bool = True
    scan: bool = False

    @classmethod
    def of(cls, hf, scan: bool = False) -> 'GPTNeoXConfig':
        """The Flax model's config for a `transformers.GPTNeoXConfig`."""
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_hidden_layers=hf.num_hidden_layers,
            num_attention_heads=hf.num_attention_heads,
            layer_norm_epsilon=hf.layer_norm_eps,
            inv_freq=tuple(float(f) for f in inv_freq(hf, head_dim_of(hf))),
            hidden_act=hf.hidden_act,
            use_parallel_residual=hf.use_parallel_residual,
            attention_bias=getattr(hf, 'attention_bias', True),
            scan=scan,
        )


class GPTNeoXAttention(nn.Module):
    config: GPTNeoXConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        batch, seq, width = x.shape
        freq = jnp.asarray(c.inv_freq, jnp.float32)

        def proj(name):
            y = nn.Dense(width, use_bias=c.attention_bias, name=name)(x)
            return y.reshape(batch, seq, c.num_attention_heads, -1)

        q = rotary(proj('q_proj'), inv_freq=freq)
        k = rotary(proj('k_proj'), inv_freq=freq)
        out = causal_attention(q, k, proj('v_proj')).reshape(batch, seq, width)
        return nn.Dense(width, use_bias=c.attention_bias, name='dense')(out)


class GPTNeoXMLP(nn.Module):
    config: GPTNeoXConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = activation(c.hidden_act)(nn.Dense(c.intermediate_size, name='dense_h_to_4h')(x))
        return nn.Dense(c.hidden_size, name='dense_4h_to_h')(h)


class GPTNeoXBlock(nn.Module):
    config: GPTNeoXConfig

    @nn.compact
    def __call__(self, x, _=None):
        c = self.config
        attn = GPTNeoXAttention(c, name='attention')(layer_norm(c, 'input_layernorm')(x))
        mlp = GPTNeoXMLP(c, name='mlp')
        if c.use_parallel_residual:  # x + attn(ln1(x)) + mlp(ln2(x))
            return mlp(layer_norm(c, 'post_attention_layernorm')(x)) + attn + x, None
        x = attn + x
        return mlp(layer_norm(c, 'post_attention_layernorm')(x)) + x, None


class GPTNeoX(nn.Module):
    """GPTNeoXForCausalLM without its `gpt_neox` prefix; the head is `embed_out` (untied)."""

    config: GPTNeoXConfig

    @nn.compact
    def __call__(self, ids):
        c = self.config
        x = nn.Embed(c.vocab_size, c.hidden_size, name='embed_in')(ids)
        x = blocks(GPTNeoXBlock, c, c.num_hidden_layers, 'layers', x)
        x = layer_norm(c, 'final_layer_norm')(x)
        return nn.Dense(c.vocab_size, use_bias=False, name='embed_out')(x)


# From a transformers config or model --------------------------------------------

MODEL_TYPES = (*LLAMA_FAMILY, 'gpt2', 'gpt_neox')


def flax_model(hf_config, scan: bool) -> nn.Module:
    """The Flax model, in the canonical layout, of a transformers config."""
    kind = hf_config.model_type
    if kind == 'gpt2':
        return GPT2(GPT2Config.of(hf_config, scan, split_qkv=True))
    if kind == 'gpt_neox':
        return GPTNeoX(GPTNeoXConfig.of(hf_config, scan))
    return Decoder(DecoderConfig.of(hf_config, scan))


def canonical_params(hf_model, state_dict=None) -> dict[str, np.ndarray]:
    """A PyTorch `*ForCausalLM`'s weights in `flax_model`'s unrolled layout, with NumPy.

    Flat '/'-joined keys. Linear weights transposed to (in, out) kernels; fused
    weights split (Phi-3 `qkv_proj` rows [q, k, v] and `gate_up_proj` rows
    [gate, up]; GPT-2 `c_attn` columns [q, k, v]; GPT-NeoX `query_key_value`
    rows per head [q, k, v]); Mixtral's experts stacked (E, in, out); a tied
    head copied from the embedding.

    `state_dict` (names to tensors or arrays), if given, replaces the model's
    own: e.g. a checkpoint as `save_pretrained` writes it, whose names differ
    for some models (Mixtral's per-expert `block_sparse_moe.experts.{e}.w1/w2/w3`,
    GPT-NeoX's `embed_out`).
    """
    config = hf_model.config
    if state_dict is None:
        state_dict = hf_model.state_dict()
    sd = {k: np.asarray(_numpy(v), np.float32) for k, v in state_dict.items()}
    kind = config.model_type
    if kind == 'gpt2':
        return _gpt2_params(sd, config)
    if kind == 'gpt_neox':
        return _gpt_neox_params(sd, config)
    if kind not in LLAMA_FAMILY:
        raise NotImplementedError(f'model_type {kind!r}')
    return _decoder_params(sd, config)


def _numpy(value):
    if hasattr(value, 'detach'):  # a torch.Tensor
        return value.detach().cpu().float().numpy()
    return value


def _decoder_params(sd, config):
    out = {'embed_tokens/embedding': sd['model.embed_tokens.weight']}
    heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    hd = head_dim_of(config)

    def linear(dst, src):
        out[f'{dst}/kernel'] = sd[f'{src}.weight'].T
        if f'{src}.bias' in sd:
            out[f'{dst}/bias'] = sd[f'{src}.bias']

    for i in range(config.num_hidden_layers):
        p, q = f'model.layers.{i}.', f'layers_{i}/'
        for norm in (
            'input_layernorm',
            'post_attention_layernorm',
            'pre_feedforward_layernorm',
            'post_feedforward_layernorm',
            'self_attn.q_norm',
            'self_attn.k_norm',
        ):
            if f'{p}{norm}.weight' in sd:
                out[q + norm.replace('.', '/') + '/scale'] = sd[f'{p}{norm}.weight']
        if f'{p}self_attn.qkv_proj.weight' in sd:  # Phi-3
            w = sd[f'{p}self_attn.qkv_proj.weight']
            wq, wk, wv = np.split(w, [heads * hd, (heads + kv) * hd])
            for name, part in zip('qkv', (wq, wk, wv), strict=True):
                out[f'{q}self_attn/{name}_proj/kernel'] = part.T
        else:
            for name in 'qkv':
                linear(f'{q}self_attn/{name}_proj', f'{p}self_attn.{name}_proj')
        linear(f'{q}self_attn/o_proj', f'{p}self_attn.o_proj')
        if f'{p}mlp.gate_up_proj.weight' in sd:  # Phi-3
            gate, up = np.split(sd[f'{p}mlp.gate_up_proj.weight'], 2)
            out[f'{q}mlp/gate_proj/kernel'], out[f'{q}mlp/up_proj/kernel'] = gate.T, up.T
            linear(f'{q}mlp/down_proj', f'{p}mlp.down_proj')
        elif f'{p}block_sparse_moe.gate.weight' in sd:  # Mixtral as saved: one Linear per expert
            m = f'{p}block_sparse_moe.'
            out[f'{q}mlp/gate/kernel'] = sd[m + 'gate.weight'].T
            for name, w in (('gate_proj', 'w1'), ('up_proj', 'w3'), ('down_proj', 'w2')):
                experts = [
                    sd[f'{m}experts.{e}.{w}.weight'].T for e in range(config.num_local_experts)
                ]
                out[f'{q}mlp/experts/{name}/kernel'] = np.stack(experts)
        elif f'{p}mlp.gate.weight' in sd:  # Mixtral's state_dict in v5: experts fused in 3D
            out[f'{q}mlp/gate/kernel'] = sd[f'{p}mlp.gate.weight'].T
            gate, up = np.split(sd[f'{p}mlp.experts.gate_up_proj'], 2, axis=1)  # (E, 2I, d)
            out[f'{q}mlp/experts/gate_proj/kernel'] = gate.transpose(0, 2, 1)
            out[f'{q}mlp/experts/up_proj/kernel'] = up.transpose(0, 2, 1)
            out[f'{q}mlp/experts/down_proj/kernel'] = sd[f'{p}mlp.experts.down_proj'].transpose(
                0, 2, 1
            )
        else:
            for name in ('gate_proj', 'up_proj', 'down_proj'):
                linear(f'{q}mlp/{name}', f'{p}mlp.{name}')
    out['norm/scale'] = sd['model.norm.weight']
    out['lm_head/kernel'] = sd.get('lm_head.weight', sd['model.embed_tokens.weight']).T
    return out


def _gpt2_params(sd, config):
    t = 'transformer.'
    out = {'wte/embedding': sd[t + 'wte.weight'], 'wpe/embedding': sd[t + 'wpe.weight']}

    def ln(dst, src):
        out[f'{dst}/scale'], out[f'{dst}/bias'] = sd[f'{src}.weight'], sd[f'{src}.bias']

    def conv1d(dst, src):  # Conv1D stores (in, out) already
        out[f'{dst}/kernel'], out[f'{dst}/bias'] = sd[f'{src}.weight'], sd[f'{src}.bias']

    for i in range(config.n_layer):
        p, q = f'{t}h.{i}.', f'h_{i}/'
        ln(q + 'ln_1', p + 'ln_1')
        ln(q + 'ln_2', p + 'ln_2')
        kernels = np.split(sd[p + 'attn.c_attn.weight'], 3, axis=1)
        biases = np.split(sd[p + 'attn.c_attn.bias'], 3)
        for name, w, b in zip('qkv', kernels, biases, strict=True):
            out[f'{q}attn/{name}_proj/kernel'], out[f'{q}attn/{name}_proj/bias'] = w, b
        conv1d(q + 'attn/c_proj', p + 'attn.c_proj')
        conv1d(q + 'mlp/c_fc', p + 'mlp.c_fc')
        conv1d(q + 'mlp/c_proj', p + 'mlp.c_proj')
    ln('ln_f', t + 'ln_f')
    return out


def _gpt_neox_params(sd, config):
    t = 'gpt_neox.'
    out = {'embed_in/embedding': sd[t + 'embed_in.weight']}
    heads, d = config.num_attention_heads, config.hidden_size

    def linear(dst, src):
        out[f'{dst}/kernel'] = sd[f'{src}.weight'].T
        if f'{src}.bias' in sd:
            out[f'{dst}/bias'] = sd[f'{src}.bias']

    def ln(dst, src):
        out[f'{dst}/scale'], out[f'{dst}/bias'] = sd[f'{src}.weight'], sd[f'{src}.bias']

    for i in range(config.num_hidden_layers):
        p, q = f'{t}layers.{i}.', f'layers_{i}/'
        ln(q + 'input_layernorm', p + 'input_layernorm')
        ln(q + 'post_attention_layernorm', p + 'post_attention_layernorm')
        # Rows per head: [q (hd), k (hd), v (hd)] for head 0, then head 1, ...
        w = sd[p + 'attention.query_key_value.weight'].reshape(heads, 3, -1, d)
        for j, name in enumerate('qkv'):
            out[f'{q}attention/{name}_proj/kernel'] = w[:, j].reshape(-1, d).T
        if p + 'attention.query_key_value.bias' in sd:
            b = sd[p + 'attention.query_key_value.bias'].reshape(heads, 3, -1)
            for j, name in enumerate('qkv'):
                out[f'{q}attention/{name}_proj/bias'] = b[:, j].reshape(-1)
        linear(q + 'attention/dense', p + 'attention.dense')
        linear(q + 'mlp/dense_h_to_4h', p + 'mlp.dense_h_to_4h')
        linear(q + 'mlp/dense_4h_to_h', p + 'mlp.dense_4h_to_h')
    ln('final_layer_norm', t + 'final_layer_norm')
    # transformers v5 names the head `lm_head` (checkpoints on the Hub: `embed_out`).
    head = sd.get('lm_head.weight', sd.get('embed_out.weight'))
    out['embed_out/kernel'] = (sd[t + 'embed_in.weight'] if head is None else head).T
    return out


def to_tree(flat: dict, scan: bool = False) -> dict:
    """Flat '/'-joined params (unrolled) nested; with `scan`, `layers_{i}` / `h_{i}` stacked."""
    if scan:
        stacked: dict = {}
        rest = {}
        for key, value in flat.items():
            m = re.fullmatch(r'(layers|h)_(\d+)/(.*)', key)
            if m:
                stacked.setdefault(f'{m[1]}/{m[3]}', {})[int(m[2])] = value
            else:
                rest[key] = value
        flat = rest | {k: np.stack([v[i] for i in sorted(v)]) for k, v in stacked.items()}
    tree: dict = {}
    for key, value in flat.items():
        *path, leaf = key.split('/')
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def tiny_config(model_type: str, **overrides):
    """A tiny transformers config of `model_type`: vocab 128, hidden 64, 2 layers, 4 heads.

    2 key/value heads where the family has GQA, head_dim 16, 64 positions,
    sliding windows of 64 (with 12 tokens equal to global attention), bos/eos/pad
    ids < 128; Mixtral 4 experts, top 2. Some values differ from the defaults to
    exercise what they control: Gemma 2's soft-capping (small caps) and
    query_pre_attn_scalar, Gemma 3's two layer types (with their two RoPE bases),
    Qwen's per-layer sliding layers, Phi-3's partial rotary.
    """
    import transformers

    llama = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    configs = {
        'llama': (transformers.LlamaConfig, {}),
        'mistral': (transformers.MistralConfig, {'sliding_window': 64}),
        'qwen2': (
            transformers.Qwen2Config,
            {'use_sliding_window': True, 'sliding_window': 64, 'max_window_layers': 1},
        ),
        'qwen3': (
            transformers.Qwen3Config,
            {'use_sliding_window': True, 'sliding_window': 64, 'max_window_layers': 1},
        ),
        'gemma': (transformers.GemmaConfig, {}),
        'gemma2': (
            transformers.Gemma2Config,
            {
                'sliding_window': 64,
                'query_pre_attn_scalar': 24,
                'attn_logit_softcapping': 0.5,
                'final_logit_softcapping': 1.0,
            },
        ),
        'gemma3_text': (
            transformers.Gemma3TextConfig,
            {
                'sliding_window': 64,
                'query_pre_attn_scalar': 24,
                'layer_types': ['sliding_attention', 'full_attention'],
            },
        ),
        'phi3': (
            transformers.Phi3Config,
            {
                'original_max_position_embeddings': 64,
                'sliding_window': 64,
                'rope_parameters': {
                    'rope_type': 'default',
                    'rope_theta': 10_000.0,
                    'partial_rotary_factor': 0.5,
                },
            },
        ),
        'mixtral': (
            transformers.MixtralConfig,
            {'num_local_experts': 4, 'num_experts_per_tok': 2, 'sliding_window': 64},
        ),
    }
    if model_type in configs:
        cls, extra = configs[model_type]
        return cls(**(llama | extra | overrides))
    if model_type == 'gpt2':
        base = dict(
            vocab_size=128,
            n_positions=64,
            n_embd=64,
            n_layer=2,
            n_head=4,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        return transformers.GPT2Config(**(base | overrides))
    if model_type == 'gpt_neox':
        base = dict(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        return transformers.GPTNeoXConfig(**(base | overrides))
    raise NotImplementedError(f'model_type {model_type!r}')
