"""`hf_models.flax_model` against Hugging Face's PyTorch models, family by family.

For each model_type: a tiny `transformers` config (`hf_models.tiny_config`), a
PyTorch model from it with every parameter perturbed, its weights converted
with NumPy to the canonical Flax layout (`hf_models.canonical_params`: Linear
weights transposed, fused weights split, experts and, scanned, layers
stacked), then (a) the Flax model's abstract parameters have exactly the
canonical names and shapes, written out below from the layout's
specification, and (b) its logits equal PyTorch's.
"""

import json

import hf_models
import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
safetensors_numpy = pytest.importorskip('safetensors.numpy')

TOL = {'rtol': 1e-4, 'atol': 1e-4}
IDS = np.random.default_rng(0).integers(0, 128, size=(2, 12)).astype(np.int32)
SCANS = pytest.mark.parametrize('scan', [False, True], ids=['unrolled', 'scanned'])
# The reference models themselves: slow tier only; tests/huggingface/presets_test.py runs
# four of them in the quick tier, against PyTorch, through the presets.
pytestmark = pytest.mark.slow


def randomized(model, seed):
    """Hugging Face's init leaves norms at 1 (or 0) and biases at 0: perturb every tensor once."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # Tied tensors appear once.
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def torch_model(config, seed=1):
    torch.manual_seed(0)
    return randomized(transformers.AutoModelForCausalLM.from_config(config), seed)


def torch_logits(model):
    ids = torch.from_numpy(IDS).long()
    with torch.no_grad():
        return model(ids, attention_mask=torch.ones_like(ids)).logits.numpy()


def flat(tree, prefix=''):
    """'/'-joined keys of a nested dict."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flat(value, f'{prefix}{key}/')
        else:
            out[prefix + key] = value
    return out


def shapes(tree):
    return {k: tuple(v.shape) for k, v in flat(tree).items()}


# The canonical layout, as specified ----------------------------------------------


def decoder_layout(c):
    """The Llama family: (top-level, per-layer) names and shapes."""
    kind = c.model_type
    d, i, v = c.hidden_size, c.intermediate_size, c.vocab_size
    h, kv = c.num_attention_heads, c.num_key_value_heads
    hd = getattr(c, 'head_dim', None) or d // h
    layer = {
        'input_layernorm/scale': (d,),
        'self_attn/q_proj/kernel': (d, h * hd),
        'self_attn/k_proj/kernel': (d, kv * hd),
        'self_attn/v_proj/kernel': (d, kv * hd),
        'self_attn/o_proj/kernel': (h * hd, d),
        'post_attention_layernorm/scale': (d,),
    }
    if kind == 'qwen2':
        layer |= {
            'self_attn/q_proj/bias': (h * hd,),
            'self_attn/k_proj/bias': (kv * hd,),
            'self_attn/v_proj/bias': (kv * hd,),
        }
    if kind in ('qwen3', 'gemma3_text'):
        layer |= {'self_attn/q_norm/scale': (hd,), 'self_attn/k_norm/scale': (hd,)}
    if kind in ('gemma2', 'gemma3_text'):
        layer |= {'pre_feedforward_layernorm/scale': (d,), 'post_feedforward_layernorm/scale': (d,)}
    if kind == 'mixtral':
        e = c.num_local_experts
        layer |= {
            'mlp/gate/kernel': (d, e),
            'mlp/experts/gate_proj/kernel': (e, d, i),
            'mlp/experts/up_proj/kernel': (e, d, i),
            'mlp/experts/down_proj/kernel': (e, i, d),
        }
    else:
        layer |= {
            'mlp/gate_proj/kernel': (d, i),
            'mlp/up_proj/kernel': (d, i),
            'mlp/down_proj/kernel': (i, d),
        }
    top = {'embed_tokens/embedding': (v, d), 'norm/scale': (d,), 'lm_head/kernel': (d, v)}
    return top, 'layers', c.num_hidden_layers, layer


