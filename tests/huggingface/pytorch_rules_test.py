"""PyTorch <-> Flax conventions (what Hugging Face's converter does) as rules, on numpy trees."""

import re

import numpy as np
import pytest

import orbax_surgery as osurg
from orbax_surgery.keys import flatten, nest
from orbax_surgery.sources.safetensors import key_to_name, name_to_key


def torch_tree(named):
    """A PyTorch state dict (`{'a.b.weight': array}`) as the nested tree a source holds."""
    return nest({name_to_key(k): v for k, v in named.items()})


def torch_names(tree):
    return {key_to_name(k): v for k, v in flatten(tree)[0].items()}


def flax_flat(tree):
    return flatten(tree)[0]


def targets(*keys):
    """A target tree whose leaves take shape and dtype from the rules."""
    return nest(dict.fromkeys(keys, ...))


def arange(*shape):
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def test_linear_weight_becomes_kernel_transposed():
    w, b = arange(3, 2), arange(3) + 100
    ckpt = torch_tree({'dense.weight': w, 'dense.bias': b})

    out = osurg.apply_rules(ckpt, targets('dense/kernel', 'dense/bias'), [osurg.FromPyTorch()])

    np.testing.assert_array_equal(out['dense']['kernel'], w.T)
    np.testing.assert_array_equal(out['dense']['bias'], b)


@pytest.mark.parametrize(
    'weight_shape, axes',
    [
        ((4, 3, 5), (2, 1, 0)),  # Conv1d (O, I, K) -> (K, I, O)
        ((4, 3, 5, 2), (2, 3, 1, 0)),  # Conv2d (O, I, kH, kW) -> (kH, kW, I, O), as HF
        ((4, 3, 2, 5, 2), (2, 3, 4, 1, 0)),  # Conv3d
    ],
    ids=['conv1d', 'conv2d', 'conv3d'],
)
def test_conv_weight_becomes_window_first_kernel(weight_shape, axes):
    w = arange(*weight_shape)

    out = osurg.apply_rules(
        torch_tree({'conv.weight': w}), targets('conv/kernel'), [osurg.FromPyTorch()]
    )

    np.testing.assert_array_equal(out['conv']['kernel'], np.transpose(w, axes))


@pytest.mark.parametrize(
    'names',
    [('weight', 'bias'), ('gamma', 'beta')],
    ids=['layernorm', 'old-gamma-beta'],
)
def test_norm_weight_becomes_scale(names):
    scale, bias = arange(4), arange(4) + 10
    ckpt = torch_tree({f'ln.{names[0]}': scale, f'ln.{names[1]}': bias})

    out = osurg.apply_rules(ckpt, targets('ln/scale', 'ln/bias'), [osurg.FromPyTorch()])

    np.testing.assert_array_equal(out['ln']['scale'], scale)
    np.testing.assert_array_equal(out['ln']['bias'], bias)


def test_old_gamma_fills_a_flax_weight():
    gamma = arange(4)
    out = osurg.apply_rules(
        torch_tree({'ln.gamma': gamma}), targets('ln/weight'), [osurg.FromPyTorch()]
    )
    np.testing.assert_array_equal(out['ln']['weight'], gamma)


def test_embedding_weight_is_taken_as_is():
    table = arange(10, 4)
    out = osurg.apply_rules(
        torch_tree({'wte.weight': table}), targets('wte/embedding'), [osurg.FromPyTorch()]
    )
    np.testing.assert_array_equal(out['wte']['embedding'], table)


BATCH_NORM = {
    'bn.weight': arange(3),
    'bn.bias': arange(3) + 1,
    'bn.running_mean': arange(3) + 2,
    'bn.running_var': arange(3) + 3,
    'bn.num_batches_tracked': np.array(7, np.int64),
}


