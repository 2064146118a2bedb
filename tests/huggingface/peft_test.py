"""PEFT adapters: read onto a base, compared with PEFT, written back for PEFT; bad input.

Adapters made by `peft` on a tiny `transformers` Llama (random weights, no
download) are merged here, in Hugging Face names and into Flax params sharded
over 8 devices, and compared with PEFT's own `merge_and_unload()` and with the
PEFT model's logits; written back with `save_peft_adapter`, PEFT loads them to
the same merged weights. The oracle and bad-input tests write adapter files by
hand and need no torch.
"""

import contextlib
import copy
import json
import re
import warnings

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orbax_surgery as osurg
from orbax_surgery import (
    CheckpointNotFoundError,
    LoraMismatchError,
    ShapeMismatchError,
    SurgeryError,
    UnmatchedKeyError,
)
from orbax_surgery.huggingface import read_peft_adapter, save_peft_adapter
from orbax_surgery.huggingface.safetensors_file import write_file
from orbax_surgery.keys import flatten, nest

TOL = {'rtol': 1e-5, 'atol': 1e-6}
IDS = np.random.default_rng(0).integers(0, 128, size=(2, 12)).astype(np.int32)
LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
ADAPTERS = {
    # rsLoRA, a rank pattern, an alpha pattern for one layer, an embedding and an MLP weight.
    'patterns': dict(
        r=4,
        lora_alpha=8,
        target_modules=['q_proj', 'v_proj', 'embed_tokens', 'down_proj'],
        rank_pattern={'v_proj': 2},
        alpha_pattern={'layers.1.self_attn.q_proj': 3},
        use_rslora=True,
        init_lora_weights=False,  # B is random too, so the update is not zero.
    ),
    # alpha / r, and a head trained in full (modules_to_save).
    'head': dict(
        r=2,
        lora_alpha=6,
        target_modules=['k_proj', 'o_proj'],
        modules_to_save=['lm_head'],
        init_lora_weights=False,
    ),
}
FROM_TORCH = osurg.from_pytorch(drop_prefix='model')
# Back to Hugging Face names: everything but the head lives under 'model'.
TO_TORCH = [*osurg.to_pytorch(), osurg.Rename(r'(?!lm_head/)(.*)', r'model/\1')]


@contextlib.contextmanager
def quiet():
    """transformers and peft warn about deprecations and about choices they make."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        yield


def numpy_state(model):
    return {k.replace('.', '/'): v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope='module')
def libs():
    with quiet():
        torch = pytest.importorskip('torch')
        transformers = pytest.importorskip('transformers')
        peft = pytest.importorskip('peft')
    return torch, transformers, peft


@pytest.fixture(scope='module', params=sorted(ADAPTERS))
def made(request, libs, tmp_path_factory):
    """A base Llama saved by transformers, a PEFT adapter for it, and PEFT's results."""
    torch, transformers, peft = libs
    root = tmp_path_factory.mktemp(request.param)
    with quiet():
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
        model.save_pretrained(root / 'base')
        config = peft.LoraConfig(**ADAPTERS[request.param])
        peft_model = peft.get_peft_model(copy.deepcopy(model), config).eval()
        if config.modules_to_save:
            head = peft_model.base_model.model.lm_head.modules_to_save['default']
            with torch.no_grad():
                head.weight.add_(torch.randn(head.weight.shape))  # Trained: not the base's.
        peft_model.save_pretrained(root / 'adapter')
        with torch.no_grad():
            logits = peft_model(torch.from_numpy(IDS).long()).logits.numpy()
        merged = numpy_state(copy.deepcopy(peft_model).merge_and_unload())
    return dict(
        name=request.param,
        base_dir=root / 'base',
        adapter_dir=root / 'adapter',
        base=numpy_state(model),
        merged=merged,
        logits=logits,
        hf_config=model.config,
    )


def hf_target(state):
    """Hugging Face names and torch layouts (a Linear weight is (out, in))."""
    return nest({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in state.items()})


