"""Hugging Face PyTorch checkpoints (sharded safetensors) restored into Flax models, end to end.

Tiny Llama (GQA, RoPE) and GPT-2 (Conv1D, tied head) models are built by
`transformers` from configs with random weights (no download), saved in
several shards, restored lazily into the Flax models of `hf_models.py`
sharded over 8 CPU devices, unrolled and scanned, and their logits compared
with PyTorch's.
"""

import json

import hf_models
import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import orbax_surgery as osurg
from orbax_surgery.huggingface.safetensors_file import write_file
from orbax_surgery.keys import flatten
from orbax_surgery.sources.safetensors import key_to_name

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TOL = {'rtol': 1e-4, 'atol': 1e-4}
IDS = np.random.default_rng(0).integers(0, 128, size=(2, 12)).astype(np.int32)
SHARD = '20KB'
GPT2_CONV1D = r'.*/(c_attn|c_proj|c_fc)/weight'


def auto_mesh():
    """8 devices in one Auto axis, so the models' matmuls run on any sharding."""
    return jax.make_mesh((8,), ('x',), axis_types=(AxisType.Auto,))


def sharded_target(abstract, mesh):
    """Each leaf sharded over the mesh along its largest axis that divides evenly."""

    def one(leaf):
        fits = [a for a, n in enumerate(leaf.shape) if n % mesh.size == 0]
        spec = [None] * len(leaf.shape)
        if fits:
            spec[max(fits, key=lambda a: leaf.shape[a])] = 'x'
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, P(*spec)))

    return jax.tree.map(one, abstract)


def randomized(model, seed):
    """Hugging Face's init leaves norms at 1 and biases at 0: perturb every tensor once."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # Tied tensors appear once.
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def torch_logits(model):
    with torch.no_grad():
        return model(torch.from_numpy(IDS).long()).logits.numpy()


def save_sharded(model, path):
    model.save_pretrained(path, max_shard_size=SHARD)
    files = set(
        json.loads((path / 'model.safetensors.index.json').read_text())['weight_map'].values()
    )
    assert len(files) > 2, files  # Really sharded: the restore spans files.
    return path


def llama_config(**overrides):
    config = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: each key/value head serves two query heads.
        max_position_embeddings=64,
        rope_theta=500_000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaConfig(**(config | overrides))


def flax_llama(config, scan):
    return hf_models.Llama(hf_models.LlamaConfig.of(config, scan))


def flax_gpt2(config, scan):
    return hf_models.GPT2(
        hf_models.GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.n_positions,
            n_embd=config.n_embd,
            n_layer=config.n_layer,
            n_head=config.n_head,
            layer_norm_epsilon=config.layer_norm_epsilon,
            scan=scan,
        )
    )


@pytest.fixture(scope='module')
def llama(tmp_path_factory):
    """A sharded Llama checkpoint, its config and PyTorch's logits."""
    torch.manual_seed(0)
    config = llama_config()
    model = randomized(transformers.LlamaForCausalLM(config), seed=1)
    path = save_sharded(model, tmp_path_factory.mktemp('llama'))
    return path, config, torch_logits(model), model.state_dict()