@pytest.mark.parametrize('prefix', [None, 'params'], ids=['flat', 'params-collection'])
def test_batch_norm_stats_go_to_batch_stats_and_the_counter_is_dropped(prefix):
    params = {'scale': ..., 'bias': ...}
    target = {'bn': params} if prefix is None else {prefix: {'bn': params}}
    target['batch_stats'] = {'bn': {'mean': ..., 'var': ...}}
    rules = osurg.from_pytorch(add_prefix=prefix, layers=None)

    plan = osurg.resolve(osurg.TreeSource(torch_tree(BATCH_NORM)).arrays, target, rules)
    out = osurg.apply_rules(torch_tree(BATCH_NORM), target, rules)

    assert plan.errors == () and plan.unused == ()
    assert [k for k, _ in plan.dropped] == ['bn/num_batches_tracked']  # as HF removes it
    got = out['bn'] if prefix is None else out[prefix]['bn']
    np.testing.assert_array_equal(got['scale'], BATCH_NORM['bn.weight'])
    np.testing.assert_array_equal(got['bias'], BATCH_NORM['bn.bias'])
    np.testing.assert_array_equal(out['batch_stats']['bn']['mean'], BATCH_NORM['bn.running_mean'])
    np.testing.assert_array_equal(out['batch_stats']['bn']['var'], BATCH_NORM['bn.running_var'])


@pytest.mark.parametrize(
    'g_name, v_name',
    [
        ('weight_g', 'weight_v'),
        ('parametrizations.weight.original0', 'parametrizations.weight.original1'),
    ],
    ids=['old-weight_norm', 'new-parametrizations'],
)
def test_weight_norm_both_namings(g_name, v_name):
    g, v = arange(4, 1, 1), arange(4, 2, 3)
    ckpt = torch_tree({f'conv.{g_name}': g, f'conv.{v_name}': v, 'conv.bias': arange(4)})

    out = osurg.apply_rules(
        ckpt, targets('conv/weight_g', 'conv/weight_v', 'conv/bias'), [osurg.FromPyTorch()]
    )

    np.testing.assert_array_equal(out['conv']['weight_g'], g)
    np.testing.assert_array_equal(out['conv']['weight_v'], v)


def test_base_model_prefix_dropped_and_head_kept():
    ckpt = torch_tree({'model.norm.weight': arange(2), 'lm_head.weight': arange(5, 2)})

    out = osurg.apply_rules(
        ckpt, targets('norm/scale', 'lm_head/kernel'), osurg.from_pytorch(drop_prefix='model')
    )

    np.testing.assert_array_equal(out['norm']['scale'], arange(2))
    np.testing.assert_array_equal(out['lm_head']['kernel'], arange(5, 2).T)


def test_prefix_added_for_a_base_model_checkpoint():
    """A base-model checkpoint (no 'model.') into a model whose params sit under 'model'."""
    ckpt = torch_tree({'embed_tokens.weight': arange(5, 2), 'norm.weight': arange(2)})

    out = osurg.apply_rules(
        ckpt,
        targets('model/embed_tokens/embedding', 'model/norm/scale'),
        osurg.from_pytorch(add_prefix='model'),
    )

    np.testing.assert_array_equal(out['model']['embed_tokens']['embedding'], arange(5, 2))
    np.testing.assert_array_equal(out['model']['norm']['scale'], arange(2))


def test_module_lists_unrolled_to_underscore_names():
    ckpt = torch_tree(
        {
            'encoder.layer.0.dense.weight': arange(3, 2),
            'encoder.layer.1.dense.weight': arange(3, 2) + 6,
            'encoder.layer.1.experts.2.weight': arange(2, 2),
        }
    )
    target = targets(
        'encoder/layer_0/dense/kernel',
        'encoder/layer_1/dense/kernel',
        'encoder/layer_1/experts_2/kernel',
    )

    out = osurg.apply_rules(ckpt, target, osurg.from_pytorch())

    np.testing.assert_array_equal(
        out['encoder']['layer_1']['dense']['kernel'], (arange(3, 2) + 6).T
    )
    np.testing.assert_array_equal(out['encoder']['layer_1']['experts_2']['kernel'], arange(2, 2).T)


