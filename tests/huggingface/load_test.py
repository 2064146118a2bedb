"""`osurg.huggingface.load`: a model directory to placed params in one call."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import save_file

import orbax_surgery as osurg

CONFIG = {
    'model_type': 'llama',
    'vocab_size': 64,
    'hidden_size': 32,
    'intermediate_size': 64,
    'num_hidden_layers': 2,
    'num_attention_heads': 4,
    'num_key_value_heads': 2,
    'tie_word_embeddings': False,
    'dtype': 'float32',
}


@pytest.fixture
def model_dir(tmp_path):
    """A Llama checkpoint whose tensors hold their element indices plus an offset per name."""
    p = osurg.huggingface.preset(CONFIG)
    exported = osurg.apply_rules(
        jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), p.target), None, p.export_rules
    )
    flat = {}
    for i, (name, leaf) in enumerate(sorted(_named(exported).items())):
        flat[name] = (np.arange(leaf.size, dtype=np.float32) + 1000 * i).reshape(leaf.shape)
    save_file(flat, str(tmp_path / 'model.safetensors'))
    (tmp_path / 'config.json').write_text(json.dumps(CONFIG))
    return tmp_path, flat


def _named(tree):
    from orbax_surgery.keys import flatten
    from orbax_surgery.sources.safetensors import key_to_name

    return {key_to_name(k): np.asarray(v) for k, v in flatten(tree)[0].items()}


def test_load_equals_preset_then_restore_and_places_each_leaf(model_dir, mesh8):
    path, stored = model_dir

    def sharding(leaf_path, leaf):
        if leaf_path.endswith('kernel') and leaf.shape[-1] % 8 == 0:
            return NamedSharding(mesh8, PartitionSpec(*[None] * (len(leaf.shape) - 1), 'x'))
        return None  # The default device.

    params = osurg.huggingface.load(path, layers='stacked', sharding=sharding)
    up = params['layers']['mlp']['up_proj']['kernel']
    assert isinstance(up, jax.Array) and up.shape == (2, 32, 64)
    assert up.sharding.spec == PartitionSpec(None, None, 'x')
    assert params['norm']['scale'].sharding.is_fully_replicated
    want = np.stack([stored[f'model.layers.{i}.mlp.up_proj.weight'].T for i in range(2)])
    np.testing.assert_array_equal(np.asarray(up), want)
    p = osurg.huggingface.preset(path, layers='stacked')
    again = osurg.restore(path, p.target, p.import_rules)
    for got, ref in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_one_sharding_for_every_leaf_and_user_rules_after_the_preset(model_dir, mesh8):
    path, stored = model_dir
    replicated = NamedSharding(mesh8, PartitionSpec())
    params = osurg.huggingface.load(
        path, sharding=replicated, rules=[osurg.Cast('.*', np.float16)], dtype=np.float16
    )
    head = params['lm_head']['kernel']
    assert head.sharding == replicated and head.dtype == np.float16
    np.testing.assert_array_equal(np.asarray(head), stored['lm_head.weight'].T.astype(np.float16))


def test_a_sharding_that_does_not_divide_a_leaf_names_it(model_dir):
    path, _ = model_dir
    three = jax.sharding.Mesh(np.array(jax.devices()[:3]), ('x',))
    split_rows = NamedSharding(three, PartitionSpec('x'))
    with pytest.raises(osurg.RuleError, match=r"does not divide '.*' of shape \(\d+, \d+\)"):
        osurg.huggingface.load(path, sharding=split_rows)
