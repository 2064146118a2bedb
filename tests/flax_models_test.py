r"""Scanned <-> unrolled layers on real Flax models (Linen and NNX), end to end through Orbax.

Plain Orbax saves one layout; `SurgeryRestore` with `Unstack`/`Stack` restores it into the
other model's abstract, sharded parameters, and both models give the same outputs.

The key paths Flax produces (d=16, hidden 32, L=4):

    Linen nn.scan(Block, ...)(name='layers')  params/layers/Dense_0/kernel    (4, 16, 32)
    Linen, scan of a wrapper around Block     params/layers/Block_0/Dense_0/kernel
    Linen Block(name=f'layers_{i}')           params/layers_0/Dense_0/kernel  (16, 32)
    NNX nnx.vmap'ed Block in self.layers      layers/up/kernel                (4, 16, 32)
    NNX nnx.List of Blocks in self.layers     layers/0/up/kernel              (16, 32)
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orbax_surgery as osurg
from orbax_surgery.keys import flatten

D, H, L = 16, 32, 4

LINEN_UNSTACK = osurg.Unstack(r'params/layers/(.*)', r'params/layers_{i}/\1')
LINEN_STACK = osurg.Stack(r'params/layers_{i}/(.*)', r'params/layers/\1')
NNX_UNSTACK = osurg.Unstack(r'layers/(.*)', r'layers/{i}/\1')
NNX_STACK = osurg.Stack(r'layers/{i}/(.*)', r'layers/\1')


# Linen models.


class Block(nn.Module):
    """Pre-norm residual MLP; `(carry, _) -> (carry, None)` so `nn.scan` can scan it."""

    @nn.compact
    def __call__(self, x, _=None):
        y = nn.Dense(H)(nn.LayerNorm()(x))
        return x + nn.Dense(D)(nn.relu(y)), None


class Wrapper(nn.Module):
    """A scanned module that holds its block as a child: adds a `Block_0` level to the keys."""

    @nn.compact
    def __call__(self, x, _=None):
        return Block()(x)


class Scanned(nn.Module):
    axis: int = 0
    block: type[nn.Module] = Block

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(
            self.block,
            variable_axes={'params': self.axis},
            split_rngs={'params': True},
            length=L,
        )
        x, _ = scan(name='layers')(x, None)
        return x


class Unrolled(nn.Module):
    layers: int = L

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x, _ = Block(name=f'layers_{i}')(x)
        return x


# NNX models.


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(D, rngs=rngs)
        self.up = nnx.Linear(D, H, rngs=rngs)
        self.down = nnx.Linear(H, D, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jax.nn.relu(self.up(self.norm(x))))


class NnxScanned(nnx.Module):
    """The standard NNX scan-over-layers pattern: vmap to create, scan to apply."""

    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return NnxBlock(rngs)

        self.layers = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def forward(x, block):
            return block(x)

        return forward(x, self.layers)


class NnxUnrolled(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([NnxBlock(rngs) for _ in range(L)])

    def __call__(self, x):
        for block in self.layers:
            x = block(x)
        return x


# Helpers.


def inputs():
    return jnp.asarray(np.random.default_rng(0).standard_normal((4, D), np.float32))


def feature_sharded(abstract, mesh):
    """Each leaf sharded over all 8 devices on its last axis of a size divisible by 8.

    Layer axes have size 4 here, so the layer axis is never the sharded one.
    """

    def one(leaf):
        spec = [None] * leaf.ndim
        axis = max(a for a in range(leaf.ndim) if leaf.shape[a] % mesh.size == 0)
        spec[axis] = mesh.axis_names[0]
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, P(*spec)))

    return jax.tree.map(one, abstract)


def save(directory, tree, step=1):
    """Saves `tree` with plain Orbax through a CheckpointManager and StandardSave."""
    with ocp.CheckpointManager(directory) as manager:
        manager.save(step, args=ocp.args.StandardSave(tree))
        manager.wait_until_finished()


def restore(directory, target, rules, step=1):
    """Restores through a manager whose item handler is the surgery handler."""
    with ocp.CheckpointManager(
        directory, item_handlers=osurg.SurgeryCheckpointHandler()
    ) as manager:
        return manager.restore(step, args=osurg.SurgeryRestore(target=target, rules=rules))


def assert_restored_as_target(restored, target):
    """Same keys, shapes, dtypes and shardings as the target, each really sharded."""
    got, want = flatten(restored)[0], flatten(target)[0]
    assert sorted(got) == sorted(want)
    for key, leaf in want.items():
        assert got[key].shape == leaf.shape and got[key].dtype == leaf.dtype, key
        assert got[key].sharding == leaf.sharding, key
        assert not got[key].sharding.is_fully_replicated, key


def assert_layers_equal(unrolled, stacked, layers, axis=0):
    """Unrolled layer j equals the stack's layer `layers[j]` along `axis`, bit for bit."""
    for j, layer in enumerate(layers):
        for key, value in flatten(stacked)[0].items():
            np.testing.assert_array_equal(
                unrolled[j][key], np.take(np.asarray(value), layer, axis=axis), err_msg=key
            )