def gpt2_layout(c):
    d, v = c.n_embd, c.vocab_size
    layer = {
        'ln_1/scale': (d,),
        'ln_1/bias': (d,),
        **{f'attn/{n}_proj/kernel': (d, d) for n in 'qkv'},
        **{f'attn/{n}_proj/bias': (d,) for n in 'qkv'},
        'attn/c_proj/kernel': (d, d),
        'attn/c_proj/bias': (d,),
        'ln_2/scale': (d,),
        'ln_2/bias': (d,),
        'mlp/c_fc/kernel': (d, 4 * d),
        'mlp/c_fc/bias': (4 * d,),
        'mlp/c_proj/kernel': (4 * d, d),
        'mlp/c_proj/bias': (d,),
    }
    top = {
        'wte/embedding': (v, d),
        'wpe/embedding': (c.n_positions, d),
        'ln_f/scale': (d,),
        'ln_f/bias': (d,),
    }
    return top, 'h', c.n_layer, layer


def gpt_neox_layout(c):
    d, i, v = c.hidden_size, c.intermediate_size, c.vocab_size
    layer = {
        'input_layernorm/scale': (d,),
        'input_layernorm/bias': (d,),
        'post_attention_layernorm/scale': (d,),
        'post_attention_layernorm/bias': (d,),
        **{f'attention/{n}_proj/kernel': (d, d) for n in 'qkv'},
        **{f'attention/{n}_proj/bias': (d,) for n in 'qkv'},
        'attention/dense/kernel': (d, d),
        'attention/dense/bias': (d,),
        'mlp/dense_h_to_4h/kernel': (d, i),
        'mlp/dense_h_to_4h/bias': (i,),
        'mlp/dense_4h_to_h/kernel': (i, d),
        'mlp/dense_4h_to_h/bias': (d,),
    }
    top = {
        'embed_in/embedding': (v, d),
        'final_layer_norm/scale': (d,),
        'final_layer_norm/bias': (d,),
        'embed_out/kernel': (d, v),
    }
    return top, 'layers', c.num_hidden_layers, layer


def canonical_layout(config, scan):
    """Every parameter's '/'-joined name and shape in the canonical layout."""
    kind = config.model_type
    layout = {'gpt2': gpt2_layout, 'gpt_neox': gpt_neox_layout}.get(kind, decoder_layout)
    top, blocks, n, layer = layout(config)
    if scan:
        return top | {f'{blocks}/{k}': (n, *s) for k, s in layer.items()}
    return top | {f'{blocks}_{i}/{k}': s for i in range(n) for k, s in layer.items()}


# Every model type, unrolled and scanned ---------------------------------------------


@pytest.fixture(scope='module', params=hf_models.MODEL_TYPES)
def case(request):
    """A model type's tiny config, PyTorch logits and canonical (unrolled, flat) params."""
    config = hf_models.tiny_config(request.param)
    model = torch_model(config)
    return config, torch_logits(model), hf_models.canonical_params(model)


def flax_logits(config, params, scan):
    model = hf_models.flax_model(config, scan)
    return np.asarray(jax.jit(model.apply)({'params': hf_models.to_tree(params, scan)}, IDS))


@SCANS
def test_layout_and_logits_match_torch(case, scan):
    config, want, params = case
    model = hf_models.flax_model(config, scan)
    layout = canonical_layout(config, scan)

    abstract = jax.eval_shape(model.init, jax.random.key(0), IDS)['params']

    assert shapes(abstract) == layout
    assert shapes(hf_models.to_tree(params, scan)) == layout
    logits = jax.jit(model.apply)({'params': hf_models.to_tree(params, scan)}, IDS)
    np.testing.assert_allclose(np.asarray(logits), want, **TOL)


def test_tiny_configs():
    for kind in hf_models.MODEL_TYPES:
        config = hf_models.tiny_config(kind)
        assert config.model_type == kind
        assert config.vocab_size == 128 and config.num_hidden_layers == 2
        for name in ('bos_token_id', 'eos_token_id', 'pad_token_id'):
            assert 0 <= getattr(config, name) < 128, (kind, name)
    rope = hf_models.tiny_config('gemma3_text').rope_parameters  # one per layer type
    assert rope['full_attention']['rope_theta'] != rope['sliding_attention']['rope_theta']
    with pytest.raises(NotImplementedError):
        hf_models.tiny_config('bert')