@pytest.fixture(scope='module')
def gpt2(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=128,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = randomized(transformers.GPT2LMHeadModel(config), seed=2)
    assert model.config.tie_word_embeddings and model.config.activation_function == 'gelu_new'
    path = save_sharded(model, tmp_path_factory.mktemp('gpt2'))
    return path, config, torch_logits(model)


def abstract_params(model):
    return jax.eval_shape(model.init, jax.random.key(0), IDS)['params']


def restore_and_run(path, model, rules):
    """Restores sharded over 8 devices; returns logits, params, the source and the plan."""
    target = sharded_target(abstract_params(model), auto_mesh())
    source = osurg.SafetensorsCheckpoint(path)
    plan = osurg.plan_restore(source, target, rules)
    assert plan.errors == (), str(plan)
    params = osurg.restore(source, target, rules)
    got, want = flatten(params)[0], flatten(target)[0]
    assert sorted(got) == sorted(want)
    for key, leaf in want.items():
        assert got[key].sharding == leaf.sharding, key
    logits = jax.jit(model.apply)({'params': params}, IDS)
    return np.asarray(logits), params, source, plan


def stored_bytes(source):
    return sum(s.nbytes for s in source.arrays.values())


@pytest.mark.parametrize('scan', [False, True], ids=['unrolled', 'scanned'])
def test_llama_matches_torch(llama, scan):
    path, config, want, _ = llama
    rules = osurg.from_pytorch(drop_prefix='model', layers='stacked' if scan else 'unrolled')

    logits, params, source, plan = restore_and_run(path, flax_llama(config, scan), rules)

    np.testing.assert_allclose(logits, want, **TOL)
    if scan:
        assert params['layers']['self_attn']['k_proj']['kernel'].shape == (2, 64, 32)
    # Every stored byte read once, all of it needed: nothing read twice or in vain.
    assert source.bytes_read == plan.reads[0].needed == stored_bytes(source)


@pytest.mark.parametrize('scan', [False, True], ids=['unrolled', 'scanned'])
def test_gpt2_conv1d_and_tied_head_match_torch(gpt2, scan):
    path, config, want = gpt2
    rules = osurg.from_pytorch(
        drop_prefix='transformer',
        layers='stacked' if scan else 'unrolled',
        fan_in_fan_out=GPT2_CONV1D,
    )

    logits, params, source, plan = restore_and_run(path, flax_gpt2(config, scan), rules)

    np.testing.assert_allclose(logits, want, **TOL)
    if scan:
        assert params['h']['attn']['c_attn']['kernel'].shape == (2, 64, 192)
    assert source.bytes_read == plan.reads[0].needed == stored_bytes(source)


@pytest.fixture(scope='module')
def tied_llama(tmp_path_factory):
    torch.manual_seed(0)
    config = llama_config(tie_word_embeddings=True, num_hidden_layers=1)
    model = randomized(transformers.LlamaForCausalLM(config), seed=3)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    path = save_sharded(model, tmp_path_factory.mktemp('tied'))
    return path, config, torch_logits(model)


TIED_RULES = [
    osurg.Copy('model/embed_tokens/weight', 'lm_head/weight'),  # then transposed as any Linear
    *osurg.from_pytorch(drop_prefix='model'),
]


def test_tied_llama_head_reads_the_embedding_once(tied_llama):
    path, config, want = tied_llama
    assert 'lm_head/weight' not in osurg.SafetensorsCheckpoint(path).arrays  # HF stores it once.

    logits, params, source, plan = restore_and_run(path, flax_llama(config, False), TIED_RULES)

    np.testing.assert_allclose(logits, want, **TOL)
    np.testing.assert_array_equal(
        params['lm_head']['kernel'], params['embed_tokens']['embedding'].T
    )
    # embed_tokens (128, 64) on vocab rows and lm_head (64, 128) on vocab columns ask
    # for the same rows of the stored embedding, shard by shard: read once.
    assert source.bytes_read == plan.reads[0].needed == stored_bytes(source)


def test_tied_weight_sharded_differently_is_read_once(tied_llama):
    path, config, _ = tied_llama
    mesh = auto_mesh()
    target = sharded_target(abstract_params(flax_llama(config, False)), mesh)
    # The head sharded on hidden: each shard needs a column block of the stored embedding.
    target['lm_head']['kernel'] = jax.ShapeDtypeStruct(
        (64, 128), np.float32, sharding=NamedSharding(mesh, P('x', None))
    )
    source = osurg.SafetensorsCheckpoint(path)
    plan = osurg.plan_restore(source, target, TIED_RULES)

    osurg.restore(source, target, TIED_RULES)

    assert plan.reads[0].needed == stored_bytes(source)
    assert source.bytes_read == plan.reads[0].needed


def test_missing_and_unexpected_keys_like_hugging_face(llama):
    """A model with one parameter the checkpoint lacks, and without one it holds."""
    path, config, _, _ = llama
    target = sharded_target(abstract_params(flax_llama(config, False)), auto_mesh())
    del target['norm']  # checkpoint's model.norm.weight: unexpected
    bias = np.zeros(64, np.float32)
    target['layers_0']['self_attn']['q_proj']['bias'] = bias  # missing from the checkpoint
    rules = osurg.from_pytorch(drop_prefix='model')

    plan = osurg.plan_restore(path, target, rules)

    assert plan.missing == ('layers_0/self_attn/q_proj/bias',)
    assert plan.unused == (('model/norm/weight', 'norm/weight'),)
    assert sorted(type(e).__name__ for e in plan.errors) == ['UnmatchedKeyError', 'UnusedKeyError']
    report = str(plan)
    assert 'layers_0/self_attn/q_proj/bias' in report and 'model/norm/weight' in report
    with pytest.raises(osurg.UnmatchedKeyError, match='layers_0/self_attn/q_proj/bias'):
        osurg.restore(path, target, rules)

    # Hugging Face warns and initialises; here each is said on purpose.
    accepted = [osurg.Drop('model/norm/weight'), *rules, osurg.Fallback('.*/q_proj/bias')]
    params = osurg.restore(path, target, accepted)
    np.testing.assert_array_equal(params['layers_0']['self_attn']['q_proj']['bias'], bias)


def test_scanned_params_export_to_a_model_transformers_loads(llama, tmp_path):
    """Flax (scanned) -> to_pytorch -> safetensors -> LlamaForCausalLM.from_pretrained."""
    path, config, want, state = llama
    model = flax_llama(config, True)
    target = sharded_target(abstract_params(model), auto_mesh())
    params = osurg.restore(path, target, osurg.from_pytorch(drop_prefix='model', layers='stacked'))

    exported = osurg.apply_rules(
        params,
        None,
        [
            *osurg.to_pytorch(add_prefix='model', layers='stacked'),
        ],
    )

    tensors = {key_to_name(k): np.asarray(v) for k, v in flatten(exported)[0].items()}
    assert sorted(tensors) == sorted(state)
    for name, value in state.items():
        np.testing.assert_array_equal(tensors[name], value.numpy(), err_msg=name)
    write_file(tmp_path / 'model.safetensors', tensors, {'format': 'pt'})
    config.save_pretrained(tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    np.testing.assert_allclose(torch_logits(reloaded), want, **TOL)
