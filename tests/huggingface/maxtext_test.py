"""MaxText layouts: presets with to='maxtext', proven by MaxText's own forward pass.

The quick tests check the layout (MaxText 0.2.5's parameter paths and shapes,
scanned on axis 1) and that the export rules give back the stored tensors. The
slow test runs `tests/maxtext/maxtext_logits.py` (MaxText 0.2.5's own model on
the checkpoint we write) in MaxText's own Python 3.12 environment, given by
`MAXTEXT_PYTHON` (default /work/maxtext/venv/bin/python; how to make it: the
README's MaxText section), and compares its logits with PyTorch's; it is
skipped, saying so, where that environment is absent.
"""

import json
import os
import subprocess
from pathlib import Path

import hf_models
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file

import orbax_surgery as osurg
from orbax_surgery.keys import flatten
from orbax_surgery.sources.safetensors import key_to_name

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

IDS = np.random.default_rng(0).integers(0, 128, size=(2, 12))
HARNESS = Path(__file__).parents[1] / 'maxtext' / 'maxtext_logits.py'
MAXTEXT_PYTHON = os.environ.get('MAXTEXT_PYTHON', '/work/maxtext/venv/bin/python')
LLAMA31_ROPE = {
    'rope_type': 'llama3',
    'rope_theta': 500000.0,
    'factor': 8.0,  # MaxText hard-codes these four for its interleaved (Llama 3.1) RoPE.
    'low_freq_factor': 1.0,
    'high_freq_factor': 4.0,
    'original_max_position_embeddings': 8192,
}
MODELS = {  # Our case -> (model_type, config overrides, the harness's --model)
    'llama': ('llama', {}, 'llama2'),
    'llama3.1': ('llama', {'rope_parameters': LLAMA31_ROPE}, 'llama3.1'),
    'mistral': ('mistral', {}, 'mistral'),
    'gemma': ('gemma', {}, 'gemma'),
    'gemma2': ('gemma2', {'num_hidden_layers': 4}, 'gemma2'),  # MaxText pairs them: 2 layers.
    'qwen2': ('qwen2', {}, 'qwen2'),
    'qwen3': ('qwen3', {'tie_word_embeddings': True}, 'qwen3'),  # Tied, as Qwen3-0.6B.
    'mixtral': ('mixtral', {}, 'mixtral'),
}


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    made = {}

    def get(case):
        if case not in made:
            model_type, overrides, _ = MODELS[case]
            torch.manual_seed(0)
            config = hf_models.tiny_config(model_type, **overrides)
            model = transformers.AutoModelForCausalLM.from_config(config)
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
            path = tmp_path_factory.mktemp(case.replace('.', '_'))
            model.eval().save_pretrained(path)
            with torch.no_grad():
                logits = model(torch.from_numpy(IDS)).logits.numpy()
            made[case] = path, logits
        return made[case]

    return get


def test_the_maxtext_layout_scanned_on_axis_one():
    config = {**hf_models.tiny_config('llama').to_dict(), 'num_hidden_layers': 3}
    p = osurg.huggingface.preset(config, layers='stacked', to='maxtext')
    layers = p.target['params']['params']['decoder']['layers']
    assert layers['self_attention']['query']['kernel'].shape == (64, 3, 4, 16)  # (E, L, H, D)
    assert layers['self_attention']['key']['kernel'].shape == (64, 3, 2, 16)
    assert layers['self_attention']['out']['kernel'].shape == (4, 3, 16, 64)  # (H, L, D, E)
    assert layers['mlp']['wo']['kernel'].shape == (128, 3, 64)
    assert layers['pre_self_attention_layer_norm']['scale'].shape == (64, 3)
    decoder = p.target['params']['params']['decoder']
    assert decoder['logits_dense']['kernel'].shape == (64, 128)
    gemma = osurg.huggingface.preset(hf_models.tiny_config('gemma'), to='maxtext')
    gemma_decoder = gemma.target['params']['params']['decoder']
    assert 'logits_dense' not in gemma_decoder  # Tied: logits from the embedding.
    assert sorted(gemma_decoder['layers_1']) == [
        'mlp',
        'pre_ffw_norm',
        'pre_self_attention_norm',
        'self_attention',
    ]
    with pytest.raises(osurg.RuleError, match="No MaxText layout for the 'phi3' family"):
        osurg.huggingface.preset(hf_models.tiny_config('phi3'), to='maxtext')