def flax_key(key):
    """The Flax Llama's name that `from_pytorch(drop_prefix='model')` fills from `key`."""
    module = re.sub(r'layers/(\d+)', r'layers_\1', key.removeprefix('model/')).rpartition('/')[0]
    if module == 'embed_tokens':
        return 'embed_tokens/embedding'
    return module + ('/scale' if module.endswith('norm') else '/kernel')


def flax_state(state):
    """A torch state dict as Flax params hold it: kernels (in, out)."""
    out = {}
    for key, value in state.items():
        out[flax_key(key)] = value.T if flax_key(key).endswith('kernel') else value
    return out


def flax_target(state, mesh):
    """Flax params, every matrix sharded over the mesh by its first axis."""
    out = {}
    for key, value in flax_state(state).items():
        sharding = NamedSharding(mesh, P('x') if value.ndim == 2 else P())
        out[key] = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)
    return nest(out)


def flax_llama(c, scan):
    """The Flax Llama of `hf_models.py` (its names are what `from_pytorch` fills)."""
    hf_models = pytest.importorskip('hf_models')
    return hf_models.Llama(hf_models.LlamaConfig.of(c, scan))


def assert_all_close(got, want):
    got = {k: np.asarray(v) for k, v in flatten(got)[0].items()}
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, **TOL, err_msg=key)


def test_merged_in_hugging_face_names_equals_peft_merge(made):
    adapter = read_peft_adapter(
        made['adapter_dir'], base=made['base_dir'], target=hf_target(made['base'])
    )

    merged = adapter.restore()

    assert_all_close(merged, made['merged'])
    assert adapter.plan().errors == ()


def test_merged_into_sharded_flax_params_equals_peft_merge(made, mesh8):
    target = flax_target(made['base'], mesh8)
    adapter = read_peft_adapter(
        made['adapter_dir'], base=made['base_dir'], target=target, base_rules=FROM_TORCH
    )

    merged = adapter.restore()

    assert_all_close(merged, flax_state(made['merged']))
    flat = flatten(merged)[0]
    for key, leaf in flatten(target)[0].items():
        assert flat[key].sharding == leaf.sharding, key


def test_logits_of_the_flax_llama_equal_the_peft_models(made):
    model = flax_llama(made['hf_config'], scan=False)
    target = jax.eval_shape(model.init, jax.random.key(0), IDS)['params']
    adapter = read_peft_adapter(
        made['adapter_dir'], base=made['base_dir'], target=target, base_rules=FROM_TORCH
    )

    logits = model.apply({'params': adapter.restore()}, IDS)

    np.testing.assert_allclose(np.asarray(logits), made['logits'], rtol=1e-4, atol=1e-4)


def test_layout_follows_the_config_and_the_tensors(made):
    adapter = read_peft_adapter(made['adapter_dir'])  # No base: Hugging Face names.

    got = {a.key: (a.rank, a.alpha, a.scale, a.a_shape, a.b_shape) for a in adapter.layout.adapters}

    if made['name'] == 'patterns':
        s4, s2 = 8 / 2, 8 / 2**0.5  # rsLoRA: alpha / sqrt(r).
        assert got == {
            'model/embed_tokens/weight': (4, 8, s4, (128, 4), (4, 64)),
            'model/layers/0/mlp/down_proj/weight': (4, 8, s4, (64, 4), (4, 128)),
            'model/layers/0/self_attn/q_proj/weight': (4, 8, s4, (64, 4), (4, 64)),
            'model/layers/0/self_attn/v_proj/weight': (2, 8, s2, (32, 2), (2, 64)),
            'model/layers/1/mlp/down_proj/weight': (4, 8, s4, (64, 4), (4, 128)),
            'model/layers/1/self_attn/q_proj/weight': (4, 3, 3 / 2, (64, 4), (4, 64)),
            'model/layers/1/self_attn/v_proj/weight': (2, 8, s2, (32, 2), (2, 64)),
        }
        assert dict(adapter.layout.trained) == {}
        assert adapter.modules['model/embed_tokens/weight'] == ('model.embed_tokens',)
    else:
        assert {a.scale for a in adapter.layout.adapters} == {3.0}  # 6 / 2
        assert len(got) == 4
        assert dict(adapter.layout.trained) == {'lm_head/weight': ((128, 64), np.dtype('float32'))}


