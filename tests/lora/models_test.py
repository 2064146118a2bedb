r"""LoRA end to end on real Flax models (Linen and NNX): train, save adapters, restore.

Each test trains adapters for a few optax steps on a toy regression task, saves only the
trainable params with `LoraSave`, and restores them onto a base saved by plain Orbax. The
fresh-process tests restore in a new Python process (`fresh_process.py`), which knows
only the model's class, the directories and the input: what it computes from the
checkpoints must equal what the trained model computed.

The key paths the specs match (Linen params, NNX pure dicts):

    Linen nn.Embed            embed/embedding         (VOCAB, D)
    Linen nn.DenseGeneral     attn/query/kernel       (D, HEADS, HEAD_DIM)   in_axes=1
    Linen DenseGeneral axis=(-2, -1)   attn/out/kernel   (HEADS, HEAD_DIM, D)   in_axes=2
    Linen nn.scan(ScanBlock)  layers/up/kernel        (L, D, H)              batch_axes=1
    NNX nnx.LoRALinear        up/kernel, up/lora/lora_a, up/lora/lora_b
"""

import functools
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import orbax_surgery as osurg
from orbax_surgery.keys import flatten

VOCAB, T, D, HEADS, HEAD_DIM, H, OUT, L = 48, 6, 32, 4, 8, 64, 3, 4
BATCH, STEPS, LR = 8, 25, 1e-2
TOL = {'rtol': 1e-5, 'atol': 1e-5}
FRESH_PROCESS = Path(__file__).with_name('fresh_process.py')


# Models.


class Attention(nn.Module):
    """q/k/v project to (heads, head_dim); the output projection reads both axes back."""

    @nn.compact
    def __call__(self, x):
        project = functools.partial(nn.DenseGeneral, (HEADS, HEAD_DIM))
        q, k, v = (project(name=name)(x) for name in ('query', 'key', 'value'))
        weights = jax.nn.softmax(jnp.einsum('bqhk,bshk->bhqs', q, k) / np.sqrt(HEAD_DIM))
        y = jnp.einsum('bhqs,bshk->bqhk', weights, v)
        return nn.DenseGeneral(D, axis=(-2, -1), name='out')(y)


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, D, name='embed')(tokens)
        x = x + Attention(name='attn')(nn.LayerNorm(name='norm')(x))
        x = x + nn.Dense(D, name='mlp')(nn.gelu(x))
        return nn.Dense(OUT, name='head')(x)


LINEN_SPEC = osurg.LoraSpec(
    targets=[
        osurg.LoraTarget(r'attn/out/kernel', in_axes=2),
        r'attn/(query|key|value)/kernel',
        r'embed/embedding',
        r'mlp/kernel',
    ],
    rank=4,
    alpha=8,
    train=[r'head/.*'],
)


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        h = nn.gelu(nn.Dense(H, name='up')(x))
        return x + nn.Dense(D, name='down')(h), None


class ScannedModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(
            ScanBlock, variable_axes={'params': 0}, split_rngs={'params': True}, length=L
        )
        x, _ = scan(name='layers')(x, None)
        return nn.Dense(OUT, name='head')(x)


SCANNED_SPEC = osurg.LoraSpec(
    targets=[osurg.LoraTarget(r'layers/(up|down)/kernel', batch_axes=1)], rank=4, alpha=4
)


class NnxModel(nnx.Module):
    """Two LoRALinear layers (or plain Linear ones) and a head that is never adapted."""

    def __init__(self, rngs: nnx.Rngs, *, lora_rank: int | None = None):
        if lora_rank is None:
            linear = functools.partial(nnx.Linear, rngs=rngs)
        else:
            linear = functools.partial(nnx.LoRALinear, lora_rank=lora_rank, rngs=rngs)
        self.up = linear(D, H)
        self.down = linear(H, D)
        self.head = nnx.Linear(D, OUT, rngs=rngs)

    def __call__(self, x):
        return self.head(x + self.down(jax.nn.gelu(self.up(x))))


NNX_RANK = 4
# nnx.LoRA computes x @ A @ B with no scale, so alpha stays None (= rank, scale 1).
NNX_SPEC = osurg.LoraSpec(targets=[r'(up|down)/kernel'], rank=NNX_RANK, naming='nnx')


# Helpers.


