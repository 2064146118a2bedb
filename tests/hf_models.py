"""Small Flax linen Llama and GPT-2 that compute what Hugging Face's PyTorch models compute.

Parameter names follow the PyTorch modules (`self_attn/q_proj`, `attn/c_attn`),
so `from_pytorch` fills them; `scan=True` stacks the blocks with `nn.scan`
(`layers/...` or `h/...` with a leading layer axis), else they are
`layers_0 ...` / `h_0 ...`. Everything runs in float32, without dropout,
caches or padding masks: the forward pass of `model.eval()` on full sequences.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp


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


def causal_attention(q, k, v):
    """softmax(q k^T / sqrt(d) + causal mask) v, heads on axis 2: (batch, seq, heads, dim)."""
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) * q.shape[-1] ** -0.5
    seq = q.shape[1]
    mask = jnp.tril(jnp.ones((seq, seq), bool))
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum('bhqk,bkhd->bqhd', weights, v)


class RMSNorm(nn.Module):
    """LlamaRMSNorm: x / sqrt(mean(x^2) + eps) * weight."""

    eps: float

    @nn.compact
    def __call__(self, x):
        scale = self.param('scale', nn.initializers.ones, (x.shape[-1],))
        variance = jnp.mean(x * x, axis=-1, keepdims=True)
        return scale * (x * jax.lax.rsqrt(variance + self.eps))


def rotary(x, theta):
    """Hugging Face's rotate-half RoPE at positions 0..seq-1: x is (batch, seq, heads, dim)."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)[None, :, None, :]
    half = dim // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * jnp.cos(emb) + rotated * jnp.sin(emb)


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


def blocks(block, config, n, name, x):
    """`n` blocks unrolled (`name_0 ...`) or, with `config.scan`, one stacked `name`."""
    if config.scan:
        scanned = nn.scan(
            block,
            variable_axes={'params': 0},
            split_rngs={'params': True},
            length=n,
        )
        x, _ = scanned(config, name=name)(x, None)
        return x
    for i in range(n):
        x, _ = block(config, name=f'{name}_{i}')(x)
    return x


class GPT2Attention(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x):
        c = self.config
        batch, seq, width = x.shape
        qkv = nn.Dense(3 * width, name='c_attn')(x)
        q, k, v = (t.reshape(batch, seq, c.n_head, -1) for t in jnp.split(qkv, 3, axis=-1))
        out = causal_attention(q, k, v).reshape(batch, seq, width)
        return nn.Dense(width, name='c_proj')(out)


class GPT2MLP(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        h = nn.gelu(nn.Dense(4 * width, name='c_fc')(x), approximate=True)  # gelu_new
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