def test_module_lists_stacked_convert_each_layer():
    """A stack of Linear weights is (L, in, out), not a conv kernel; convs stack too."""
    n = 3
    named = {}
    for i in range(n):
        named[f'model.layers.{i}.q_proj.weight'] = arange(5, 4) + 100 * i
        named[f'model.layers.{i}.norm.weight'] = arange(4) + 100 * i
        named[f'model.layers.{i}.conv.weight'] = arange(6, 4, 3) + 100 * i
    named['model.embed.weight'] = arange(7, 4)
    target = targets('layers/q_proj/kernel', 'layers/norm/scale', 'layers/conv/kernel')
    target['embed'] = {'embedding': ...}
    rules = osurg.from_pytorch(drop_prefix='model', layers='stacked')

    plan = osurg.resolve(osurg.TreeSource(torch_tree(named)).arrays, target, rules)
    out = osurg.apply_rules(torch_tree(named), target, rules)

    assert plan.errors == () and plan.not_lazy == ()
    want_q = np.stack([named[f'model.layers.{i}.q_proj.weight'].T for i in range(n)])
    want_conv = np.stack(
        [np.transpose(named[f'model.layers.{i}.conv.weight'], (2, 1, 0)) for i in range(n)]
    )
    np.testing.assert_array_equal(out['layers']['q_proj']['kernel'], want_q)  # (3, 4, 5)
    np.testing.assert_array_equal(out['layers']['conv']['kernel'], want_conv)  # (3, 3, 4, 6)
    np.testing.assert_array_equal(
        out['layers']['norm']['scale'],
        np.stack([named[f'model.layers.{i}.norm.weight'] for i in range(n)]),
    )
    np.testing.assert_array_equal(out['embed']['embedding'], named['model.embed.weight'])


GPT2_LIKE = {
    'transformer.h.0.attn.c_attn.weight': arange(4, 12),  # Conv1D: (in, out)
    'transformer.h.1.attn.c_attn.weight': arange(4, 12) + 50,
    'transformer.h.0.attn.out.weight': arange(4, 4),  # nn.Linear: (out, in)
    'transformer.h.1.attn.out.weight': arange(4, 4) + 50,
}


@pytest.mark.parametrize('layers', ['unrolled', 'stacked'])
def test_fan_in_fan_out_weights_are_not_transposed(layers):
    if layers == 'unrolled':
        target = targets(*(f'h_{i}/attn/{m}/kernel' for i in (0, 1) for m in ('c_attn', 'out')))
    else:
        target = targets('h/attn/c_attn/kernel', 'h/attn/out/kernel')
    rules = osurg.from_pytorch(
        drop_prefix='transformer', layers=layers, fan_in_fan_out=r'.*/c_attn/weight'
    )

    out = flax_flat(osurg.apply_rules(torch_tree(GPT2_LIKE), target, rules))

    conv1d = [GPT2_LIKE[f'transformer.h.{i}.attn.c_attn.weight'] for i in (0, 1)]
    linear = [GPT2_LIKE[f'transformer.h.{i}.attn.out.weight'].T for i in (0, 1)]
    if layers == 'unrolled':
        np.testing.assert_array_equal(out['h_1/attn/c_attn/kernel'], conv1d[1])
        np.testing.assert_array_equal(out['h_1/attn/out/kernel'], linear[1])
    else:
        np.testing.assert_array_equal(out['h/attn/c_attn/kernel'], np.stack(conv1d))
        np.testing.assert_array_equal(out['h/attn/out/kernel'], np.stack(linear))


# Every convention at once, with module lists: PyTorch names -> Flax -> PyTorch names.
ROUND_TRIP = {
    'model.embed.weight': arange(9, 4),
    'model.norm.weight': arange(4) + 1,
    'lm_head.weight': arange(9, 4) + 2,
    **{
        f'model.layers.{i}.{name}': value + 1000 * i
        for i in range(2)
        for name, value in {
            'proj.weight': arange(6, 4),
            'proj.bias': arange(6),
            'conv.weight': arange(5, 4, 3, 2),
            'conv.parametrizations.weight.original0': arange(5, 1, 1, 1),
            'conv.parametrizations.weight.original1': arange(5, 4, 3, 2) + 3,
            'bn.weight': arange(5),
            'bn.bias': arange(5) + 1,
            'bn.running_mean': arange(5) + 2,
            'bn.running_var': arange(5) + 3,
            'ln.weight': arange(4) + 4,
            'ln.bias': arange(4) + 5,
        }.items()
    },
}