def toy_data(seed, x_shape, y_shape, vocab=None):
    rng = np.random.default_rng(seed)
    if vocab is None:
        x = rng.standard_normal(x_shape).astype(np.float32)
    else:
        x = rng.integers(0, vocab, x_shape).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(rng.standard_normal(y_shape).astype(np.float32))


def sharded_target(abstract, mesh):
    """Each leaf sharded over the mesh on its largest axis divisible by the mesh size.

    That shards some kernels on an input axis, so A is sharded too (attn/query/kernel
    (D, heads, head_dim) on D, embed/embedding on the vocab), and some on an output axis,
    so B is (attn/out/kernel (heads, head_dim, D) on D).
    """

    def one(leaf):
        spec = [None] * leaf.ndim
        axes = [a for a in range(leaf.ndim) if leaf.shape[a] % mesh.size == 0]
        if axes:
            spec[max(axes, key=lambda a: (leaf.shape[a], a))] = mesh.axis_names[0]
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, P(*spec)))

    return jax.tree.map(one, abstract)


def auto_mesh():
    """8 devices in one Auto axis: the models then run on any sharding the restore gives.

    (Under an Explicit mesh, a kernel sharded on its input axis needs an out_sharding in
    the model's dot_general; that is the model's business, not the restore's.)
    """
    return jax.make_mesh((8,), ('x',), axis_types=(AxisType.Auto,))


def assert_placed_as(restored, target):
    """Same keys, shapes, dtypes and shardings as the target."""
    got, want = flatten(restored)[0], flatten(target)[0]
    assert sorted(got) == sorted(want)
    for key, leaf in want.items():
        assert (got[key].shape, got[key].dtype) == (leaf.shape, leaf.dtype), key
        assert got[key].sharding == leaf.sharding, key


