"""One process of the 2-process export test: each process writes only its own bytes.

Both processes save a Flax-named tree of sharded jax.Arrays with plain Orbax, then
export it to safetensors twice: the live arrays (each process writes the shards it
holds) and the saved checkpoint (whole tensors spread over the processes by bytes),
both with checksums (each process hashes its turn of the blocks, read back).
Every positioned write is counted; process 0 reads the results back with the
`safetensors` library and compares them with the expected PyTorch-layout arrays,
and reads them again verified against the checksums.
"""

import asyncio
import json
import os

import jax
from job import join

workdir = join().workdir

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import safetensors.numpy  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import orbax_surgery as osurg  # noqa: E402
from orbax_surgery.arrays import regions  # noqa: E402
from orbax_surgery.huggingface.export import save_safetensors  # noqa: E402
from orbax_surgery.keys import nest  # noqa: E402
from orbax_surgery.read.checksum_records import CHECKSUMS_DIR  # noqa: E402
from orbax_surgery.read.verify import verified  # noqa: E402

mesh = Mesh(np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id))), ('x',))
# key: (shape, dtype, spec). Kernels sharded on their output axis write contiguous rows
# once transposed; attn's rows sharded become column blocks: one run per row.
LEAVES = {
    'embed/embedding': ((256, 64), np.float32, P('x')),
    'layers_0/attn/kernel': ((64, 64), np.float32, P('x')),
    'layers_0/mlp/kernel': ((64, 256), np.float32, P(None, 'x')),
    'layers_0/norm/scale': ((64,), np.float32, P()),
    'lm_head/kernel': ((64, 128), ml_dtypes.bfloat16, P(None, 'x')),
}
values = {
    key: np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    for seed, (key, (shape, dtype, _)) in enumerate(LEAVES.items())
}
live = nest(
    {
        key: jax.make_array_from_callback(
            shape, NamedSharding(mesh, spec), lambda i, key=key: values[key][i]
        )
        for key, (shape, _, spec) in LEAVES.items()
    }
)
with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(f'{workdir}/orbax', live)

expected = {}
for key, value in values.items():
    module, leaf = key.replace('layers_0', 'layers/0').rsplit('/', 1)
    name = module.replace('/', '.') + '.weight'  # kernel, scale and embedding alike
    expected[name] = value.T if value.ndim == 2 and key.endswith('kernel') else value

written = {'count': 0}
real_pwrite = os.pwrite


def counting_pwrite(fd, data, at):
    done = real_pwrite(fd, data, at)
    written['count'] += done
    return done


os.pwrite = counting_pwrite


def export(source, name, **kwargs):
    before = written['count']
    progress = []
    out = save_safetensors(
        source, f'{workdir}/{name}', rules=osurg.to_pytorch(), progress=progress.append, **kwargs
    )
    pwritten = written['count'] - before
    assert pwritten == out.bytes_written == sum(progress), (name, pwritten, out, sum(progress))
    matches = None
    if jax.process_index() == 0:
        got = {}
        for file in out.files:
            if file.endswith('.safetensors'):
                got.update(safetensors.numpy.load_file(f'{workdir}/{name}/{file}'))
        assert sorted(got) == sorted(expected), sorted(got)
        for key, want in expected.items():
            assert got[key].dtype == want.dtype, (key, got[key].dtype)
            np.testing.assert_array_equal(got[key], want, err_msg=key)
        matches = True
    blocks = None
    if jax.process_index() == 0 and kwargs.get('checksums'):
        # Each process hashed its share, read back from the files; a verified read passes.
        folder = f'{workdir}/{name}/{CHECKSUMS_DIR}'
        blocks = {}
        for file in sorted(os.listdir(folder)):
            with open(f'{folder}/{file}') as f:
                arrays = json.load(f)['arrays'].values()
            blocks[file] = sum(len(r['blocks']) for r in arrays)
        source = verified(osurg.SafetensorsCheckpoint(f'{workdir}/{name}'))
        for key, src in source.arrays.items():
            got = asyncio.run(source.read(src, regions.full(src.shape)))
            np.testing.assert_array_equal(got, expected[key.replace('/', '.')], err_msg=key)
        assert source.bytes_read == out.total_size, (source.bytes_read, out.total_size)
    return {
        'checksum_blocks': blocks,
        'bytes_written': pwritten,
        'total_size': out.total_size,
        'files': list(out.files),
        'matches': matches,
        'leftovers': sorted(p for p in os.listdir(workdir) if '.tmp-' in p or '.old-' in p),
    }


# A strided slice of the row-sharded embedding: each process still has its rows.
strided = save_safetensors(
    live,
    f'{workdir}/strided',
    rules=[osurg.Drop('layers_0/.*|lm_head/.*'), osurg.Slice('embed/embedding', np.s_[:, ::2])],
)
if jax.process_index() == 0:
    got = safetensors.numpy.load_file(f'{workdir}/strided/model.safetensors')
    np.testing.assert_array_equal(got['embed.embedding'], values['embed/embedding'][:, ::2])
# A reshape loses the sharding: no process holds the whole embedding, and nothing is written.
try:
    save_safetensors(
        live,
        f'{workdir}/gathered',
        rules=[osurg.Drop('layers_0/.*|lm_head/.*'), osurg.Reshape('embed/embedding', (-1,))],
    )
    gather_error = None
except osurg.SurgeryError as e:
    gather_error = str(e)

results = {
    'strided_written': strided.bytes_written,
    'gather_error': gather_error,
    'gathered_exists': os.path.exists(f'{workdir}/gathered'),
    'process': jax.process_index(),
    'live': export(live, 'from_live', max_shard_size='40KB', checksums=True),
    'checkpoint': export(
        f'{workdir}/orbax', 'from_checkpoint', max_shard_size='40KB', checksums=True
    ),
    'overwrite': export(live, 'from_live', max_shard_size='1GB', overwrite=True),
}
multihost_utils.sync_global_devices('export_worker.done')
print(json.dumps(results))
