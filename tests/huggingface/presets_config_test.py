"""Presets' inputs: configs in every form, unknown families, `preset = 'auto'` in rules files."""

import json

import jax
import numpy as np
import pytest

import orbax_surgery as osurg
from orbax_surgery.cli.rules_file import load_rules_file
from orbax_surgery.cli.rules_file_entries import ConfigPreset

LLAMA = {
    'model_type': 'llama',
    'vocab_size': 256,
    'hidden_size': 64,
    'intermediate_size': 128,
    'num_hidden_layers': 3,
    'num_attention_heads': 4,
    'num_key_value_heads': 2,
    'tie_word_embeddings': False,
    'dtype': 'bfloat16',
}


def test_a_config_as_a_dict_a_file_a_directory_or_a_transformers_config(tmp_path):
    transformers = pytest.importorskip('transformers')
    (tmp_path / 'config.json').write_text(json.dumps(LLAMA))
    forms = [LLAMA, tmp_path, tmp_path / 'config.json', str(tmp_path)]
    forms.append(transformers.LlamaConfig(**{k: v for k, v in LLAMA.items() if k != 'model_type'}))
    for form in forms:
        p = osurg.huggingface.preset(form)
        assert p.family == 'llama' and p.layers == 'unrolled', form
        assert p.target['layers_2']['self_attn']['v_proj']['kernel'].shape == (64, 32)
        assert p.target['lm_head']['kernel'].shape == (64, 256)


def test_the_target_takes_the_config_dtype_unless_told_and_stacks_layers():
    p = osurg.huggingface.preset(LLAMA, layers='stacked')
    leaf = p.target['layers']['mlp']['down_proj']['kernel']
    assert leaf.shape == (3, 128, 64) and leaf.dtype == np.dtype('bfloat16')
    assert sorted(p.target) == ['embed_tokens', 'layers', 'lm_head', 'norm']
    assert (
        osurg.huggingface.preset(LLAMA, dtype='float32').target['norm']['scale'].dtype == np.float32
    )
    assert "Preset('llama', model_type='llama', to='flax', layers='stacked'" in repr(p)


def test_head_dim_from_the_config_when_it_differs_from_hidden_over_heads():
    gemma = {**LLAMA, 'model_type': 'gemma', 'head_dim': 32, 'tie_word_embeddings': True}
    p = osurg.huggingface.preset(gemma)
    assert p.target['layers_0']['self_attn']['q_proj']['kernel'].shape == (64, 4 * 32)
    assert p.target['layers_0']['self_attn']['o_proj']['kernel'].shape == (4 * 32, 64)
    # Tied: the import copies the embedding into lm_head; the export drops it again.
    assert any(isinstance(getattr(r, 'rule', r), osurg.Copy) for r in p.import_rules)
    assert osurg.Drop('lm_head/kernel') in p.export_rules


def test_a_tied_checkpoint_that_stores_its_head_too_keeps_the_stored_head():
    p = osurg.huggingface.preset({**LLAMA, 'tie_word_embeddings': True, 'dtype': 'float32'})
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), p.target)
    hf = osurg.apply_rules(params, None, p.export_rules)  # Tied: no head stored.
    assert 'lm_head' not in hf
    tied = osurg.apply_rules(hf, p.target, p.import_rules)
    np.testing.assert_array_equal(tied['lm_head']['kernel'], params['embed_tokens']['embedding'].T)
    head = rng.standard_normal((256, 64)).astype(np.float32)
    stored = osurg.apply_rules({**hf, 'lm_head': {'weight': head}}, p.target, p.import_rules)
    np.testing.assert_array_equal(stored['lm_head']['kernel'], head.T)


def test_an_unknown_model_type_lists_the_known_ones_and_how_to_write_rules():
    with pytest.raises(osurg.RuleError) as info:
        osurg.huggingface.preset({**LLAMA, 'model_type': 'lama'})
    message = str(info.value)
    assert "No preset for model_type 'lama'; presets know gemma, gemma2, gemma3_text" in message
    assert "Did you mean 'llama'?" in message and "from_pytorch(drop_prefix='model')" in message