def test_gemma2_qwen_and_mixtral_maxtext_layouts_scanned_on_axis_one():
    def decoder(model_type, layers='stacked', **overrides):
        config = hf_models.tiny_config(model_type, **overrides)
        p = osurg.huggingface.preset(config, layers=layers, to='maxtext')
        return p.target['params']['params']['decoder']

    gemma2 = decoder('gemma2', num_hidden_layers=4)['layers']  # 2 MaxText layers of 2.
    assert gemma2['self_attention_local']['query']['kernel'].shape == (64, 2, 4, 16)
    assert gemma2['self_attention_global']['out']['kernel'].shape == (4, 2, 16, 64)
    assert gemma2['mlp_global']['wo']['kernel'].shape == (128, 2, 64)
    norms = ('pre_self_attention_norm', 'post_self_attention_norm', 'pre_ffw_norm', 'post_ffw_norm')
    modules = ('mlp', 'self_attention', *norms)
    assert sorted(gemma2) == sorted(f'{m}_{half}' for m in modules for half in ('local', 'global'))
    assert gemma2['post_ffw_norm_local']['scale'].shape == (64, 2)
    assert sorted(decoder('gemma2', 'unrolled', num_hidden_layers=4)) == [
        'decoder_norm',
        'layers_0',
        'layers_1',
    ]
    with pytest.raises(osurg.RuleError, match='3 layers, an odd number'):
        decoder('gemma2', num_hidden_layers=3)

    qwen2 = decoder('qwen2')
    attention = qwen2['layers']['self_attention']
    assert attention['query']['bias'].shape == (4, 2, 16)  # (H, L, D)
    assert attention['value']['bias'].shape == (2, 2, 16)
    assert sorted(attention['out']) == ['kernel']  # Qwen 2 has no o_proj bias.
    assert qwen2['logits_dense']['kernel'].shape == (64, 128)  # Untied.
    qwen3 = decoder('qwen3', tie_word_embeddings=True)
    assert qwen3['layers']['self_attention']['query_norm']['scale'].shape == (16, 2)  # (D, L)
    assert qwen3['layers']['self_attention']['key_norm']['scale'].shape == (16, 2)
    assert 'logits_dense' not in qwen3  # Tied: MaxText's logits_via_embedding.

    moe = decoder('mixtral')['layers']['MoeBlock_0']  # 4 experts: X.
    assert moe['gate']['kernel'].shape == (64, 2, 4)  # (E, L, X)
    assert moe['wi_0'].shape == moe['wi_1'].shape == (4, 2, 64, 128)  # (X, L, E, F)
    assert moe['wo'].shape == (4, 2, 128, 64)
    unrolled = decoder('mixtral', 'unrolled')['layers_1']['MoeBlock_0']
    assert unrolled['wi_0'].shape == (4, 64, 128)


@pytest.mark.parametrize('layers', ['unrolled', 'stacked'])
def test_gemma2_maxtext_layer_i_holds_hugging_face_layers_2i_and_2i_plus_1(saved, layers):
    path, _ = saved('gemma2')
    p = osurg.huggingface.preset(path, layers=layers, to='maxtext')
    decoder = osurg.restore(path, p.target, p.import_rules)['params']['params']['decoder']
    stored = load_file(path / 'model.safetensors')
    scale = np.float32(24**-0.5)  # query_pre_attn_scalar, not head_dim (16).
    for i in range(2):
        for half, n in (('local', 2 * i), ('global', 2 * i + 1)):
            if layers == 'stacked':
                layer = jax.tree.map(lambda x, i=i: np.asarray(x)[:, i], decoder['layers'])
            else:
                layer = decoder[f'layers_{i}']
            hf = f'model.layers.{n}.'
            wo = np.asarray(layer[f'mlp_{half}']['wo']['kernel'])
            np.testing.assert_array_equal(wo, stored[hf + 'mlp.down_proj.weight'].T)
            query = np.asarray(layer[f'self_attention_{half}']['query']['kernel'])
            want = stored[hf + 'self_attn.q_proj.weight'].T.reshape(64, 4, 16) * scale
            np.testing.assert_allclose(query, want, rtol=1e-6)


