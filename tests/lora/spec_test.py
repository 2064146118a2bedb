"""LoraSpec.bind: which weights get adapters, their shapes and scales, and bad specs."""

import math

import jax
import numpy as np
import pytest

from orbax_surgery import LoraMismatchError, LoraSpec, LoraTarget, RuleError, UnmatchedKeyError
from orbax_surgery.errors import ShapeMismatchError

PARAMS = {
    'attn': {
        'query': {'kernel': np.zeros((16, 4, 8), np.float32), 'bias': np.zeros((4, 8), np.float32)},
        'out': {'kernel': np.zeros((4, 8, 16), np.float32)},
    },
    'mlp': {'kernel': np.zeros((16, 32), np.float32), 'bias': np.zeros(32, np.float32)},
    'norm': {'scale': np.zeros(16, np.float32)},
    'embed': {'embedding': np.zeros((100, 16), np.float32)},
    'head': {'kernel': np.zeros((16, 10), np.float32)},
}


def by_key(layout):
    return {a.key: a for a in layout.adapters}


def test_first_matching_target_decides_rank_alpha_and_axes():
    spec = LoraSpec(
        [LoraTarget('attn/out/kernel', rank=2, alpha=8, in_axes=2), r'.*/kernel'],
        rank=4,
        alpha=2,
    )
    adapters = by_key(spec.bind(PARAMS))
    assert sorted(adapters) == ['attn/out/kernel', 'attn/query/kernel', 'head/kernel', 'mlp/kernel']
    out = adapters['attn/out/kernel']
    assert (out.rank, out.scale, out.a_shape, out.b_shape) == (2, 4.0, (4, 8, 2), (2, 16))
    query = adapters['attn/query/kernel']
    assert (query.rank, query.scale, query.a_shape, query.b_shape) == (4, 0.5, (16, 4), (4, 4, 8))
    assert (query.a_key, query.b_key) == ('attn/query/kernel_lora_a', 'attn/query/kernel_lora_b')


def test_alpha_defaults_to_rank_and_rslora_divides_by_sqrt_rank():
    plain = LoraSpec([r'mlp/kernel'], rank=4).bind(PARAMS).adapters[0]
    rs = LoraSpec([r'mlp/kernel'], rank=4, alpha=8, rslora=True).bind(PARAMS).adapters[0]
    assert plain.scale == 1.0
    assert rs.scale == pytest.approx(8 / math.sqrt(4))


def test_a_function_of_path_and_shape_chooses_targets():
    def big_matrices(key, shape):
        if len(shape) == 2 and shape[0] * shape[1] >= 512:
            return LoraTarget(rank=2) if key.startswith('embed') else True
        return None

    adapters = by_key(LoraSpec(big_matrices, rank=3).bind(PARAMS))
    assert sorted(adapters) == ['embed/embedding', 'mlp/kernel']
    assert adapters['embed/embedding'].rank == 2
    assert adapters['mlp/kernel'].rank == 3


def test_trained_params_by_pattern_and_vectors():
    layout = LoraSpec([r'mlp/kernel'], rank=2, train=[r'head/.*']).bind(PARAMS)
    assert list(layout.trained) == ['head/kernel']
    layout = LoraSpec([r'mlp/kernel'], rank=2, train_vectors=True).bind(PARAMS)
    assert sorted(layout.trained) == ['mlp/bias', 'norm/scale']
    assert layout.trained['mlp/bias'] == ((32,), np.dtype(np.float32))


def test_stacked_kernels_get_one_adapter_per_layer():
    params = {'layers': {'mlp': {'kernel': jax.ShapeDtypeStruct((6, 16, 32), np.float32)}}}
    adapter = LoraSpec([LoraTarget(r'layers/.*', batch_axes=1)], rank=4).bind(params).adapters[0]
    assert (adapter.a_shape, adapter.b_shape) == ((6, 16, 4), (6, 4, 32))


def test_nnx_naming_and_state_keys_with_value_suffix():
    from flax import nnx

    model = nnx.LoRALinear(8, 6, lora_rank=2, rngs=nnx.Rngs(0))
    layout = LoraSpec(['kernel'], rank=2, naming='nnx').bind(nnx.state(model))
    adapter = layout.adapters[0]
    assert (adapter.key, adapter.a_key, adapter.b_key) == ('kernel', 'lora/lora_a', 'lora/lora_b')
    # The adapters the model already holds are not targets themselves.
    assert len(layout.adapters) == 1