def train_trainable(apply, params, lora, x, y, steps=STEPS):
    """Adam on the trainable tree only; the loss runs the model on merged params."""
    trainable = jax.jit(lora.init)(params, jax.random.key(1))
    tx = lora.optimizer(optax.adam(LR))
    opt_state = tx.init(trainable)

    @jax.jit
    def loss_fn(trainable):
        return jnp.mean((apply(lora.merge(params, trainable), x) - y) ** 2)

    @jax.jit
    def step(trainable, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    losses = []
    for _ in range(steps):
        trainable, opt_state, loss = step(trainable, opt_state)
        losses.append(float(loss))
    losses.append(float(loss_fn(trainable)))
    return trainable, opt_state, losses


def assert_adapters_trained(lora, trainable, losses):
    assert losses[-1] < 0.5 * losses[0], losses
    flat = flatten(trainable)[0]
    for adapter in lora.adapters:
        assert np.abs(np.asarray(flat[adapter.b_key])).max() > 1e-4, adapter.b_key


def run_fresh_process(kind, workdir):
    """Runs `fresh_process.py kind workdir` in a new Python; returns {mode: outputs}."""
    env = {**os.environ}
    env.pop('XLA_FLAGS', None)
    tests = Path(__file__).parents[1]  # fixtures.py, and the repository above it
    env['PYTHONPATH'] = os.pathsep.join([str(tests), str(tests.parent), env.get('PYTHONPATH', '')])
    done = subprocess.run(
        [sys.executable, str(FRESH_PROCESS), kind, str(workdir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return {p.stem: np.load(p) for p in sorted(workdir.glob('out_*.npy'))}


def init_params(model, x):
    return jax.jit(model.init)(jax.random.key(0), x)['params']


def linen_apply(model):
    """`(params, x) -> outputs`, jitted: eager Flax dispatches op by op and is slow."""
    return jax.jit(lambda params, x: model.apply({'params': params}, x))


# Linen: a small transformer-ish model with DenseGeneral projections and an embedding.


def test_linen_spec_adapts_dense_general_with_several_in_and_out_axes():
    tokens, _ = toy_data(0, (BATCH, T), (BATCH, T, OUT), vocab=VOCAB)
    abstract = jax.eval_shape(LinenModel().init, jax.random.key(0), tokens)['params']
    lora = LINEN_SPEC.bind(abstract)
    shapes = {a.key: (a.a_shape, a.b_shape, a.scale) for a in lora.adapters}
    assert shapes == {
        'attn/key/kernel': ((D, 4), (4, HEADS, HEAD_DIM), 2.0),
        'attn/out/kernel': ((HEADS, HEAD_DIM, 4), (4, D), 2.0),
        'attn/query/kernel': ((D, 4), (4, HEADS, HEAD_DIM), 2.0),
        'attn/value/kernel': ((D, 4), (4, HEADS, HEAD_DIM), 2.0),
        'embed/embedding': ((VOCAB, 4), (4, D), 2.0),
        'mlp/kernel': ((D, 4), (4, D), 2.0),
    }
    assert sorted(lora.trained) == ['head/bias', 'head/kernel']


@pytest.mark.slow
def test_linen_optimizer_on_a_joined_tree_updates_and_keeps_state_for_trainable_only():
    tokens, y = toy_data(1, (BATCH, T), (BATCH, T, OUT), vocab=VOCAB)
    model = LinenModel()
    params = init_params(model, tokens)
    lora = LINEN_SPEC.bind(params)
    trainable = jax.jit(lora.init)(params, jax.random.key(1))
    joined = lora.join(params, trainable)
    tx = lora.optimizer(optax.adam(LR))
    state = tx.init(joined)

    # Adam keeps mu and nu for the trainable leaves only, plus its step count.
    trainable_sizes = sorted(leaf.size for leaf in jax.tree.leaves(trainable))
    state_sizes = sorted(leaf.size for leaf in jax.tree.leaves(state))
    assert state_sizes == sorted(trainable_sizes * 2 + [1])
    n_frozen = len(jax.tree.leaves(joined)) - len(jax.tree.leaves(trainable))
    assert n_frozen == len(jax.tree.leaves(params)) - len(lora.trained) > 0

    apply = linen_apply(model)

    def loss_fn(joined):
        return jnp.mean((apply(lora.merge(joined), tokens) - y) ** 2)

    grads = jax.jit(jax.grad(loss_fn))(joined)
    updates, state = jax.jit(tx.update)(grads, state, joined)
    stepped = optax.apply_updates(joined, updates)

    frozen_keys = set(flatten(params)[0]) - set(lora.trained)
    flat_grads, flat_updates = flatten(grads)[0], flatten(updates)[0]
    flat_joined, flat_stepped = flatten(joined)[0], flatten(stepped)[0]
    assert set(flat_updates) == set(flat_joined)
    for key in flat_joined:
        if key in frozen_keys:
            assert np.abs(flat_grads[key]).max() > 0, key  # Zero updates mean something.
            np.testing.assert_array_equal(flat_updates[key], 0, err_msg=key)
            np.testing.assert_array_equal(flat_stepped[key], flat_joined[key], err_msg=key)
        elif key.endswith('_lora_b') or key.startswith('head/'):
            # B starts at 0, so A's gradient is 0 at step one; B and the head move.
            assert np.abs(flat_updates[key]).max() > 0, key

    # The same step on the trainable tree alone lands on the same values.
    alone = jax.jit(jax.grad(lambda t: loss_fn(lora.join(params, t))))(trainable)
    updates_alone, _ = jax.jit(tx.update)(alone, tx.init(trainable), trainable)
    _, trainable_after = lora.split(stepped)
    for key, value in flatten(optax.apply_updates(trainable, updates_alone))[0].items():
        np.testing.assert_allclose(value, flatten(trainable_after)[0][key], **TOL, err_msg=key)


@pytest.mark.slow
def test_linen_adapters_restore_onto_the_base_in_a_fresh_process(tmp_path):
    tokens, y = toy_data(2, (BATCH, T), (BATCH, T, OUT), vocab=VOCAB)
    model = LinenModel()
    params = init_params(model, tokens)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / 'base', params)
    lora = LINEN_SPEC.bind(params)

    apply = linen_apply(model)
    trainable, opt_state, losses = train_trainable(apply, params, lora, tokens, y)
    assert_adapters_trained(lora, trainable, losses)
    trained_out = np.asarray(apply(jax.jit(lora.merge)(params, trainable), tokens))
    base_out = np.asarray(apply(params, tokens))
    assert np.abs(trained_out - base_out).max() > 1e-2  # Equal outputs below mean something.

    with ocp.CheckpointManager(tmp_path / 'run') as mngr:
        mngr.save(
            STEPS,
            args=ocp.args.Composite(
                adapters=osurg.LoraSave(item=trainable, lora=lora),
                opt_state=ocp.args.StandardSave(opt_state),
            ),
        )
        mngr.wait_until_finished()
    np.save(tmp_path / 'tokens.npy', np.asarray(tokens))

    outputs = run_fresh_process('linen', tmp_path)

    assert sorted(outputs) == ['out_attach', 'out_merge', 'out_split']
    for mode, got in outputs.items():
        np.testing.assert_allclose(got, trained_out, **TOL, err_msg=mode)

    # The adapter item holds the trainable params only; the optimizer state came along.
    with ocp.CheckpointManager(tmp_path / 'run') as mngr:
        abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, opt_state)
        restored = mngr.restore(
            STEPS,
            args=ocp.args.Composite(
                adapters=osurg.LoraRestore(),
                opt_state=ocp.args.StandardRestore(abstract_state),
            ),
        )
    assert sorted(flatten(restored['adapters'])[0]) == sorted(lora.trainable_keys)
    got = jax.tree.leaves((restored['adapters'], restored['opt_state']))
    for got_leaf, want in zip(got, jax.tree.leaves((trainable, opt_state)), strict=True):
        np.testing.assert_array_equal(got_leaf, want)


def restore_linen(workdir, mesh):
    """The fresh process's side: base + adapters, merged, split and attached."""
    tokens = jnp.asarray(np.load(workdir / 'tokens.npy'))
    model = LinenModel()
    abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)['params']
    target = sharded_target(abstract, mesh)
    apply = linen_apply(model)
    outputs = {}
    with ocp.CheckpointManager(workdir / 'run') as mngr:
        step = mngr.latest_step()
        # The layout comes from the checkpoint; nothing about the adapters is re-typed here.
        lora = osurg.read_lora_layout(workdir / 'run' / str(step) / 'adapters')
        trainable_target = lora.abstract_trainable(target)  # A, B sharded like W's axes.
        joined_target = lora.join(target, trainable_target)
        frozen_target, _ = lora.split(joined_target)
        for mode in ('merge', 'split', 'attach'):
            # `lora=` checks the spec we would have trained with against the saved layout.
            args = osurg.LoraRestore(
                base=workdir / 'base', target=target, mode=mode, lora=LINEN_SPEC
            )
            restored = mngr.restore(step, args=ocp.args.Composite(adapters=args))['adapters']
            if mode == 'merge':
                assert_placed_as(restored, target)
                params = restored
            elif mode == 'split':
                frozen, trainable = restored
                assert_placed_as(frozen, frozen_target)
                assert_placed_as(trainable, trainable_target)
                params = lora.merge(frozen, trainable)
            else:
                assert_placed_as(restored, joined_target)
                params = lora.merge(restored)
            outputs[mode] = apply(params, tokens)
    return outputs


# Linen, scanned layers: per-layer adapters on stacked (L, in, out) kernels.


def test_linen_scanned_layers_with_per_layer_adapters(tmp_path):
    x, y = toy_data(3, (BATCH, D), (BATCH, OUT))
    model = ScannedModel()
    params = init_params(model, x)
    assert params['layers']['up']['kernel'].shape == (L, D, H)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / 'base', params)
    lora = SCANNED_SPEC.bind(params)
    assert {a.key: (a.a_shape, a.b_shape) for a in lora.adapters} == {
        'layers/down/kernel': ((L, H, 4), (L, 4, D)),
        'layers/up/kernel': ((L, D, 4), (L, 4, H)),
    }

    apply = linen_apply(model)
    trainable, _, losses = train_trainable(apply, params, lora, x, y)
    assert_adapters_trained(lora, trainable, losses)
    trained_out = np.asarray(apply(jax.jit(lora.merge)(params, trainable), x))
    with ocp.Checkpointer(osurg.LoraCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / 'adapters', args=osurg.LoraSave(item=trainable, lora=lora))

    abstract = jax.eval_shape(model.init, jax.random.key(0), x)['params']
    target = sharded_target(abstract, auto_mesh())
    with ocp.Checkpointer(osurg.LoraCheckpointHandler()) as ckptr:
        merged = ckptr.restore(
            tmp_path / 'adapters', args=osurg.LoraRestore(base=tmp_path / 'base', target=target)
        )

    assert_placed_as(merged, target)
    np.testing.assert_allclose(apply(merged, x), trained_out, **TOL)
    # Each layer got its own update: W[l] + A[l] @ B[l], and the layers' updates differ.
    w = np.asarray(params['layers']['up']['kernel'])
    a = np.asarray(trainable['layers']['up']['kernel_lora_a'])
    b = np.asarray(trainable['layers']['up']['kernel_lora_b'])
    got = np.asarray(merged['layers']['up']['kernel'])
    for layer in range(L):
        np.testing.assert_allclose(got[layer], w[layer] + a[layer] @ b[layer], **TOL)
    assert np.abs((a[0] @ b[0]) - (a[1] @ b[1])).max() > 1e-4