def test_split_gives_the_peft_factors_transposed_beside_the_base(made, mesh8):
    from safetensors.numpy import load_file

    target = flax_target(made['base'], mesh8)
    adapter = read_peft_adapter(
        made['adapter_dir'], base=made['base_dir'], target=target, base_rules=FROM_TORCH
    )

    frozen, trainable = adapter.restore(mode='split')

    stored = load_file(made['adapter_dir'] / 'adapter_model.safetensors')
    got = flatten(trainable)[0]
    trained = set(adapter.layout.trained)
    assert_all_close(
        frozen, {k: v for k, v in flax_state(made['base']).items() if k not in trained}
    )
    layer = 'base_model.model.model.layers.0.'
    if made['name'] == 'patterns':
        pairs = {
            'layers_0/self_attn/v_proj/kernel_lora_a': layer + 'self_attn.v_proj.lora_A.weight',
            'layers_0/self_attn/v_proj/kernel_lora_b': layer + 'self_attn.v_proj.lora_B.weight',
            'embed_tokens/embedding_lora_a': 'base_model.model.model.embed_tokens.lora_embedding_A',
            'embed_tokens/embedding_lora_b': 'base_model.model.model.embed_tokens.lora_embedding_B',
        }
    else:
        pairs = {
            'layers_0/self_attn/o_proj/kernel_lora_a': layer + 'self_attn.o_proj.lora_A.weight',
            'layers_0/self_attn/o_proj/kernel_lora_b': layer + 'self_attn.o_proj.lora_B.weight',
            'lm_head/kernel': 'base_model.model.lm_head.weight',
        }
    for key, name in pairs.items():
        np.testing.assert_array_equal(np.asarray(got[key]), stored[name].T, err_msg=key)
    # The layout merges the two trees as the restore merges them.
    assert_all_close(adapter.layout.merge(frozen, trainable), flax_state(made['merged']))


def test_attach_and_adapters_alone(made, mesh8):
    target = flax_target(made['base'], mesh8)
    with_base = read_peft_adapter(
        made['adapter_dir'], base=made['base_dir'], target=target, base_rules=FROM_TORCH
    )
    alone = read_peft_adapter(made['adapter_dir'], target=target, base_rules=FROM_TORCH)

    joined = with_base.restore(mode='attach')
    trainable = alone.restore()

    assert alone.layout == with_base.layout
    _, from_joined = with_base.layout.split(joined)
    assert_all_close(trainable, {k: np.asarray(v) for k, v in flatten(from_joined)[0].items()})
    a = with_base.layout.adapters[0]
    leaf = flatten(trainable)[0][a.a_key]
    assert leaf.sharding.spec == P('x', None)  # A follows its weight's input axis.