def round_trip_target(layers):
    params = ['embed/embedding', 'norm/scale', 'lm_head/kernel']
    per_layer = [
        'proj/kernel',
        'proj/bias',
        'conv/kernel',
        'conv/weight_g',
        'conv/weight_v',
        'bn/scale',
        'bn/bias',
        'ln/scale',
        'ln/bias',
    ]
    stats = ['bn/mean', 'bn/var']
    if layers == 'unrolled':
        params += [f'layers_{i}/{k}' for i in range(2) for k in per_layer]
        stats = [f'layers_{i}/{k}' for i in range(2) for k in stats]
    else:
        params += [f'layers/{k}' for k in per_layer]
        stats = [f'layers/{k}' for k in stats]
    return targets(*(f'params/{k}' for k in params), *(f'batch_stats/{k}' for k in stats))


@pytest.mark.parametrize('layers', ['unrolled', 'stacked'])
def test_to_pytorch_inverts_from_pytorch(layers):
    ckpt = torch_tree(ROUND_TRIP)
    flax = osurg.apply_rules(
        ckpt,
        round_trip_target(layers),
        osurg.from_pytorch(drop_prefix='model', add_prefix='params', layers=layers),
    )
    if layers == 'stacked':
        assert flax['params']['layers']['proj']['kernel'].shape == (2, 4, 6)
        assert flax['batch_stats']['layers']['bn']['mean'].shape == (2, 5)
    else:
        np.testing.assert_array_equal(
            flax['params']['layers_1']['proj']['kernel'], ROUND_TRIP['model.layers.1.proj.weight'].T
        )

    back = osurg.apply_rules(
        flax,
        None,
        [
            *osurg.to_pytorch(drop_prefix='params', add_prefix='model', layers=layers),
        ],
    )

    got = torch_names(back)
    assert sorted(got) == sorted(ROUND_TRIP)
    for name, value in ROUND_TRIP.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_to_pytorch_keeps_old_weight_norm_names_the_target_has():
    flax = {'conv': {'weight_g': arange(2, 1), 'weight_v': arange(2, 3)}}
    old = targets('model/conv/weight_g', 'model/conv/weight_v')

    kept = osurg.apply_rules(flax, old, osurg.to_pytorch(layers=None, add_prefix='model'))
    new = osurg.apply_rules(flax, None, osurg.to_pytorch(layers=None))

    assert sorted(flax_flat(kept)) == ['model/conv/weight_g', 'model/conv/weight_v']
    assert sorted(torch_names(new)) == [
        'conv.parametrizations.weight.original0',
        'conv.parametrizations.weight.original1',
    ]


def test_to_pytorch_fan_in_fan_out_kept_in_out():
    flax = {'h_0': {'attn': {'c_attn': {'kernel': arange(4, 12)}}}}
    out = torch_names(
        osurg.apply_rules(flax, None, osurg.to_pytorch(fan_in_fan_out=r'.*/c_attn/weight'))
    )
    np.testing.assert_array_equal(out['h.0.attn.c_attn.weight'], arange(4, 12))


def test_earlier_rules_win_tied_head_from_the_embedding():
    """A tied lm_head: copy the embedding to the PyTorch name the converter then transposes."""
    table = arange(9, 4)
    rules = [
        osurg.Copy('model/embed/weight', 'lm_head/weight'),
        *osurg.from_pytorch(drop_prefix='model'),
    ]

    out = osurg.apply_rules(
        torch_tree({'model.embed.weight': table}),
        targets('embed/embedding', 'lm_head/kernel'),
        rules,
    )

    np.testing.assert_array_equal(out['embed']['embedding'], table)
    np.testing.assert_array_equal(out['lm_head']['kernel'], table.T)


def test_missing_and_unexpected_keys_are_reported_like_hugging_face():
    ckpt = torch_tree({'dense.weight': arange(3, 2), 'extra.weight': arange(2)})
    source = osurg.TreeSource(ckpt).arrays

    plan = osurg.resolve(source, targets('dense/kernel', 'dense/bias'), osurg.from_pytorch())

    assert plan.missing == ('dense/bias',)
    assert [k for k, _ in plan.unused] == ['extra/weight']
    assert sorted(type(e).__name__ for e in plan.errors) == ['UnmatchedKeyError', 'UnusedKeyError']