# NNX: nnx.LoRALinear layers, trained with nnx.Optimizer(wrt=lora.nnx_filter).


@pytest.mark.slow
def test_nnx_lora_linear_restores_attached_and_merged_in_a_fresh_process(tmp_path):
    x, y = toy_data(4, (BATCH, D), (BATCH, OUT))
    model = NnxModel(nnx.Rngs(0), lora_rank=NNX_RANK)
    base = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.LoRAParam)))
    assert sorted(flatten(base)[0]) == [
        f'{m}/{p}' for m in ('down', 'head', 'up') for p in ('bias', 'kernel')
    ]
    with ocp.CheckpointManager(tmp_path / 'base') as mngr:
        mngr.save(0, args=ocp.args.StandardSave(base))
        mngr.wait_until_finished()

    lora = NNX_SPEC.bind(nnx.state(model))
    assert [(a.a_key, a.b_key, a.scale) for a in lora.adapters] == [
        ('down/lora/lora_a', 'down/lora/lora_b', 1.0),
        ('up/lora/lora_a', 'up/lora/lora_b', 1.0),
    ]
    optimizer = nnx.Optimizer(model, optax.adam(LR), wrt=lora.nnx_filter)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            return jnp.mean((model(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, lora.nnx_filter))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(STEPS)]
    losses.append(float(jnp.mean((model(x) - y) ** 2)))
    assert losses[-1] < 0.5 * losses[0], losses
    for name in ('up', 'down'):
        layer = getattr(model, name)
        assert np.abs(np.asarray(layer.lora.lora_b[...])).max() > 1e-4, name
        np.testing.assert_array_equal(layer.kernel[...], base[name]['kernel'])
    trained_out = np.asarray(model(x))

    with ocp.CheckpointManager(tmp_path / 'run') as mngr:
        mngr.save(
            STEPS,
            args=ocp.args.Composite(adapters=osurg.LoraSave(item=nnx.state(model), lora=lora)),
        )
        mngr.wait_until_finished()
    np.save(tmp_path / 'x.npy', np.asarray(x))

    outputs = run_fresh_process('nnx', tmp_path)

    assert sorted(outputs) == ['out_attach', 'out_merge']
    np.testing.assert_allclose(outputs['out_attach'], trained_out, **TOL)
    np.testing.assert_allclose(outputs['out_merge'], trained_out, **TOL)

    # Only the four adapter arrays were written.
    with ocp.Checkpointer(osurg.LoraCheckpointHandler()) as ckptr:
        saved = ckptr.restore(tmp_path / 'run' / str(STEPS) / 'adapters', args=osurg.LoraRestore())
    assert sorted(flatten(saved)[0]) == sorted(lora.trainable_keys)
    np.testing.assert_array_equal(saved['up']['lora']['lora_b'], model.up.lora.lora_b[...])