# Options that the tiny configs leave at their defaults ---------------------------------


@pytest.mark.parametrize(
    'kind, scan',
    [('mistral', False), ('qwen2', True), ('gemma2', False), ('gemma3_text', True)],
)
def test_sliding_window_shorter_than_the_sequence(kind, scan):
    """Window 5 < 12 tokens: global for Mistral, per layer type for the others."""
    config = hf_models.tiny_config(kind, sliding_window=5)
    model = torch_model(config)
    want, params = torch_logits(model), hf_models.canonical_params(model)

    np.testing.assert_allclose(flax_logits(config, params, scan), want, **TOL)
    # The window matters: without it the logits differ.
    unwindowed = hf_models.tiny_config(kind, sliding_window=64)
    assert np.abs(flax_logits(unwindowed, params, scan) - want).max() > 1e-2


@SCANS
def test_gpt_neox_sequential_residual(scan):
    config = hf_models.tiny_config('gpt_neox', use_parallel_residual=False)
    model = torch_model(config)

    logits = flax_logits(config, hf_models.canonical_params(model), scan)

    np.testing.assert_allclose(logits, torch_logits(model), **TOL)


@pytest.mark.slow
@pytest.mark.parametrize(
    'kind, overrides',
    [
        (
            'llama',
            {
                'rope_parameters': {
                    'rope_type': 'llama3',
                    'rope_theta': 10_000.0,
                    'factor': 8.0,
                    'low_freq_factor': 1.0,
                    'high_freq_factor': 4.0,
                    'original_max_position_embeddings': 16,
                }
            },
        ),
        (
            'gemma3_text',  # Gemma 3 4B+: linear scaling on the global layers only
            {
                'rope_parameters': {
                    'full_attention': {'rope_type': 'linear', 'rope_theta': 1e6, 'factor': 8.0},
                    'sliding_attention': {'rope_type': 'default', 'rope_theta': 1e4},
                },
                'final_logit_softcapping': 1.0,
                'attn_logit_softcapping': 0.3,  # kept in the config, never applied by Gemma 3
            },
        ),
        ('llama', {'attention_bias': True, 'mlp_bias': True, 'tie_word_embeddings': True}),
    ],
    ids=['llama3-rope', 'gemma3-linear-rope', 'llama-biases-tied'],
)
def test_other_options(kind, overrides):
    config = hf_models.tiny_config(kind, **overrides)
    model = torch_model(config)

    logits = flax_logits(config, hf_models.canonical_params(model), scan=True)

    np.testing.assert_allclose(logits, torch_logits(model), **TOL)


# What save_pretrained writes -------------------------------------------------------------


@pytest.mark.parametrize('kind', ['mixtral', 'gpt_neox', 'gemma', 'phi3', 'gpt2'])
def test_saved_checkpoint_converts_to_the_same_params(kind, tmp_path):
    """transformers 5 saves names other than its state_dict's for some models."""
    config = hf_models.tiny_config(kind)
    model = torch_model(config)
    model.save_pretrained(tmp_path)
    saved = safetensors_numpy.load_file(tmp_path / 'model.safetensors')
    state = model.state_dict()

    if kind == 'mixtral':  # Experts fused in the model, one Linear per expert on disk.
        assert 'model.layers.0.mlp.experts.gate_up_proj' in state
        assert saved['model.layers.0.block_sparse_moe.experts.3.w1.weight'].shape == (128, 64)
        assert not any('experts.gate_up_proj' in k for k in saved)
    if kind == 'gpt_neox':  # `lm_head` in the model, `embed_out` on disk (as on the Hub).
        assert 'lm_head.weight' in state and 'embed_out.weight' not in state
        assert 'embed_out.weight' in saved and 'lm_head.weight' not in saved
    if kind == 'gemma':  # Tied: the head is not saved.
        assert 'lm_head.weight' not in saved
    config_json = json.loads((tmp_path / 'config.json').read_text())
    assert config_json['model_type'] == kind

    want = hf_models.canonical_params(model)
    got = hf_models.canonical_params(model, saved)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
