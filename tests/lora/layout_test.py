"""LoraLayout: adapter init, merge, split/join, the optimizer wrapper and shardings."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fixtures import random_array
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from orbax_surgery import LoraLayout, LoraMismatchError, LoraSpec, LoraTarget, UnmatchedKeyError
from orbax_surgery.keys import flatten

PARAMS = {
    'q': {'kernel': random_array((8, 2, 4), seed=1)},
    'o': {'kernel': random_array((2, 4, 8), seed=2), 'bias': random_array((8,), seed=3)},
    'layers': {'kernel': random_array((3, 8, 6), seed=4)},
}
SPEC = LoraSpec(
    [
        LoraTarget('o/kernel', in_axes=2, alpha=4),
        LoraTarget('layers/kernel', batch_axes=1, rank=3),
        'q/kernel',
    ],
    rank=2,
    train_vectors=True,
)
LAYOUT = SPEC.bind(PARAMS)


def trained_adapters(seed=0):
    """Adapters with B non-zero, as after some training steps."""
    trainable = LAYOUT.init(PARAMS, jax.random.key(seed))
    return jax.tree.map(lambda x: x + 0.5 * random_array(x.shape, seed=seed + x.size), trainable)


def reference_merge(w, a, b, scale, batch_axes, in_axes):
    """W + scale * A @ B with einsum over named axes, for any batch/in/out split."""
    letters = 'abcdefgh'
    batch, ins = letters[:batch_axes], letters[batch_axes : batch_axes + in_axes]
    outs = letters[batch_axes + in_axes : w.ndim]
    delta = np.einsum(f'{batch}{ins}r,{batch}r{outs}->{batch}{ins}{outs}', a, b)
    return w + scale * delta


def test_init_gives_small_random_a_and_zero_b_so_the_model_starts_unchanged():
    trainable = LAYOUT.init(PARAMS, jax.random.key(0), stddev=0.02)
    a = trainable['q']['kernel_lora_a']
    assert a.shape == (8, 2) and 0.005 < float(jnp.std(a)) < 0.05
    assert not np.any(trainable['layers']['kernel_lora_b'])
    np.testing.assert_array_equal(trainable['o']['bias'], PARAMS['o']['bias'])
    merged = LAYOUT.merge(PARAMS, trainable)
    jax.tree.map(np.testing.assert_array_equal, merged, PARAMS)


def test_init_gives_each_adapter_its_own_random_values():
    trainable = LAYOUT.init(PARAMS, jax.random.key(0))
    a1 = np.asarray(trainable['q']['kernel_lora_a']).ravel()[:6]
    a2 = np.asarray(trainable['o']['kernel_lora_a']).ravel()[:6]
    assert not np.allclose(a1, a2)


def test_merge_matches_an_einsum_reference_for_every_axis_layout():
    trainable = trained_adapters()
    merged = LAYOUT.merge(PARAMS, trainable)
    for adapter in LAYOUT.adapters:
        module = adapter.key.split('/')[0]
        want = reference_merge(
            PARAMS[module]['kernel'],
            np.asarray(trainable[module]['kernel_lora_a']),
            np.asarray(trainable[module]['kernel_lora_b']),
            adapter.scale,
            adapter.batch_axes,
            adapter.in_axes,
        )
        np.testing.assert_allclose(merged[module]['kernel'], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(merged['o']['bias'], trainable['o']['bias'])
    assert 'kernel_lora_a' not in merged['q']


def test_unmerge_gives_the_base_back():
    trainable = trained_adapters()
    base = LAYOUT.unmerge(LAYOUT.merge(PARAMS, trainable), trainable)
    for module in ('q', 'o', 'layers'):
        np.testing.assert_allclose(base[module]['kernel'], PARAMS[module]['kernel'], atol=1e-5)


def test_merge_keeps_bfloat16_weights_bfloat16():
    params = {'w': {'kernel': jnp.ones((4, 4), jnp.bfloat16)}}
    layout = LoraSpec(['w/kernel'], rank=1).bind(params)
    trainable = {'w': {'kernel_lora_a': jnp.ones((4, 1)), 'kernel_lora_b': jnp.full((1, 4), 0.5)}}
    merged = layout.merge(params, trainable)
    assert merged['w']['kernel'].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(merged['w']['kernel'], np.float32), 1.5)


def test_merge_is_differentiable_in_the_adapters():
    trainable = trained_adapters()

    def loss(t):
        return jnp.sum(LAYOUT.merge(PARAMS, t)['q']['kernel'] ** 2)

    grads = jax.grad(loss)(trainable)
    assert float(jnp.abs(grads['q']['kernel_lora_b']).sum()) > 0
    assert not np.any(grads['o']['kernel_lora_b'])  # 'o' does not enter this loss


def test_split_and_join_round_trip_a_joined_tree():
    trainable = trained_adapters()
    joined = LAYOUT.join(PARAMS, trainable)
    frozen, again = LAYOUT.split(joined)
    assert sorted(flatten(again)[0]) == sorted(LAYOUT.trainable_keys)
    assert 'bias' not in frozen['o']  # trained in full: only in the trainable tree
    jax.tree.map(np.testing.assert_array_equal, again, trainable)
    jax.tree.map(np.testing.assert_array_equal, LAYOUT.join(frozen, again), joined)


def test_split_names_a_missing_adapter():
    with pytest.raises(
        UnmatchedKeyError, match=r"'layers/kernel_lora_a' is not in the joined tree"
    ):
        LAYOUT.split(PARAMS)


def test_optimizer_leaves_frozen_weights_without_updates_or_state():
    joined = LAYOUT.join(PARAMS, trained_adapters())
    tx = LAYOUT.optimizer(optax.adam(0.1))
    state = tx.init(joined)
    grads = jax.tree.map(jnp.ones_like, joined)
    updates, _ = tx.update(grads, state, joined)
    flat_updates = flatten(updates)[0]
    for key, update in flat_updates.items():
        moved = bool(jnp.any(update != 0))
        assert moved == (key in LAYOUT.trainable_keys), key
    state_elements = sum(x.size for x in jax.tree.leaves(state) if hasattr(x, 'size'))
    trainable_elements = sum(np.prod(flat_updates[k].shape) for k in LAYOUT.trainable_keys)
    assert state_elements == 2 * trainable_elements + 1  # adam's mu and nu, and a count


def test_nnx_filter_selects_the_lora_params_of_a_model():
    from flax import nnx

    model = nnx.LoRALinear(8, 6, lora_rank=2, rngs=nnx.Rngs(0))
    layout = LoraSpec(['kernel'], rank=2, naming='nnx').bind(nnx.state(model))
    chosen = nnx.state(model, layout.nnx_filter)
    assert sorted(flatten(nnx.to_pure_dict(chosen))[0]) == ['lora/lora_a', 'lora/lora_b']


def test_abstract_trainable_shards_a_like_inputs_and_b_like_outputs(mesh2x4):
    base = {
        'q': {
            'kernel': jax.ShapeDtypeStruct(
                (8, 2, 4), np.float32, sharding=NamedSharding(mesh2x4, P('a', 'b'))
            )
        },
        'o': {
            'kernel': jax.ShapeDtypeStruct(
                (2, 4, 8), np.float32, sharding=NamedSharding(mesh2x4, P(None, 'b', 'a'))
            ),
            'bias': jax.ShapeDtypeStruct((8,), np.float32, sharding=NamedSharding(mesh2x4, P('a'))),
        },
        'layers': {
            'kernel': jax.ShapeDtypeStruct(
                (3, 8, 6), np.float32, sharding=NamedSharding(mesh2x4, P(None, 'a'))
            ),
        },
    }
    abstract = LAYOUT.abstract_trainable(base)
    specs = {k: (v.shape, v.sharding.spec) for k, v in flatten(abstract)[0].items()}
    assert specs == {
        'layers/kernel_lora_a': ((3, 8, 3), P(None, 'a', None)),
        'layers/kernel_lora_b': ((3, 3, 6), P(None, None, None)),
        'o/bias': ((8,), P('a')),
        'o/kernel_lora_a': ((2, 4, 2), P(None, 'b', None)),
        'o/kernel_lora_b': ((2, 8), P(None, 'a')),
        'q/kernel_lora_a': ((8, 2), P('a', None)),
        'q/kernel_lora_b': ((2, 2, 4), P(None, 'b', None)),
    }


def test_layout_survives_json():
    again = LoraLayout.from_json(LAYOUT.to_json())
    assert again == LAYOUT
    assert again.adapters == LAYOUT.adapters
    assert again.trained == LAYOUT.trained


def test_check_same_names_the_setting_that_differs():
    other = LoraSpec(
        [
            LoraTarget('o/kernel', in_axes=2, alpha=8),
            LoraTarget('layers/kernel', batch_axes=1, rank=3),
            'q/kernel',
        ],
        rank=2,
        train_vectors=True,
    ).bind(PARAMS)
    with pytest.raises(
        LoraMismatchError, match=r"'o/kernel'.*alpha=4.0 but the saved one has alpha=8.0"
    ):
        LAYOUT.check_same(other, 'the saved one')
    fewer = LoraSpec(['q/kernel'], rank=2, train_vectors=True).bind(PARAMS)
    with pytest.raises(
        LoraMismatchError, match=r"adapts 'layers/kernel', but there has no adapter"
    ):
        LAYOUT.check_same(fewer, 'there')


def test_str_lists_every_adapter():
    text = str(LAYOUT)
    assert 'layers/kernel (3, 8, 6): rank 3, scale 1, A (3, 8, 3), B (3, 3, 6)' in text
    assert 'o/bias (8,): trained in full' in text


def test_init_of_an_nnx_state_updates_the_models_lora_params():
    from flax import nnx

    model = nnx.LoRALinear(64, 32, lora_rank=4, rngs=nnx.Rngs(0))
    layout = LoraSpec(['kernel'], rank=4, naming='nnx').bind(nnx.state(model))
    nnx.update(model, layout.init(nnx.state(model), jax.random.key(1), stddev=0.1))
    assert 0.08 < float(jnp.std(model.lora.lora_a[...])) < 0.12
    assert not np.any(model.lora.lora_b[...])


def test_nnx_lora_with_a_base_module_names_adapters_beside_it():
    from flax import nnx

    lora = nnx.LoRA(8, 2, 6, base_module=nnx.Linear(8, 6, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    spec = LoraSpec(['base_module/kernel'], rank=2, naming=('{parent}/lora_a', '{parent}/lora_b'))
    adapter = spec.bind(nnx.state(lora)).adapters[0]
    assert (adapter.a_key, adapter.b_key) == ('lora_a', 'lora_b')


def test_conv_kernels_take_a_window_wide_a_and_a_one_by_one_b():
    """PEFT's conv LoRA: A spans the window and inputs, B is a 1x1 conv over the rank."""
    params = {'conv': {'kernel': random_array((3, 3, 4, 8), seed=6)}}
    layout = LoraSpec([LoraTarget('conv/kernel', in_axes=3)], rank=2).bind(params)
    adapter = layout.adapters[0]
    assert (adapter.a_shape, adapter.b_shape) == ((3, 3, 4, 2), (2, 8))
    a, b = random_array(adapter.a_shape, seed=7), random_array(adapter.b_shape, seed=8)
    merged = layout.merge(params, {'conv': {'kernel_lora_a': a, 'kernel_lora_b': b}})
    want = params['conv']['kernel'] + np.einsum('hwir,ro->hwio', a, b)
    np.testing.assert_allclose(merged['conv']['kernel'], want, rtol=1e-5, atol=1e-5)