def linen_layers(params, count):
    """Linen unrolled params by layer: [{'Dense_0/kernel': ...}, ...]."""
    return [flatten(params['params'][f'layers_{j}'])[0] for j in range(count)]


# Linen.


def test_linen_flax_key_paths_are_what_the_rules_match():
    x = inputs()
    scanned = jax.eval_shape(Scanned().init, jax.random.key(0), x)
    unrolled = jax.eval_shape(Unrolled().init, jax.random.key(0), x)
    wrapped = jax.eval_shape(Scanned(block=Wrapper).init, jax.random.key(0), x)
    names = ['Dense_0/bias', 'Dense_0/kernel', 'Dense_1/bias', 'Dense_1/kernel']
    names += ['LayerNorm_0/bias', 'LayerNorm_0/scale']
    assert list(flatten(scanned)[0]) == [f'params/layers/{n}' for n in names]
    assert list(flatten(wrapped)[0]) == [f'params/layers/Block_0/{n}' for n in names]
    assert list(flatten(unrolled)[0]) == [f'params/layers_{i}/{n}' for i in range(L) for n in names]
    assert flatten(scanned)[0]['params/layers/Dense_0/kernel'].shape == (L, D, H)


def test_linen_scanned_checkpoint_restores_into_unrolled_model(tmp_path, mesh8):
    x = inputs()
    scanned_model, unrolled_model = Scanned(), Unrolled()
    params = scanned_model.init(jax.random.key(1), x)
    save(tmp_path / 'run', params)

    target = feature_sharded(jax.eval_shape(unrolled_model.init, jax.random.key(0), x), mesh8)
    restored = restore(tmp_path / 'run', target, [LINEN_UNSTACK])

    assert_restored_as_target(restored, target)
    assert_layers_equal(linen_layers(restored, L), params['params']['layers'], range(L))
    np.testing.assert_allclose(
        unrolled_model.apply(restored, x), scanned_model.apply(params, x), rtol=1e-6, atol=1e-6
    )


def test_linen_unrolled_checkpoint_restores_into_scanned_model(tmp_path, mesh8):
    x = inputs()
    scanned_model, unrolled_model = Scanned(), Unrolled()
    params = unrolled_model.init(jax.random.key(2), x)
    save(tmp_path / 'run', params)

    target = feature_sharded(jax.eval_shape(scanned_model.init, jax.random.key(0), x), mesh8)
    with ocp.Checkpointer(osurg.SurgeryCheckpointHandler()) as ckptr:
        restored = ckptr.restore(
            tmp_path / 'run' / '1' / 'default',
            args=osurg.SurgeryRestore(target=target, rules=[LINEN_STACK]),
        )

    assert_restored_as_target(restored, target)
    assert_layers_equal(linen_layers(params, L), restored['params']['layers'], range(L))
    np.testing.assert_allclose(
        scanned_model.apply(restored, x), unrolled_model.apply(params, x), rtol=1e-6, atol=1e-6
    )