@pytest.mark.parametrize('case', ['llama3.1', 'gemma', 'gemma2', 'qwen2', 'qwen3', 'mixtral'])
@pytest.mark.parametrize('layers', ['unrolled', 'stacked'])
def test_export_from_maxtext_gives_back_the_stored_tensors(saved, case, layers):
    path, _ = saved(case)
    p = osurg.huggingface.preset(path, layers=layers, to='maxtext')
    plan = osurg.plan_restore(path, p.target, p.import_rules)
    assert plan.errors == () and all(step.lazy for step in plan.steps), str(plan)
    params = osurg.restore(path, p.target, p.import_rules)
    if case in ('gemma', 'gemma2'):  # Norms store 1 + w, the embedding sqrt(E) * w.
        stored = load_file(path / 'model.safetensors')
        norm = np.asarray(params['params']['params']['decoder']['decoder_norm']['scale'])
        np.testing.assert_allclose(norm, stored['model.norm.weight'] + 1, rtol=1e-6)
    back = osurg.apply_rules(params, None, p.export_rules)
    exported = {key_to_name(k): np.asarray(v) for k, v in flatten(back)[0].items()}
    stored = load_file(path / 'model.safetensors')
    assert sorted(exported) == sorted(stored)
    for name, tensor in stored.items():  # Scales in float32 and back: within an ulp or two.
        np.testing.assert_allclose(exported[name], tensor, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.slow
def test_the_command_line_writes_maxtexts_layout_where_maxtext_reads_it(saved, tmp_path, capsys):
    from orbax_surgery.cli import main as cli

    path, _ = saved('llama3.1')
    run = tmp_path / 'run'
    args = [path, run, '--preset', 'import', '--layout', 'maxtext', '--layers', 'stacked']
    args += ['--dst-step', '0', '--dst-item', 'items', '-q']
    assert cli.main(['convert', *map(str, args)]) == 0
    p = osurg.huggingface.preset(path, layers='stacked', to='maxtext')
    want = osurg.restore(path, p.target, p.import_rules)
    with ocp.CheckpointManager(run, item_names=('items',)) as manager:  # As MaxText loads it.
        got = manager.restore(0, args=ocp.args.Composite(items=ocp.args.StandardRestore()))
    flat_want, flat_got = flatten(want)[0], flatten(got['items'])[0]
    assert sorted(flat_got) == sorted(flat_want)
    for key, value in flat_want.items():
        np.testing.assert_array_equal(np.asarray(flat_got[key]), np.asarray(value), err_msg=key)
    with pytest.raises(SystemExit):
        cli.main(['convert', str(path), str(tmp_path / 'x'), '--layout', 'maxtext'])
    assert '--layout is for --preset' in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize('case', list(MODELS))
@pytest.mark.parametrize('layers', ['unrolled', 'stacked'])
def test_maxtexts_own_forward_pass_gives_pytorchs_logits(saved, tmp_path, case, layers):
    if not Path(MAXTEXT_PYTHON).exists():
        pytest.skip(f'No MaxText environment at {MAXTEXT_PYTHON} (set MAXTEXT_PYTHON)')
    path, want = saved(case)
    p = osurg.huggingface.preset(path, layers=layers, to='maxtext')
    out = tmp_path / 'maxtext'
    # Written lazily where MaxText's converters put it: step 0, item 'items'.
    with ocp.CheckpointManager(out, item_names=('items',)) as manager:
        source = osurg.SafetensorsCheckpoint(path)
        save = osurg.SurgerySave(item=source, rules=p.import_rules, target=p.target)
        manager.save(0, args=ocp.args.Composite(items=save))
        manager.wait_until_finished()
    (tmp_path / 'ids.json').write_text(json.dumps(IDS.tolist()))
    model = MODELS[case][2]
    args = [MAXTEXT_PYTHON, HARNESS, '--model', model, '--params', out / '0' / 'items']
    args += ['--config-json', path / 'config.json', '--scan', str(layers == 'stacked').lower()]
    args += ['--ids', tmp_path / 'ids.json', '--out', tmp_path / 'logits.npy']
    if 'logits_dense' not in p.target['params']['params']['decoder']:
        args.append('--fp32-tied-logits')  # MaxText casts a tied embedding to bfloat16; not here.
    env = {k: v for k, v in os.environ.items() if not k.startswith(('XLA_', 'JAX_'))}
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.load(tmp_path / 'logits.npy')
    print(f'{case} {layers}: max |logits diff| {np.abs(got - want).max():.2e}')  # -rP shows it.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