def test_missing_sizes_and_files_name_what_is_missing(tmp_path):
    with pytest.raises(osurg.SurgeryError, match="none of 'hidden_size'"):
        osurg.huggingface.preset({k: v for k, v in LLAMA.items() if k != 'hidden_size'})
    with pytest.raises(osurg.SurgeryError, match=f'No config.json at {tmp_path}/config.json'):
        osurg.huggingface.preset(tmp_path)
    (tmp_path / 'config.json').write_text('{"model_type": ')
    with pytest.raises(osurg.SurgeryError, match='is not valid JSON'):
        osurg.huggingface.preset(tmp_path)
    with pytest.raises(osurg.RuleError, match="layers='scanned'"):
        osurg.huggingface.preset(LLAMA, layers='scanned')


def test_preset_auto_in_a_rules_file(tmp_path):
    (tmp_path / 'model').mkdir()
    (tmp_path / 'model' / 'config.json').write_text(json.dumps(LLAMA))
    (tmp_path / 'rules.toml').write_text(
        "[[rules]]\ndrop = 'extra/.*'\n[[rules]]\npreset = 'auto'\nlayers = 'stacked'\n"
        "config = 'model'\ndirection = 'export'\n"
    )
    loaded = load_rules_file(tmp_path / 'rules.toml')
    assert loaded.rules[1] == ConfigPreset('stacked', str(tmp_path / 'model'), 'export')
    _, rules = loaded.compose(source=None, target=None)
    want = osurg.huggingface.preset(LLAMA, layers='stacked').export_rules
    assert rules == (osurg.Drop('extra/.*'), *want)
    assert loaded.target_for(None) is None  # An export takes its target from the rules.
    assert loaded.export_config(None)['model_type'] == 'llama'
    (tmp_path / 'maxtext.toml').write_text(
        "[[rules]]\npreset = 'auto'\nlayers = 'stacked'\nconfig = 'model'\nto = 'maxtext'\n"
    )
    maxtext = load_rules_file(tmp_path / 'maxtext.toml')
    want = osurg.huggingface.preset(LLAMA, layers='stacked', to='maxtext')
    got_rules = maxtext.compose(source=None, target=None)[1]
    assert list(map(repr, got_rules)) == list(map(repr, want.import_rules))
    got = maxtext.target_for(None)['params']['params']['decoder']['layers']
    assert got['self_attention']['query']['kernel'].shape == (64, 3, 4, 16)  # (E, L, H, D)


@pytest.mark.parametrize(
    ('entry', 'message'),
    [
        ("preset = 'auto'\nlayer = 'stacked'", "unknown option 'layer'; it takes layers, config"),
        ("preset = 'auto'\nlayers = 2", 'layers must be a string, not 2'),
        ("preset = 'auto'\ndirection = 'both'", "direction is 'import' or 'export', not 'both'"),
        ("preset = 'auto'\nto = 'levanter'", "to is 'flax' or 'maxtext', not 'levanter'"),
        ("preset = 'autp'", "the presets are auto, from_pytorch, to_pytorch. Did you mean 'auto'"),
    ],
)
def test_preset_auto_errors(tmp_path, entry, message):
    (tmp_path / 'rules.toml').write_text(f'[[rules]]\n{entry}\n')
    with pytest.raises(osurg.RuleError) as info:
        load_rules_file(tmp_path / 'rules.toml')
    assert message in str(info.value)


def test_preset_auto_without_a_config_beside_the_source_says_how_to_give_one(tmp_path):
    (tmp_path / 'rules.toml').write_text("[[rules]]\npreset = 'auto'\n")
    loaded = load_rules_file(tmp_path / 'rules.toml')
    with pytest.raises(osurg.RuleError, match='give it: config = "path/to/config.json"'):
        loaded.compose(source=object(), target=None)