@pytest.mark.parametrize('names', ['flax', 'hugging_face'])
def test_written_adapter_loads_in_peft_to_the_same_merge(made, libs, tmp_path, mesh8, names):
    torch, transformers, peft = libs
    if names == 'flax':
        target, rules, write_rules = flax_target(made['base'], mesh8), FROM_TORCH, TO_TORCH
        embeddings = r'(.*/)?embedding'
    else:
        target, rules, write_rules = hf_target(made['base']), (), ()
        embeddings = r'.*embed_tokens/weight'
    adapter = read_peft_adapter(
        made['adapter_dir'], base=made['base_dir'], target=target, base_rules=rules
    )
    _, trainable = adapter.restore(mode='split')

    save_peft_adapter(
        trainable,
        adapter.layout,
        tmp_path / 'out',
        rules=write_rules,
        embeddings=embeddings,
        task_type='CAUSAL_LM',
    )

    config = json.loads((tmp_path / 'out' / 'adapter_config.json').read_text())
    if made['name'] == 'patterns':
        assert config['use_rslora'] and (config['r'], config['lora_alpha']) == (4, 8)
        assert config['rank_pattern'] == {'v_proj': 2}
        assert config['alpha_pattern'] == {r'model\.layers\.1\.self_attn\.q_proj': 3}
    else:
        assert config['modules_to_save'] == ['lm_head']
        assert (config['r'], config['lora_alpha'], config['rank_pattern']) == (2, 6, {})
    with quiet():
        base = transformers.LlamaForCausalLM.from_pretrained(made['base_dir'])
        loaded = peft.PeftModel.from_pretrained(base, tmp_path / 'out').eval()
        with torch.no_grad():
            logits = loaded(torch.from_numpy(IDS).long()).logits.numpy()
        merged = numpy_state(loaded.merge_and_unload())
    np.testing.assert_allclose(logits, made['logits'], rtol=1e-5, atol=1e-5)
    for key, value in made['merged'].items():
        np.testing.assert_allclose(merged[key], value, **TOL, err_msg=key)
    # And it reads back here as the same layout.
    again = read_peft_adapter(
        tmp_path / 'out', base=made['base_dir'], target=target, base_rules=rules
    )
    assert again.layout == adapter.layout


def test_gpt2_conv1d_fan_in_fan_out(libs, tmp_path):
    torch, transformers, peft = libs
    with quiet():
        torch.manual_seed(0)
        config = transformers.GPT2Config(
            vocab_size=128,
            n_positions=32,
            n_embd=32,
            n_layer=1,
            n_head=4,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = transformers.GPT2LMHeadModel(config).eval()
        model.save_pretrained(tmp_path / 'base')
        lora = peft.LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=['c_attn', 'c_fc'],
            fan_in_fan_out=True,
            init_lora_weights=False,
        )
        peft_model = peft.get_peft_model(copy.deepcopy(model), lora)
        peft_model.save_pretrained(tmp_path / 'adapter')
        want = numpy_state(peft_model.merge_and_unload())
    state = numpy_state(model)
    target = hf_target({k: v for k, v in state.items() if k != 'lm_head/weight'})  # Tied.
    adapter = read_peft_adapter(tmp_path / 'adapter', base=tmp_path / 'base', target=target)

    merged = adapter.restore()

    assert_all_close(merged, {k: v for k, v in want.items() if k != 'lm_head/weight'})
    a = next(a for a in adapter.layout.adapters if 'c_attn' in a.key)
    assert (a.a_shape, a.b_shape) == ((32, 2), (2, 96))  # Conv1D weight (in, out) = (32, 96).
    _, trainable = adapter.restore(mode='split')
    save_peft_adapter(trainable, adapter.layout, tmp_path / 'out', fan_in_fan_out=True)
    with quiet():
        base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / 'base')
        again = numpy_state(
            peft.PeftModel.from_pretrained(base, tmp_path / 'out').merge_and_unload()
        )
    for key, value in want.items():
        np.testing.assert_allclose(again[key], value, **TOL, err_msg=key)


# Hand-written adapters: no torch needed.

W = np.arange(48, dtype=np.float32).reshape(8, 6) / 10  # A torch Linear weight (out, in).
E = np.arange(32, dtype=np.float32).reshape(16, 2)  # An embedding (vocab, dim).
LORA_A = np.random.default_rng(1).standard_normal((2, 6)).astype(np.float32)  # (r, in)
LORA_B = np.random.default_rng(2).standard_normal((8, 2)).astype(np.float32)  # (out, r)
EMB_A = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)  # (r, vocab)
EMB_B = np.random.default_rng(4).standard_normal((2, 2)).astype(np.float32)  # (dim, r)
PREFIX = 'base_model.model.'


