"""One process of the 2-process scan-unroll test: saves scanned layers, restores unrolled.

Both processes save `{'embed', 'layers': {...}}` with plain Orbax, each stacked leaf
`(L, ...)` sharded so that every device shard, and so every stored chunk, is a slice of
one layer. Each process then restores `layers_0 ... layers_{L-1}` with `Unstack`, every
layer split over all 8 devices, and reports what it read against what its shards need.
"""

import json

import jax
from job import file_bytes_read, join

workdir = join().workdir

import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import orbax_surgery as osurg  # noqa: E402
from orbax_surgery.keys import nest  # noqa: E402

L, D, V = 4, 64, 512


def incompressible(shape, seed):
    """Float32 values with (almost) full-entropy bits, all finite, same on every process.

    Normal floats compress by several percent (their exponents repeat); these do not,
    so the bytes read from disk track the bytes needed.
    """
    bits = np.random.default_rng(seed).integers(0, 2**32, size=shape, dtype=np.uint32)
    exponent_full = (bits & 0x7F800000) == 0x7F800000
    bits = np.where(exponent_full, bits & ~np.uint32(0x40000000), bits)
    return bits.view(np.float32)


devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
# Saving: layers over 'l' (process 0 holds layers 0-1, process 1 layers 2-3), each layer
# halved over 'h' along the axis the restore splits, so stored chunks align with the
# half of every layer each process restores.
save_mesh = Mesh(np.array(devices).reshape(L, 2), ('l', 'h'))
# Restoring: every layer split over all 8 devices, 4 on each process.
mesh = Mesh(np.array(devices), ('x',))

# key: (shape, spec saved, spec of one restored layer, or of the whole leaf for embed)
LEAVES = {
    'embed': ((V, D), P(('l', 'h')), P('x')),
    'layers/attn/kernel': ((L, D, D), P('l', 'h'), P('x')),
    'layers/mlp/wi': ((L, D, 4 * D), P('l', None, 'h'), P(None, 'x')),
    'layers/mlp/wo': ((L, 4 * D, D), P('l', 'h'), P('x')),
}
values = {
    key: incompressible(shape, seed) for seed, (key, (shape, _, _)) in enumerate(LEAVES.items())
}


def saved(key):
    shape, spec, _ = LEAVES[key]
    sharding = NamedSharding(save_mesh, spec)
    return jax.make_array_from_callback(shape, sharding, lambda i: values[key][i])


with ocp.CheckpointManager(f'{workdir}/run') as manager:
    manager.save(1, args=ocp.args.StandardSave(nest({key: saved(key) for key in LEAVES})))
    manager.wait_until_finished()
path = f'{workdir}/run/1/default'
chunk_shapes = {key: list(osurg.OrbaxCheckpoint(path).arrays[key].chunk_shape) for key in LEAVES}
for key in LEAVES:
    if key.startswith('layers/'):
        assert chunk_shapes[key][0] == 1, f'{key} is stored with chunks {chunk_shapes[key]}'

# The unrolled target: `layers_{i}/...` for each layer, plus `embed` as saved.
target_flat = {
    'embed': jax.ShapeDtypeStruct((V, D), np.float32, sharding=NamedSharding(mesh, P('x')))
}
expected = {'embed': values['embed']}
for key, (shape, _, spec) in LEAVES.items():
    if not key.startswith('layers/'):
        continue
    for i in range(L):
        name = key.replace('layers/', f'layers_{i}/', 1)
        target_flat[name] = jax.ShapeDtypeStruct(
            shape[1:], np.float32, sharding=NamedSharding(mesh, spec)
        )
        expected[name] = values[key][i]
target = nest(target_flat)
rules = [osurg.Unstack(r'layers/(.*)', r'layers_{i}/\1')]


def needed_bytes(process):
    """Bytes the shards of `process` hold, each distinct region counted once."""
    total = 0
    for leaf in target_flat.values():
        regions = {
            tuple(s.indices(dim) for s, dim in zip(index, leaf.shape, strict=True))
            for device, index in leaf.sharding.devices_indices_map(leaf.shape).items()
            if device.process_index == process
        }
        for region in regions:
            total += int(np.prod([len(range(*r)) for r in region])) * leaf.dtype.itemsize
    return total


me, other = jax.process_index(), 1 - jax.process_index()
plan = osurg.plan_restore(path, target, rules)
assert not plan.errors, plan.errors

before = file_bytes_read()
with ocp.CheckpointManager(f'{workdir}/run') as manager:  # a new one: see README
    out = manager.restore(1, args=osurg.SurgeryRestore(target=target, rules=rules))
read = file_bytes_read() - before

checked = 0
for name, want in expected.items():
    node = out
    for part in name.split('/'):
        node = node[part]
    assert node.sharding == target_flat[name].sharding, (name, node.sharding)
    assert node.shape == want.shape and node.dtype == want.dtype, (name, node.shape, node.dtype)
    for shard in node.addressable_shards:
        got = np.asarray(shard.data)
        # Bit for bit: compare the raw bits, not float values.
        np.testing.assert_array_equal(got.view(np.uint32), want[shard.index].view(np.uint32))
        checked += 1

print(
    json.dumps(
        {
            'process': me,
            'shards_checked': checked,
            'bytes_read': read,
            'bytes_needed': needed_bytes(me),
            'planned_needed': plan.reads[me].needed,
            'planned_chunked': plan.reads[me].chunked,
            'needed_other': needed_bytes(other),
            'planned_needed_other': plan.reads[other].needed,
            'checkpoint_bytes': sum(v.nbytes for v in values.values()),
            'chunk_shapes': chunk_shapes,
        }
    )
)