def test_linen_layer_axis_1_and_a_wrapper_level(tmp_path, mesh8):
    x = inputs()
    scanned_model, unrolled_model = Scanned(axis=1, block=Wrapper), Unrolled()
    params = scanned_model.init(jax.random.key(3), x)
    stacked = params['params']['layers']['Block_0']
    assert stacked['Dense_0']['kernel'].shape == (D, L, H)
    assert stacked['Dense_0']['bias'].shape == (H, L)
    save(tmp_path / 'run', params)

    target = feature_sharded(jax.eval_shape(unrolled_model.init, jax.random.key(0), x), mesh8)
    rules = [osurg.Unstack(r'params/layers/Block_0/(.*)', r'params/layers_{i}/\1', axis=1)]
    restored = restore(tmp_path / 'run', target, rules)

    assert_restored_as_target(restored, target)
    assert_layers_equal(linen_layers(restored, L), stacked, range(L), axis=1)
    np.testing.assert_allclose(
        unrolled_model.apply(restored, x), scanned_model.apply(params, x), rtol=1e-6, atol=1e-6
    )

    # And back: the unrolled layers stack along axis 1 into the wrapper's keys.
    save(tmp_path / 'back', restored)
    target = feature_sharded(jax.eval_shape(scanned_model.init, jax.random.key(0), x), mesh8)
    rules = [osurg.Stack(r'params/layers_{i}/(.*)', r'params/layers/Block_0/\1', axis=1)]
    again = restore(tmp_path / 'back', target, rules)
    assert_restored_as_target(again, target)
    for got, want in zip(jax.tree.leaves(again), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(got, want)


def test_linen_two_layer_student_from_layers_0_and_2_of_a_four_layer_teacher(tmp_path, mesh8):
    x = inputs()
    teacher, student = Scanned(), Unrolled(layers=2)
    params = teacher.init(jax.random.key(4), x)
    save(tmp_path / 'run', params)

    target = feature_sharded(jax.eval_shape(student.init, jax.random.key(0), x), mesh8)
    rules = [osurg.Unstack(r'params/layers/(.*)', r'params/layers_{i}/\1', layers=[0, 2])]
    restored = restore(tmp_path / 'run', target, rules)

    assert_restored_as_target(restored, target)
    stacked = params['params']['layers']
    assert_layers_equal(linen_layers(restored, 2), stacked, [0, 2])
    # The student is the teacher's blocks 0 and 2, applied in turn.
    want = x
    for layer in (0, 2):
        block = jax.tree.map(lambda a, k=layer: a[k], stacked)
        want, _ = Block().apply({'params': block}, want)
    np.testing.assert_allclose(student.apply(restored, x), want, rtol=1e-6, atol=1e-6)

    # Without `layers`, the count mismatch is an error that names both counts.
    with pytest.raises(osurg.ShapeMismatchError, match=r'makes 4 layers .* target has 2'):
        restore(tmp_path / 'run', target, [LINEN_UNSTACK])


# NNX.


def abstract_nnx(cls, mesh):
    """An abstract model, its graphdef and state, and a sharded pure-dict restore target."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(nnx.Rngs(0))))
    return graphdef, state, feature_sharded(nnx.to_pure_dict(state), mesh)


def nnx_restore(directory, cls, rules, mesh):
    graphdef, state, target = abstract_nnx(cls, mesh)
    restored = restore(directory, target, rules)
    assert_restored_as_target(restored, target)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state), restored


def test_nnx_flax_key_paths_are_what_the_rules_match(mesh8):
    scanned = flatten(abstract_nnx(NnxScanned, mesh8)[2])[0]
    unrolled = flatten(abstract_nnx(NnxUnrolled, mesh8)[2])[0]
    names = ['down/bias', 'down/kernel', 'norm/bias', 'norm/scale', 'up/bias', 'up/kernel']
    assert list(scanned) == [f'layers/{n}' for n in names]
    assert sorted(unrolled) == [f'layers/{i}/{n}' for i in range(L) for n in names]
    assert scanned['layers/up/kernel'].shape == (L, D, H)


def test_nnx_scanned_checkpoint_restores_into_unrolled_model(tmp_path, mesh8):
    x = inputs()
    scanned = NnxScanned(nnx.Rngs(5))
    saved = nnx.to_pure_dict(nnx.state(scanned))
    save(tmp_path / 'run', saved)

    unrolled, restored = nnx_restore(tmp_path / 'run', NnxUnrolled, [NNX_UNSTACK], mesh8)

    assert_layers_equal(
        [flatten(restored['layers'][j])[0] for j in range(L)], saved['layers'], range(L)
    )
    assert unrolled.layers[1].up.kernel.sharding == NamedSharding(mesh8, P(None, 'x'))
    np.testing.assert_allclose(unrolled(x), scanned(x), rtol=1e-6, atol=1e-6)


def test_nnx_unrolled_checkpoint_restores_into_scanned_model(tmp_path, mesh8):
    x = inputs()
    unrolled = NnxUnrolled(nnx.Rngs(6))
    saved = nnx.to_pure_dict(nnx.state(unrolled))
    save(tmp_path / 'run', saved)

    scanned, restored = nnx_restore(tmp_path / 'run', NnxScanned, [NNX_STACK], mesh8)

    assert_layers_equal(
        [flatten(saved['layers'][j])[0] for j in range(L)], restored['layers'], range(L)
    )
    assert scanned.layers.up.kernel.sharding == NamedSharding(mesh8, P(None, None, 'x'))
    np.testing.assert_allclose(scanned(x), unrolled(x), rtol=1e-6, atol=1e-6)


def test_nnx_state_saved_as_is_restores_into_an_abstract_state(tmp_path, mesh8):
    """The Flax guide's way: save `nnx.state(model)` itself, restore into an abstract state.

    Variables flatten with a trailing `value` (`layers/0/up/kernel/value`); the rules' `(.*)`
    carries it along.
    """
    x = inputs()
    unrolled = NnxUnrolled(nnx.Rngs(7))
    save(tmp_path / 'run', nnx.state(unrolled))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: NnxScanned(nnx.Rngs(0))))
    target = feature_sharded(state, mesh8)
    assert 'layers/up/kernel/value' in flatten(target)[0]

    restored = restore(tmp_path / 'run', target, [NNX_STACK])

    assert isinstance(restored, nnx.State)
    assert_restored_as_target(restored, target)
    scanned = nnx.merge(graphdef, restored)
    np.testing.assert_array_equal(scanned.layers.up.kernel[2], unrolled.layers[2].up.kernel)
    np.testing.assert_allclose(scanned(x), unrolled(x), rtol=1e-6, atol=1e-6)