def write_base(path, tensors=None):
    path.mkdir(parents=True, exist_ok=True)
    tensors = tensors or {'model.layers.0.q.weight': W, 'model.embed.weight': E}
    write_file(path / 'model.safetensors', tensors, {'format': 'pt'})
    return path


def write_adapter(path, config=None, tensors=None, prefix=PREFIX):
    path.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        tensors = {
            'model.layers.0.q.lora_A.weight': LORA_A,
            'model.layers.0.q.lora_B.weight': LORA_B,
            'model.embed.lora_embedding_A': EMB_A,
            'model.embed.lora_embedding_B': EMB_B,
        }
    tensors = {prefix + k: v for k, v in tensors.items()}
    write_file(path / 'adapter_model.safetensors', tensors, {'format': 'pt'})
    config = {'peft_type': 'LORA', 'r': 2, 'lora_alpha': 3, **(config or {})}
    (path / 'adapter_config.json').write_text(json.dumps(config))
    return path


@pytest.mark.parametrize('prefix', [PREFIX, ''], ids=['peft_prefix', 'no_prefix'])
@pytest.mark.parametrize('names', ['hugging_face', 'flax'])
def test_merge_equals_numpy_oracle(tmp_path, mesh8, prefix, names):
    base = write_base(tmp_path / 'base')
    adapter_dir = write_adapter(tmp_path / 'adapter', prefix=prefix)
    w = W + 1.5 * LORA_B @ LORA_A  # alpha / r = 3 / 2
    e = E + 1.5 * EMB_A.T @ EMB_B.T
    if names == 'flax':
        row = NamedSharding(mesh8, P('x'))
        target = {
            'layers_0': {'q': {'kernel': jax.ShapeDtypeStruct((6, 8), np.float32)}},
            'embed': {'embedding': jax.ShapeDtypeStruct((16, 2), np.float32, sharding=row)},
        }
        rules, want = FROM_TORCH, {'layers_0/q/kernel': w.T, 'embed/embedding': e}
    else:
        target = {'model': {'layers': {'0': {'q': {'weight': ...}}}, 'embed': {'weight': ...}}}
        rules, want = (), {'model/layers/0/q/weight': w, 'model/embed/weight': e}

    adapter = read_peft_adapter(adapter_dir, base=base, target=target, base_rules=rules)

    assert_all_close(adapter.restore(), want)


def test_unmerge_takes_the_merged_base_back(tmp_path):
    merged = W + 1.5 * LORA_B @ LORA_A
    base = write_base(tmp_path / 'base', {'model.layers.0.q.weight': merged})
    tensors = {'model.layers.0.q.lora_A.weight': LORA_A, 'model.layers.0.q.lora_B.weight': LORA_B}
    adapter = read_peft_adapter(write_adapter(tmp_path / 'adapter', tensors=tensors), base=base)

    assert_all_close(adapter.restore(mode='unmerge'), {'model/layers/0/q/weight': W})


def test_stacked_layers_and_nnx_naming(tmp_path):
    rng = np.random.default_rng(5)
    ws = rng.standard_normal((2, 8, 6)).astype(np.float32)
    a_s = rng.standard_normal((2, 2, 6)).astype(np.float32)
    b_s = rng.standard_normal((2, 8, 2)).astype(np.float32)
    base = write_base(tmp_path / 'base', {f'model.layers.{i}.q.weight': ws[i] for i in range(2)})
    tensors = {}
    for i in range(2):
        tensors[f'model.layers.{i}.q.lora_A.weight'] = a_s[i]
        tensors[f'model.layers.{i}.q.lora_B.weight'] = b_s[i]
    rules = [osurg.Stack(r'model/layers/{i}/(.*)', r'layers/\1')]

    adapter = read_peft_adapter(
        write_adapter(tmp_path / 'adapter', tensors=tensors),
        base=base,
        base_rules=rules,
        naming='nnx',
    )

    (a,) = adapter.layout.adapters
    assert (a.key, a.a_key, a.batch_axes, a.a_shape) == (
        'layers/q/weight',
        'layers/q/lora/lora_a',
        1,
        (2, 8, 2),
    )
    assert adapter.modules['layers/q/weight'] == ('model.layers.0.q', 'model.layers.1.q')
    assert_all_close(adapter.restore(), {'layers/q/weight': ws + 1.5 * b_s @ a_s})