def restore_nnx(workdir, mesh):
    """The fresh process's side: attached into a LoRALinear model, merged into a plain one."""
    x = jnp.asarray(np.load(workdir / 'x.npy'))
    base = workdir / 'base' / '0' / 'default'
    outputs = {}
    with ocp.CheckpointManager(workdir / 'run') as mngr:
        step = mngr.latest_step()
        for mode, rank in (('attach', NNX_RANK), ('merge', None)):
            graphdef, state = nnx.split(
                nnx.eval_shape(lambda r=rank: NnxModel(nnx.Rngs(0), lora_rank=r))
            )
            target = sharded_target(nnx.to_pure_dict(state), mesh)
            args = osurg.LoraRestore(base=base, target=target, mode=mode)
            restored = mngr.restore(step, args=ocp.args.Composite(adapters=args))['adapters']
            assert_placed_as(restored, target)
            nnx.replace_by_pure_dict(state, restored)
            outputs[mode] = nnx.merge(graphdef, state)(x)
    return outputs


# Size: rank-8 adapters on the attention kernels of a ~200 MB base.


def dir_bytes(path):
    return sum(p.stat().st_size for p in Path(path).rglob('*') if p.is_file())


def test_adapter_checkpoint_is_under_two_percent_of_a_200mb_base(tmp_path):
    d, layers, vocab = 1024, 4, 2048
    rng = np.random.default_rng(0)

    def normal(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    base = {'embed': {'embedding': normal(vocab, d)}}
    for i in range(layers):
        base[f'layers_{i}'] = {
            'attn': {n: {'kernel': normal(d, d)} for n in ('query', 'key', 'value', 'out')},
            'mlp': {'up': {'kernel': normal(d, 4 * d)}, 'down': {'kernel': normal(4 * d, d)}},
        }
    base_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(base))
    assert 190e6 < base_bytes < 210e6, base_bytes
    lora = osurg.LoraSpec([r'layers_\d/attn/\w+/kernel'], rank=8).bind(base)
    assert len(lora.adapters) == 4 * layers
    # Trained-like adapters: B = 0 would compress to nothing and prove nothing.
    trainable = jax.tree.map(lambda s: normal(*s.shape), lora.abstract_trainable())

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / 'base', base)
    with ocp.Checkpointer(osurg.LoraCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / 'adapters', args=osurg.LoraSave(item=trainable, lora=lora))

    on_disk_base, on_disk_adapters = dir_bytes(tmp_path / 'base'), dir_bytes(tmp_path / 'adapters')
    ratio = on_disk_adapters / on_disk_base
    print(f'base {on_disk_base} B, adapters {on_disk_adapters} B, ratio {ratio:.4%}')
    assert on_disk_base > 0.9 * base_bytes  # Random normals barely compress, as intended.
    assert on_disk_adapters > 0.9 * sum(leaf.nbytes for leaf in jax.tree.leaves(trainable))
    assert ratio < 0.02, ratio


