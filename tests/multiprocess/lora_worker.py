"""One process of the 2-process LoRA test: merges adapters into a base, shard by shard.

Both processes save a base (plain Orbax) and its adapters (`LoraSave`), each leaf sharded
as the restore will want it, over a (2, 4) mesh whose 'x' axis splits the processes. Each
process then restores `W + scale * A @ B` for its shards with `LoraRestore(mode='merge')`,
checks every shard against NumPy, and reports what it read from disk against what its
shards need of W, A and B. A `mode='split'` restore must give the adapters back as saved.
"""

import json
import time

import jax
from job import file_bytes_read, join

workdir = join().workdir

import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from orbax_surgery import (  # noqa: E402
    LoraCheckpointHandler,
    LoraRestore,
    LoraSave,
    LoraSpec,
    LoraTarget,
    plan_lora_restore,
)
from orbax_surgery.keys import flatten, nest  # noqa: E402

RANK, ALPHA = 8, 16.0


def spread(shape, seed):
    """Float32 values with random signs and mantissas, |x| in [2**-16, 2**16), same everywhere.

    zstd (Orbax's default) barely compresses them (about 2%; normal floats lose 7%), so
    the bytes read from disk track the bytes needed, and the low-rank update here (about
    0.06 per element) still changes nearly every element.
    """
    bits = np.random.default_rng(seed).integers(0, 2**32, size=shape, dtype=np.uint32)
    exponent = np.uint32(127 - 16) + (bits >> 23) % np.uint32(32)
    bits = (bits & ~np.uint32(0x7F800000)) | (exponent << 23)
    return bits.view(np.float32)


devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
# Row i of the mesh is process i's devices: 'x' splits the processes, 'y' stays within one.
mesh = Mesh(np.array(devices).reshape(2, 4), ('x', 'y'))

# key: (shape, spec). Saved and restored with the same sharding, so stored chunks are shards.
LEAVES = {
    'attn/query/kernel': ((256, 4, 64), P('x', 'y', None)),  # DenseGeneral q: in_axes=1
    'attn/out/kernel': ((4, 64, 256), P('y', None, 'x')),  # out projection: in_axes=2
    'mlp/wi/kernel': ((256, 512), P('x', 'y')),
    'mlp/wi/bias': ((512,), P()),  # frozen, replicated: read whole by both
    'mlp/wo/kernel': ((512, 256), P('y', 'x')),  # outputs split over the processes
    'layers/mlp/kernel': ((4, 128, 256), P('x', 'y', None)),  # stacked layers: batch_axes=1
    'head/bias': ((512,), P('x')),  # trained in full: the adapters' copy wins
}
sharding = {key: NamedSharding(mesh, spec) for key, (_, spec) in LEAVES.items()}
base_values = {key: spread(shape, seed) for seed, (key, (shape, _)) in enumerate(LEAVES.items())}


def global_array(value, leaf_sharding):
    return jax.make_array_from_callback(value.shape, leaf_sharding, lambda i: value[i])


params = nest({key: global_array(base_values[key], sharding[key]) for key in LEAVES})
target_flat = {
    key: jax.ShapeDtypeStruct(shape, np.float32, sharding=sharding[key])
    for key, (shape, _) in LEAVES.items()
}
target = nest(target_flat)

spec = LoraSpec(
    targets=[
        LoraTarget(r'attn/out/kernel', in_axes=2),
        LoraTarget(r'layers/.*/kernel', batch_axes=1),
        r'.*/kernel',
    ],
    rank=RANK,
    alpha=ALPHA,
    train=(r'head/.*',),
)
lora = spec.bind(params)
adapters = {a.key: a for a in lora.adapters}
assert sorted(adapters) == sorted(k for k in LEAVES if k.endswith('/kernel')), lora

# Adapters: A as `init` makes them, every B non-zero, the trained head changed.
init = flatten(lora.init(params, jax.random.key(0)))[0]
rng = np.random.default_rng(100)
trained_values = {}
for a in lora.adapters:
    trained_values[a.a_key] = np.asarray(init[a.a_key])
    trained_values[a.b_key] = rng.standard_normal(a.b_shape).astype(np.float32)
trained_values['head/bias'] = spread((512,), 200)
assert set(trained_values) == set(lora.trainable_keys)
trainable_target = flatten(lora.abstract_trainable(target))[0]
trainable = nest(
    {k: global_array(v, trainable_target[k].sharding) for k, v in trained_values.items()}
)

base_dir, adapter_dir = f'{workdir}/base', f'{workdir}/adapters'
with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(base_dir, params)
    ckptr.wait_until_finished()
ocp.Checkpointer(LoraCheckpointHandler()).save(
    adapter_dir, args=LoraSave(item=trainable, lora=lora)
)