# Bad input.


def test_dora_is_refused_by_config_and_by_tensor(tmp_path):
    with pytest.raises(SurgeryError, match='use_dora=True: DoRA'):
        read_peft_adapter(write_adapter(tmp_path / 'config', {'use_dora': True}))
    tensors = {
        'model.layers.0.q.lora_A.weight': LORA_A,
        'model.layers.0.q.lora_B.weight': LORA_B,
        'model.layers.0.q.lora_magnitude_vector': np.ones(8, np.float32),
    }
    with pytest.raises(SurgeryError, match=re.escape('q/lora_magnitude_vector') + '.*DoRA'):
        read_peft_adapter(write_adapter(tmp_path / 'tensor', tensors=tensors))


@pytest.mark.parametrize(
    'config, match',
    [
        ({'r': 8}, "module 'model.embed' rank 8 \\(r\\), but its tensors have rank 2"),
        ({'rank_pattern': {'q': 4}}, "rank 4 \\(rank_pattern\\['q'\\]\\)"),
    ],
    ids=['r', 'rank_pattern'],
)
def test_config_disagreeing_with_the_tensors_is_refused(tmp_path, config, match):
    with pytest.raises(LoraMismatchError, match=match):
        read_peft_adapter(write_adapter(tmp_path / 'adapter', config))


def test_tensors_that_do_not_fit_each_other_or_the_base_are_refused(tmp_path):
    half = {'model.layers.0.q.lora_A.weight': LORA_A}
    with pytest.raises(LoraMismatchError, match='but not lora_B'):
        read_peft_adapter(write_adapter(tmp_path / 'half', tensors=half))
    ranks = {'model.layers.0.q.lora_A.weight': LORA_A, 'model.layers.0.q.lora_B.weight': W[:, :3]}
    with pytest.raises(LoraMismatchError, match='has rank 2 but'):
        read_peft_adapter(write_adapter(tmp_path / 'ranks', tensors=ranks))
    conv = {
        'model.layers.0.q.lora_A.weight': np.ones((2, 6, 3, 3), np.float32),
        'model.layers.0.q.lora_B.weight': np.ones((8, 2, 1, 1), np.float32),
    }
    with pytest.raises(SurgeryError, match='convolution adapters'):
        read_peft_adapter(write_adapter(tmp_path / 'conv', tensors=conv))
    adapter_dir = write_adapter(tmp_path / 'adapter')
    other = write_base(
        tmp_path / 'other', {'model.layers.0.q.weight': W[:, :4], 'model.embed.weight': E}
    )
    with pytest.raises(
        LoraMismatchError, match='fits a weight of shape \\(8, 6\\).*shape \\(8, 4\\)'
    ):
        read_peft_adapter(adapter_dir, base=other)
    wrong = {
        'model': {'layers': {'0': {'q': {'weight': jax.ShapeDtypeStruct((6, 8), np.float32)}}}}
    }
    with pytest.raises(LoraMismatchError, match="at 'model/layers/0/q/weight', but the target"):
        read_peft_adapter(adapter_dir, target=wrong)
    with pytest.raises(SurgeryError, match="naming 'qwix' is not one of"):
        read_peft_adapter(adapter_dir, naming='qwix')
    missing = write_base(
        tmp_path / 'missing', {'model.layers.0.k.weight': W, 'model.embed.weight': E}
    )
    with pytest.raises(UnmatchedKeyError, match="no 'model/layers/0/q/weight'.*model/layers/0/k"):
        read_peft_adapter(adapter_dir, base=missing)