def test_existing_adapters_of_another_rank_are_named():
    from flax import nnx

    model = nnx.LoRALinear(8, 6, lora_rank=2, rngs=nnx.Rngs(0))
    with pytest.raises(LoraMismatchError, match=r"'lora/lora_a'.*\(8, 2\).*\(8, 4\).*rank 2"):
        LoraSpec(['kernel'], rank=4, naming='nnx').bind(nnx.state(model))


def test_custom_naming_templates():
    spec = LoraSpec([r'mlp/kernel'], rank=2, naming=('adapters/{module}/A', 'adapters/{module}/B'))
    adapter = spec.bind(PARAMS).adapters[0]
    assert (adapter.a_key, adapter.b_key) == ('adapters/mlp/A', 'adapters/mlp/B')


def test_pattern_that_matches_nothing_names_close_keys():
    with pytest.raises(UnmatchedKeyError, match=r"'mlp/kernal'.*Did you mean 'mlp/kernel'"):
        LoraSpec(['mlp/kernel', 'mlp/kernal'], rank=2).bind(PARAMS)


def test_pattern_shadowed_by_an_earlier_one_is_an_error():
    with pytest.raises(UnmatchedKeyError, match=r"'mlp/kernel' adapts nothing.*earlier target"):
        LoraSpec([r'.*/kernel', 'mlp/kernel'], rank=2).bind(PARAMS)


def test_spec_matching_no_parameter_at_all():
    with pytest.raises(UnmatchedKeyError, match='adapts nothing'):
        LoraSpec([r'decoder/.*'], rank=2).bind(PARAMS)


def test_rank_larger_than_the_matrix_names_key_and_shape():
    with pytest.raises(RuleError, match=r"rank 20 for 'head/kernel'.*\(16, 10\).*rank <= 10"):
        LoraSpec([r'head/kernel'], rank=20).bind(PARAMS)


def test_a_vector_matched_as_target_says_how_to_narrow():
    with pytest.raises(ShapeMismatchError, match=r"'mlp/bias' has shape \(32,\).*'\.\*/kernel'"):
        LoraSpec([r'mlp/.*'], rank=2).bind(PARAMS)


def test_bad_settings_fail_when_built():
    with pytest.raises(RuleError, match='rank must be a positive int'):
        LoraSpec(['x'], rank=0)
    with pytest.raises(RuleError, match='not a valid regex'):
        LoraSpec(['(unclosed'])
    with pytest.raises(RuleError, match='naming'):
        LoraSpec(['x'], naming='peft')
    with pytest.raises(RuleError, match='at least one target'):
        LoraSpec([])
    with pytest.raises(RuleError, match='in_axes'):
        LoraTarget('x', in_axes=0)


def test_integer_weights_cannot_take_adapters():
    params = {'q': {'kernel': np.zeros((8, 8), np.int8)}}
    with pytest.raises(RuleError, match="'q/kernel' has dtype int8"):
        LoraSpec([r'q/kernel'], rank=2).bind(params)


def test_spec_json_records_its_settings():
    spec = LoraSpec([LoraTarget('a', rank=2)], rank=4, alpha=8.0, rslora=True, train=['h/.*'])
    record = spec.to_json()
    assert record['targets'][0] == {
        'pattern': 'a',
        'rank': 2,
        'alpha': None,
        'in_axes': 1,
        'batch_axes': 0,
    }
    assert (record['rank'], record['alpha'], record['rslora'], record['train']) == (
        4,
        8.0,
        True,
        ['h/.*'],
    )


def test_an_alpha_of_zero_is_a_scale_of_zero_not_the_default():
    # `alpha or rank` took alpha=0.0 for "unset", merging with scale 1.
    params = {'w': np.ones((2, 3), np.float32)}
    assert LoraSpec(['w'], rank=1, alpha=0.0).bind(params).adapters[0].scale == 0.0
    assert LoraSpec(['w'], rank=1).bind(params).adapters[0].scale == 1.0


def test_a_catastrophic_target_pattern_is_a_rule_error_not_a_hang(monkeypatch):
    monkeypatch.setattr('orbax_surgery.keys.MATCH_TIMEOUT', 0.05)
    spec = LoraSpec([r'(a|aa)+$'], rank=1)
    with pytest.raises(RuleError, match='took over'):
        spec.bind({'a' * 40 + 'b': np.ones((4, 4), np.float32)})