# What the merge must give, `W + scale * A @ B` in float64, written out for each kind.
SCALE = ALPHA / RANK
A_AT_B = {
    'attn/query/kernel': 'ir,rhk->ihk',  # A (d, r), B (r, heads, head_dim)
    'attn/out/kernel': 'hkr,rd->hkd',  # A (heads, head_dim, r), B (r, d)
    'mlp/wi/kernel': 'ir,ro->io',
    'mlp/wo/kernel': 'ir,ro->io',
    'layers/mlp/kernel': 'lir,lro->lio',  # one adapter per layer
}
expected = {}
for key in LEAVES:
    if key in adapters:
        a = adapters[key]
        assert a.scale == SCALE, (key, a.scale)
        wa, wb = (trained_values[k].astype(np.float64) for k in (a.a_key, a.b_key))
        w_merged = base_values[key] + SCALE * np.einsum(A_AT_B[key], wa, wb)
        expected[key] = w_merged.astype(np.float32)
    elif key in lora.trained:
        expected[key] = trained_values[key]
    else:
        expected[key] = base_values[key]
changed = sum(int(np.sum(expected[k] != base_values[k])) for k in adapters) / sum(
    base_values[k].size for k in adapters
)


def needed_bytes(process):
    """Bytes of W, A, B (and plain leaves) the shards of `process` need, each element once."""
    masks = {}

    def need(source, shape, index):
        masks.setdefault(source, np.zeros(shape, bool))[index] = True

    for key, leaf in target_flat.items():
        for device, index in leaf.sharding.devices_indices_map(leaf.shape).items():
            if device.process_index != process:
                continue
            if key in lora.trained:
                need(f'adapters/{key}', leaf.shape, index)
                continue
            need(f'base/{key}', leaf.shape, index)
            if key in adapters:
                a = adapters[key]
                nb, ni = a.batch_axes, a.batch_axes + a.in_axes
                need(f'adapters/{a.a_key}', a.a_shape, index[:ni] + (slice(None),))
                need(f'adapters/{a.b_key}', a.b_shape, index[:nb] + (slice(None),) + index[ni:])
    return sum(int(m.sum()) * 4 for m in masks.values())


me, other = jax.process_index(), 1 - jax.process_index()
merge_args = LoraRestore(base=base_dir, target=target, mode='merge')
plan = plan_lora_restore(adapter_dir, merge_args)
assert not plan.errors, plan.errors

start = time.perf_counter()
before = file_bytes_read()
merged = ocp.Checkpointer(LoraCheckpointHandler()).restore(adapter_dir, args=merge_args)
read = file_bytes_read() - before
merge_s = time.perf_counter() - start

merged_flat = flatten(merged)[0]
assert sorted(merged_flat) == sorted(LEAVES), sorted(merged_flat)
merged_checked = 0
for key, want in expected.items():
    got = merged_flat[key]
    assert got.sharding == sharding[key], (key, got.sharding)
    assert got.shape == want.shape and got.dtype == want.dtype, (key, got.shape, got.dtype)
    for shard in got.addressable_shards:
        np.testing.assert_allclose(
            np.asarray(shard.data), want[shard.index], rtol=1e-5, atol=1e-5, err_msg=key
        )
        merged_checked += 1

# Split: the base and the adapters apart, the adapters sharded as `abstract_trainable` says.
frozen, restored = ocp.Checkpointer(LoraCheckpointHandler()).restore(
    adapter_dir, args=LoraRestore(base=base_dir, target=target, mode='split')
)
split_checked = 0
frozen_keys = sorted(k for k in LEAVES if k not in lora.trainable_keys)
for tree, keys, want_values, want_structs in (
    (frozen, frozen_keys, base_values, target_flat),
    (restored, sorted(lora.trainable_keys), trained_values, trainable_target),
):
    flat = flatten(tree)[0]
    assert sorted(flat) == keys, (sorted(flat), keys)
    for key, got in flat.items():
        want = want_values[key]
        assert got.sharding == want_structs[key].sharding, (key, got.sharding)
        assert got.shape == want.shape and got.dtype == want.dtype, (key, got.shape, got.dtype)
        for shard in got.addressable_shards:
            # Bit for bit: compare the raw bits, not float values.
            np.testing.assert_array_equal(
                np.asarray(shard.data).view(np.uint32), want[shard.index].view(np.uint32)
            )
            split_checked += 1

print(
    json.dumps(
        {
            'process': me,
            'merged_checked': merged_checked,
            'split_frozen_keys': len(flatten(frozen)[0]),
            'split_trainable_keys': len(flatten(restored)[0]),
            'split_checked': split_checked,
            'changed_by_merge': changed,
            'bytes_read': read,
            'bytes_needed': needed_bytes(me),
            'planned_needed': plan.reads[me].needed,
            'planned_chunked': plan.reads[me].chunked,
            'needed_other': needed_bytes(other),
            'planned_needed_other': plan.reads[other].needed,
            'base_bytes': sum(v.nbytes for v in base_values.values()),
            'adapter_bytes': sum(v.nbytes for v in trained_values.values()),
            'merge_s': merge_s,
        }
    )
)