def test_missing_files_and_other_adapter_kinds_are_refused(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match='does not exist'):
        read_peft_adapter(tmp_path / 'nowhere')
    write_adapter(tmp_path / 'named' / 'mine')
    with pytest.raises(CheckpointNotFoundError, match="sub-directories \\['mine'\\]"):
        read_peft_adapter(tmp_path / 'named')
    pickled = write_adapter(tmp_path / 'pickled')
    (pickled / 'adapter_model.safetensors').rename(pickled / 'adapter_model.bin')
    with pytest.raises(CheckpointNotFoundError, match='adapter_model.bin .a pickle.'):
        read_peft_adapter(pickled)
    with pytest.raises(SurgeryError, match='is a IA3 adapter'):
        read_peft_adapter(write_adapter(tmp_path / 'ia3', {'peft_type': 'IA3'}))


def test_rules_that_cannot_carry_an_adapter_are_refused(tmp_path):
    base = write_base(tmp_path / 'base', {f'model.layers.{i}.q.weight': W for i in range(2)})
    tensors = {'model.layers.0.q.lora_A.weight': LORA_A, 'model.layers.0.q.lora_B.weight': LORA_B}
    adapter_dir = write_adapter(tmp_path / 'adapter', tensors=tensors)
    stack = osurg.Stack(r'model/layers/{i}/(.*)', r'layers/\1')  # Layer 1 has no adapter.

    with pytest.raises(ShapeMismatchError, match="cannot stack '.*/lora_B/weight'"):
        read_peft_adapter(adapter_dir, base=base, base_rules=[stack])
    with pytest.raises(UnmatchedKeyError, match="'model.layers.0.q'.*nowhere to go"):
        read_peft_adapter(adapter_dir, base=base, base_rules=[osurg.Drop('model/layers/0/.*')])
    with pytest.raises(SurgeryError, match="mode 'fuse' is not one of"):
        read_peft_adapter(adapter_dir, base=base).restore(mode='fuse')
    with pytest.raises(SurgeryError, match='needs a base'):
        read_peft_adapter(adapter_dir).restore(mode='split')


def test_scanned_flax_llama_takes_stacked_adapters(made, libs, tmp_path):
    model = flax_llama(made['hf_config'], scan=True)
    target = jax.eval_shape(model.init, jax.random.key(0), IDS)['params']
    rules = osurg.from_pytorch(drop_prefix='model', layers='stacked')
    if made['name'] == 'patterns':  # Layer 1's q_proj has its own alpha.
        with pytest.raises(LoraMismatchError, match='their ranks and alphas differ'):
            read_peft_adapter(
                made['adapter_dir'], base=made['base_dir'], target=target, base_rules=rules
            )
        return
    adapter = read_peft_adapter(
        made['adapter_dir'], base=made['base_dir'], target=target, base_rules=rules
    )
    a = next(a for a in adapter.layout.adapters if a.key == 'layers/self_attn/k_proj/kernel')
    assert (a.batch_axes, a.a_shape, a.b_shape) == (1, (2, 64, 2), (2, 2, 32))

    logits = model.apply({'params': adapter.restore()}, IDS)

    np.testing.assert_allclose(np.asarray(logits), made['logits'], rtol=1e-4, atol=1e-4)
    # Written back layer by layer, PEFT computes the same.
    _, trainable = adapter.restore(mode='split')
    unstack = [*osurg.to_pytorch(layers='stacked'), osurg.Rename(r'(?!lm_head/)(.*)', r'model/\1')]
    save_peft_adapter(trainable, adapter.layout, tmp_path / 'out', rules=unstack)
    torch, transformers, peft = libs
    with quiet():
        base = transformers.LlamaForCausalLM.from_pretrained(made['base_dir'])
        loaded = peft.PeftModel.from_pretrained(base, tmp_path / 'out').eval()
        with torch.no_grad():
            again = loaded(torch.from_numpy(IDS).long()).logits.numpy()
    np.testing.assert_allclose(again, made['logits'], rtol=1e-5, atol=1e-5)