# NNX state targets (keys ending in '/value'), whatever spelling the base was saved in.


@pytest.mark.parametrize('base_as', ['pure_dict', 'state'])
def test_nnx_state_targets_restore_in_every_mode(tmp_path, base_as):
    x, _ = toy_data(5, (BATCH, D), (BATCH, OUT))
    model = NnxModel(nnx.Rngs(0), lora_rank=NNX_RANK)
    lora = NNX_SPEC.bind(nnx.state(model))
    trainable = lora.init(nnx.state(model), jax.random.key(1), stddev=0.1)
    trainable = jax.tree.map(lambda a: a + 0.05, trainable)  # B non-zero, as after training
    nnx.update(model, trainable)
    want = np.asarray(model(x))
    base = nnx.state(model, nnx.Not(nnx.LoRAParam))
    save_fixture = base if base_as == 'state' else nnx.to_pure_dict(base)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / 'base', save_fixture)
    with ocp.Checkpointer(osurg.LoraCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / 'adapters', args=osurg.LoraSave(item=nnx.state(model), lora=lora))

    mesh = auto_mesh()
    for mode, rank in (('attach', NNX_RANK), ('merge', None), ('split', NNX_RANK)):
        graphdef, state = nnx.split(
            nnx.eval_shape(lambda r=rank: NnxModel(nnx.Rngs(0), lora_rank=r))
        )
        target = sharded_target(state, mesh)
        args = osurg.LoraRestore(base=tmp_path / 'base', target=target, mode=mode)
        with ocp.Checkpointer(osurg.LoraCheckpointHandler()) as ckptr:
            restored = ckptr.restore(tmp_path / 'adapters', args=args)
        if mode == 'split':
            frozen, adapters = restored
            nnx.replace_by_pure_dict(state, lora.join(frozen, adapters))
            restored = state
        else:
            assert isinstance(restored, nnx.State), mode
        np.testing.assert_allclose(nnx.merge(graphdef, restored)(x), want, **TOL, err_msg=mode)


def test_nnx_spec_targeting_a_layer_without_lora_params_fails_at_bind():
    model = NnxModel(nnx.Rngs(0), lora_rank=NNX_RANK)
    spec = osurg.LoraSpec(
        [osurg.LoraTarget('head/kernel', rank=2), r'.*/kernel'], rank=NNX_RANK, naming='nnx'
    )
    with pytest.raises(osurg.UnmatchedKeyError, match=r"none for 'head/kernel'.*nnx.LoRALinear"):
        spec.bind(nnx.state(model))