def test_a_kernel_from_a_vector_names_the_key():
    with pytest.raises(osurg.ShapeMismatchError, match=re.escape("'ln/weight' has shape (4,)")):
        osurg.apply_rules(
            torch_tree({'ln.weight': arange(4)}), targets('ln/kernel'), [osurg.FromPyTorch()]
        )


def test_bad_arguments_fail_when_the_rules_are_built():
    with pytest.raises(osurg.RuleError, match="layers='scan'"):
        osurg.from_pytorch(layers='scan')
    with pytest.raises(osurg.RuleError, match="layers='scan'"):
        osurg.to_pytorch(layers='scan')
    with pytest.raises(osurg.RuleError, match='not a valid regex'):
        osurg.FromPyTorch(fan_in_fan_out='c_attn(')
    with pytest.raises(osurg.RuleError, match='not a valid regex'):
        osurg.ToPyTorch(fan_in_fan_out='c_attn(')


def test_module_lists_back_only_for_named_lists():
    flax = {'layers_0': {'Dense_0': {'kernel': arange(2, 3)}}}
    out = torch_names(
        osurg.apply_rules(flax, None, [osurg.ModuleLists(to_flax=False, names='layers')])
    )
    assert list(out) == ['layers.0.Dense_0.kernel']


def test_a_target_keeping_module_lists_asks_for_layers_none():
    # Hugging Face's own Flax models keep `model/layers/0/...`.
    ckpt = {'model': {'layers': {'0': {'q_proj': {'weight': np.ones((4, 2))}}}}}
    target = {'model': {'layers': {'0': {'q_proj': {'kernel': ...}}}}}
    plan = osurg.resolve(osurg.TreeSource(ckpt).arrays, target, osurg.from_pytorch())
    assert len(plan.errors) == 1
    assert 'the target keeps them as lists' in str(plan.errors[0])
    assert 'Pass layers=None to from_pytorch' in str(plan.errors[0])
    out = osurg.apply_rules(ckpt, target, osurg.from_pytorch(layers=None))
    assert out['model']['layers']['0']['q_proj']['kernel'].shape == (2, 4)


ORDER_CKPT = {
    'model.layers.0.self_attn.q_proj.weight': np.arange(8.0).reshape(4, 2),
    'model.layers.1.self_attn.q_proj.weight': np.arange(8.0).reshape(4, 2) + 8,
    'model.norm.weight': np.ones(2),
}
ORDER_TARGET = targets('layers_0/attn/query/kernel', 'layers_1/attn/query/kernel', 'norm/scale')


@pytest.mark.parametrize('before', [True, False], ids=['rename_first', 'preset_first'])
def test_a_rename_works_before_or_after_the_preset(before):
    rename = osurg.Rename(r'(.*)/self_attn/q_proj/(.*)', r'\1/attn/query/\2')
    preset = osurg.from_pytorch(drop_prefix='model')
    rules = [rename, *preset] if before else [*preset, rename]
    out = osurg.apply_rules(torch_tree(ORDER_CKPT), ORDER_TARGET, rules)
    for i in range(2):
        want = ORDER_CKPT[f'model.layers.{i}.self_attn.q_proj.weight'].T
        np.testing.assert_array_equal(out[f'layers_{i}']['attn']['query']['kernel'], want)
    np.testing.assert_array_equal(out['norm']['scale'], np.ones(2))


def test_a_rule_after_the_preset_written_for_raw_names_says_where_to_move_it():
    rename = osurg.Rename(r'model/layers/(\d+)/self_attn/q_proj/(.*)', r'layers_\1/attn/query/\2')
    plan = osurg.resolve(
        osurg.TreeSource(torch_tree(ORDER_CKPT)).arrays,
        ORDER_TARGET,
        [*osurg.from_pytorch(drop_prefix='model'), rename],
    )
    message = str(plan.errors[0])
    assert isinstance(plan.errors[0], osurg.UnmatchedKeyError)
    assert "It matches 'model/layers/0/self_attn/q_proj/weight'" in message
    assert "before rules[0] from_pytorch(drop_prefix='model') changed them" in message
    assert 'put rules[3] before rules[0]' in message
