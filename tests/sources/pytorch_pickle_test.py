"""PyTorchCheckpoint: torch.save files read lazily by exact byte ranges, no pickled code run."""

import argparse
import json
import os
import pickle
import zipfile

import jax
import ml_dtypes
import numpy as np
import object_stores
import pytest
from fixtures import axis_request, sds
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orbax_surgery as osurg
from orbax_surgery.arrays import regions
from orbax_surgery.errors import SourceReadError
from orbax_surgery.keys import nest
from orbax_surgery.sources import file_reads, pytorch_pickle
from orbax_surgery.sources.open import open_source

torch = pytest.importorskip('torch')


def numpy(tensor):
    """What a tensor holds, as NumPy (bfloat16 through float32, exactly)."""
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.float().numpy().astype(ml_dtypes.bfloat16)
    if tensor.dtype == torch.float8_e4m3fn:  # Saved through an untyped storage.
        return tensor.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return tensor.numpy()


def tree():
    """A nested checkpoint: dtypes, a Parameter, saved views, tied and non-tensor leaves."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(12, 10, generator=gen)
    tied = torch.randn(16, 8, generator=gen)
    return {
        'model': {
            'embed.weight': torch.randn(40, 16, generator=gen),
            'layers.0.proj.weight': torch.randn(8, 6, 5, generator=gen),
            'norm.weight': torch.randn(16, generator=gen).to(torch.bfloat16),
            'half': torch.randn(6, 4, generator=gen).half(),
            'ids': torch.arange(30, dtype=torch.int64).reshape(5, 6),
            'f8': torch.randn(4, 5, generator=gen).to(torch.float8_e4m3fn),
            'param': torch.nn.Parameter(torch.randn(7, 3, generator=gen)),
            'transposed': base.t(),  # Not contiguous: read as base rows, transposed back.
            'tail': base[2:],  # Shares base's storage from element 20 on.
            'every_other': base[:, ::2],  # No axis order makes it contiguous.
            'expanded': torch.randn(3, 1, generator=gen).expand(3, 4),  # Stride 0.
            'scalar': torch.tensor(2.5),
        },
        'tied': {'a': tied, 'b': tied},
        'step': 7,
        'name': 'run-1',
        'optimizer': {'state': {}, 'param_groups': [{'lr': 0.1}]},
    }


def expected():
    """The tensors of `tree()` by key, as NumPy arrays."""
    t = tree()
    out = {f'model/{k.replace(".", "/")}': numpy(v) for k, v in t['model'].items()}
    out |= {f'tied/{k}': numpy(v) for k, v in t['tied'].items()}
    return out


TREE = tree()
WANT = expected()


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp('pt') / 'checkpoint.pt'
    torch.save(TREE, path)
    return path


def test_opening_reads_the_tree_and_skips_what_is_not_a_tensor(saved):
    src = osurg.PyTorchCheckpoint(saved)
    assert sorted(src.arrays) == sorted(WANT)
    for key, want in WANT.items():
        assert (src.arrays[key].shape, src.arrays[key].dtype) == (want.shape, want.dtype), key
    assert src.skipped == {'step': 'int', 'name': 'str', 'optimizer/param_groups/0/lr': 'float'}
    assert src.bytes_read == 0
    strided = {'model/every_other', 'model/expanded'}  # Read through the span they cover.
    assert {k for k, s in src.arrays.items() if not s.byte_ranges} == strided
    assert all(s.chunk_shape is None for s in src.arrays.values())  # As safetensors'.
    assert repr(src) == f"PyTorchCheckpoint('{saved}', {len(WANT)} tensors)"
    assert isinstance(open_source(saved), osurg.PyTorchCheckpoint)


@st.composite
def reads(draw):
    key = draw(st.sampled_from(sorted(WANT)))
    return key, tuple(draw(axis_request(n)) for n in WANT[key].shape)


@settings(max_examples=120, deadline=None)
@given(reads())
def test_any_region_of_any_tensor_equals_torch(saved, case):
    key, region = case
    src = osurg.PyTorchCheckpoint(saved)
    got = src.read_now(src.arrays[key], region)
    want = regions.take(WANT[key], region)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    if src.arrays[key].byte_ranges:
        assert src.bytes_read == want.nbytes


@pytest.fixture
def preads(monkeypatch):
    """Bytes read from local files by positioned reads (how LocalFile reads a few runs)."""
    box = [0]
    pread = os.preadv

    def counting(fd, buffers, at):
        got = pread(fd, buffers, at)
        box[0] += got
        return got

    monkeypatch.setattr(os, 'preadv', counting)
    return box


def test_a_region_reads_exactly_its_bytes_from_the_file(saved, preads):
    src = osurg.PyTorchCheckpoint(saved)
    embed = src.arrays['model/embed/weight']
    preads[0] = 0
    src.read_now(embed, (range(8, 16), range(16)))
    assert preads[0] == 8 * 16 * 4 + 30  # and the member's local header, once
    preads[0] = 0
    got = src.read_now(embed, (range(0, 40, 5), range(3, 7)))
    assert preads[0] == 8 * 4 * 4  # 8 runs of 4 floats, nothing between them
    np.testing.assert_array_equal(got, WANT['model/embed/weight'][::5, 3:7])
    preads[0] = 0
    src.read_now(src.arrays['model/transposed'], (range(10), range(4, 6)))  # base rows 4..5
    assert preads[0] == 2 * 10 * 4 + 30


def test_restore_plans_and_reads_exactly_each_shards_bytes(saved, mesh8):
    src = osurg.PyTorchCheckpoint(saved)
    target = {
        'embed': sds((16, 40), sharding=NamedSharding(mesh8, P('x'))),
        'proj': sds((8, 6, 5), sharding=NamedSharding(mesh8, P('x'))),
    }
    rules = [
        osurg.Rename('model/embed/weight', 'embed'),
        osurg.Transpose('embed', (1, 0)),
        osurg.Rename('model/layers/0/proj/weight', 'proj'),
        osurg.Drop('model/.*|tied/.*'),
    ]
    plan = osurg.plan_restore(saved, target, rules)
    out = osurg.restore(src, target, rules)
    np.testing.assert_array_equal(out['embed'], WANT['model/embed/weight'].T)
    np.testing.assert_array_equal(out['proj'], WANT['model/layers/0/proj/weight'])
    assert out['embed'].sharding == target['embed'].sharding
    stored = (40 * 16 + 8 * 6 * 5) * 4
    assert plan.reads[0].needed == plan.reads[0].chunked == src.bytes_read == stored


def save_sharded_bin(state, directory, per_file):
    """`pytorch_model-0000i-of-0000n.bin` files and their index, as transformers 4 wrote them."""
    names = list(state)
    groups = [names[i : i + per_file] for i in range(0, len(names), per_file)]
    weight_map = {}
    for i, group in enumerate(groups):
        file = f'pytorch_model-{i + 1:05d}-of-{len(groups):05d}.bin'
        torch.save({n: state[n].contiguous() for n in group}, directory / file)
        weight_map |= dict.fromkeys(group, file)
    index = {'metadata': {'total_size': 0}, 'weight_map': weight_map}
    (directory / 'pytorch_model.bin.index.json').write_text(json.dumps(index))
    return directory


def test_a_sharded_bin_opens_from_its_directory_or_index(tmp_path):
    state = {n: v for n, v in TREE['model'].items() if n not in ('every_other', 'expanded', 'f8')}
    save_sharded_bin(state, tmp_path, per_file=3)
    for path in (tmp_path, tmp_path / 'pytorch_model.bin.index.json'):
        src = open_source(path)
        assert isinstance(src, osurg.PyTorchCheckpoint)
        assert sorted(src.arrays) == sorted(n.replace('.', '/') for n in state)
    out = osurg.restore(tmp_path, None, [osurg.Drop('ids')])  # int64: JAX holds no such
    np.testing.assert_array_equal(out['tail'], WANT['model/tail'])
    np.testing.assert_array_equal(out['norm']['weight'], WANT['model/norm/weight'])
    (tmp_path / 'pytorch_model-00002-of-00003.bin').unlink()
    with pytest.raises(osurg.CheckpointNotFoundError, match=r'00002-of-00003.*3 tensors'):
        osurg.PyTorchCheckpoint(tmp_path)


def test_safetensors_win_when_a_directory_holds_both(tmp_path):
    from orbax_surgery.huggingface.safetensors_file import write_file

    torch.save({'w': torch.ones(2)}, tmp_path / 'pytorch_model.bin')
    assert isinstance(open_source(tmp_path), osurg.PyTorchCheckpoint)
    write_file(tmp_path / 'model.safetensors', {'w': np.ones(2, np.float32)})
    assert isinstance(open_source(tmp_path), osurg.SafetensorsCheckpoint)


# Meta's model-parallel consolidated.NN.pth files.

LLAMA = {
    'tok_embeddings.weight': (32, 8),
    'layers.0.attention.wq.weight': (8, 8),
    'layers.0.attention.wk.weight': (4, 8),
    'layers.0.attention.wv.weight': (4, 8),
    'layers.0.attention.wo.weight': (8, 8),
    'layers.0.feed_forward.w1.weight': (12, 8),
    'layers.0.feed_forward.w2.weight': (8, 12),
    'layers.0.feed_forward.w3.weight': (12, 8),
    'layers.0.attention_norm.weight': (8,),
    'layers.0.ffn_norm.weight': (8,),
    'norm.weight': (8,),
    'output.weight': (32, 8),
    'rope.freqs': (2,),
}
AXES = {'tok_embeddings': 1, 'wo': 1, 'w2': 1, 'wq': 0, 'wk': 0, 'wv': 0, 'w1': 0, 'w3': 0}


def split_axis(name):
    """The axis Llama's reference code splits `name` along; None: replicated."""
    if name == 'output.weight':
        return 0
    return next((a for part, a in AXES.items() if part in name.split('.')), None)


@pytest.fixture(scope='module')
def consolidated(tmp_path_factory):
    """The full tensors, and a directory with them split in two as Llama's code saves them."""
    gen = torch.Generator().manual_seed(1)
    full = {n: torch.randn(*s, generator=gen).to(torch.bfloat16) for n, s in LLAMA.items()}
    directory = tmp_path_factory.mktemp('llama')
    for i in range(2):
        part = {}
        for name, value in full.items():
            axis = split_axis(name)
            part[name] = value if axis is None else value.chunk(2, dim=axis)[i].clone()
        torch.save(part, directory / f'consolidated.{i:02d}.pth')
    (directory / 'params.json').write_text(json.dumps({'dim': 8, 'n_layers': 1}))
    return {n.replace('.', '/'): numpy(v) for n, v in full.items()}, directory


@pytest.fixture
def files_read(monkeypatch):
    """The names of the local files each region read reads from."""
    seen = []
    read_region = file_reads.LocalFile.read_region

    def recording(self, *args):
        seen.append(os.path.basename(self.location))
        return read_region(self, *args)

    monkeypatch.setattr(file_reads.LocalFile, 'read_region', recording)
    return seen


def test_consolidated_parts_gather_into_whole_tensors(consolidated, files_read):
    full, directory = consolidated
    src = open_source(directory)
    assert isinstance(src, osurg.PyTorchCheckpoint)
    for key, want in full.items():
        assert src.arrays[key].shape == want.shape
        np.testing.assert_array_equal(src.read_now(src.arrays[key], regions.full(want.shape)), want)
    files_read.clear()
    before = src.bytes_read
    embed = src.arrays['tok_embeddings/weight']  # (32, 8) split on columns, 4 per file
    got = src.read_now(embed, (range(3, 20, 2), range(5, 8)))
    np.testing.assert_array_equal(got, full['tok_embeddings/weight'][3:20:2, 5:8])
    assert files_read == ['consolidated.01.pth']  # Only the file the region overlaps.
    assert src.bytes_read - before == got.nbytes
    files_read.clear()
    got = src.read_now(src.arrays['output/weight'], (range(14, 18), range(8)))
    assert files_read == ['consolidated.00.pth', 'consolidated.01.pth']
    np.testing.assert_array_equal(got, full['output/weight'][14:18])


def test_consolidated_restores_sharded_with_exact_reads(consolidated, mesh8):
    full, directory = consolidated
    flat = {k: sds(v.shape, v.dtype) for k, v in full.items()}
    flat['tok_embeddings/weight'] = sds((32, 8), ml_dtypes.bfloat16, NamedSharding(mesh8, P('x')))
    flat['output/weight'] = sds((32, 8), ml_dtypes.bfloat16, NamedSharding(mesh8, P(None, 'x')))
    target = nest(flat)
    plan = osurg.plan_restore(directory, target)
    out = osurg.restore(directory, target)
    np.testing.assert_array_equal(out['tok_embeddings']['weight'], full['tok_embeddings/weight'])
    np.testing.assert_array_equal(
        out['layers']['0']['feed_forward']['w2']['weight'], full['layers/0/feed_forward/w2/weight']
    )
    stored = sum(v.nbytes for v in full.values())
    assert plan.reads[0].needed == plan.reads[0].chunked == stored


def test_one_consolidated_file_reads_as_stored(consolidated):
    full, directory = consolidated
    src = osurg.PyTorchCheckpoint(directory / 'consolidated.01.pth')
    assert src.arrays['tok_embeddings/weight'].shape == (32, 4)
    got = src.read_now(src.arrays['tok_embeddings/weight'], regions.full((32, 4)))
    np.testing.assert_array_equal(got, full['tok_embeddings/weight'][:, 4:])


def test_an_unknown_name_split_across_consolidated_files_is_refused(tmp_path):
    for i in range(2):
        torch.save({'adapter.weight': torch.ones(2, 2)}, tmp_path / f'consolidated.{i:02d}.pth')
    with pytest.raises(
        SourceReadError, match=r"'adapter.weight' is in 2 consolidated.*wq/wk/wv.*Open a single"
    ):
        osurg.PyTorchCheckpoint(tmp_path)


# Files refused, and why.


def zip_like_torch(path, pickled, members=()):
    """A zip laid out as torch.save lays it out, holding the given pickle."""
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as z:
        z.writestr('archive/data.pkl', pickled)
        z.writestr('archive/byteorder', 'little')
        for name, data in members:
            z.writestr(f'archive/{name}', data)
        z.writestr('archive/version', '3\n')
    return path


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / 'pwned'
    payload = pickle.dumps({'w': Evil(marker)}, protocol=2)
    path = zip_like_torch(tmp_path / 'pytorch_model.bin', payload)
    with pytest.raises(SourceReadError, match=r"refuses to load '(posix|os)\.system'.*never exec"):
        osurg.restore(path)
    assert not marker.exists()
    torch.save({'w': torch.ones(1), 'args': argparse.Namespace(lr=1)}, path)
    with pytest.raises(SourceReadError, match=r"pytorch_model.bin: refuses.*'argparse.Namespace'"):
        osurg.PyTorchCheckpoint(path)


@pytest.mark.parametrize(
    'build',
    [
        b'ctorch.storage\nUntypedStorage\n}X\x05\x00\x00\x00dtypeK\x01sb',  # a record's fields
        b'ctorch._utils\n_rebuild_tensor_v2\nN}X\x05\x00\x00\x00_funcK\x01s\x86b',  # a function's
        b'ctorch._utils\n_rebuild_tensor_v2\n}X\x0c\x00\x00\x00__defaults__K\x01sb',
    ],
)
def test_a_pickle_cannot_alter_the_reader_for_later_files(tmp_path, saved, build):
    path = zip_like_torch(tmp_path / 'build.pt', b'\x80\x02' + build + b'.')
    with pytest.raises(SourceReadError, match=r'build.pt: its pickle \(data.pkl\) is malformed'):
        osurg.PyTorchCheckpoint(path)
    untyped = pytorch_pickle._ALLOWED['torch.storage', 'UntypedStorage']
    assert untyped == pytorch_pickle.TorchDtype('UntypedStorage', np.dtype(np.uint8), True)
    src = osurg.PyTorchCheckpoint(saved)  # Read as before.
    for key in ('model/ids', 'model/f8'):
        got = src.read_now(src.arrays[key], regions.full(WANT[key].shape))
        np.testing.assert_array_equal(got, WANT[key])


def test_a_legacy_torch_save_file_is_refused_with_the_fix(tmp_path):
    path = tmp_path / 'old.pt'
    torch.save({'w': torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(SourceReadError, match=r'old.pt is a legacy torch.save.*torch >= 1.6.*safe'):
        osurg.PyTorchCheckpoint(path)


def test_truncated_files_and_missing_members_name_the_file_key_and_bytes(saved, tmp_path):
    data = saved.read_bytes()
    cut = tmp_path / 'cut.pt'
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceReadError, match=r'cut.pt starts as a zip .* truncated'):
        osurg.PyTorchCheckpoint(cut)
    with zipfile.ZipFile(saved) as z:
        prefix = z.namelist()[0].split('/')[0]
        kept = [(n, z.read(n)) for n in z.namelist() if n != f'{prefix}/data/0']
    damaged = tmp_path / 'damaged.pt'
    with zipfile.ZipFile(damaged, 'w') as z:
        for name, member in kept:
            z.writestr(name, member)
    with pytest.raises(
        SourceReadError,
        match=r"damaged.pt: 'model.embed.weight' \(float32\[40, 16\]\) lies in bytes 0..2560 "
        r'of the zip member checkpoint/data/0, which the archive lacks',
    ):
        osurg.PyTorchCheckpoint(damaged)


def repack(source, dest, rewrite=lambda name, data: data, comment=b''):
    """`source`'s members written again by Python's zipfile (no alignment), maybe rewritten."""
    with zipfile.ZipFile(source) as z:
        members = [(n, z.read(n)) for n in z.namelist()]
    with zipfile.ZipFile(dest, 'w', zipfile.ZIP_STORED) as z:
        for name, data in members:
            z.writestr(name, rewrite(name, data))
        z.comment = comment
    return dest


def test_zip64_archives_and_comments_read_alike(saved, tmp_path, monkeypatch):
    monkeypatch.setattr(zipfile, 'ZIP64_LIMIT', 64)  # Every offset and size in zip64 fields.
    path = repack(saved, tmp_path / 'zip64.pt', comment=b'a comment after the end record')
    monkeypatch.undo()
    with zipfile.ZipFile(path) as z:
        assert z.comment and all(b'\x01\x00' in info.extra[:2] for info in z.infolist()[1:])
    src = osurg.PyTorchCheckpoint(path)
    for key in ('model/embed/weight', 'model/transposed', 'model/every_other'):
        got = src.read_now(src.arrays[key], regions.full(WANT[key].shape))
        np.testing.assert_array_equal(got, WANT[key])


def test_a_big_endian_file_is_byteswapped(saved, tmp_path):
    with zipfile.ZipFile(saved) as z:
        prefix = z.namelist()[0].split('/')[0]
        loaded = pytorch_pickle.load(z.read(f'{prefix}/data.pkl'), 'x')
    storages = {t.storage.key: t.dtype for t in pytorch_pickle.flatten(loaded, 'x')[0].values()}

    def swapped(name, data):
        if name == f'{prefix}/byteorder':
            return b'big'
        key = name.removeprefix(f'{prefix}/data/')
        if key in storages:
            return np.frombuffer(data, storages[key]).byteswap().tobytes()
        return data

    src = osurg.PyTorchCheckpoint(repack(saved, tmp_path / 'big.pt', swapped))
    for key, want in WANT.items():
        np.testing.assert_array_equal(src.read_now(src.arrays[key], regions.full(want.shape)), want)


# Over HTTP, and a Hugging Face model.


def test_a_bin_over_http_reads_each_shards_bytes_by_range(tmp_path, mesh8):
    w = np.arange(64 * 48, dtype=np.float32).reshape(64, 48)
    torch.save({'w': torch.from_numpy(w), 'step': 3}, tmp_path / 'pytorch_model.bin')
    target = {'w': jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=NamedSharding(mesh8, P('x')))}
    with object_stores.range_server(tmp_path) as url:
        for where in (f'{url}/pytorch_model.bin', url):
            src = open_source(where)
            assert isinstance(src, osurg.PyTorchCheckpoint) and src.skipped == {'step': 'int'}
            before = object_stores.bytes_requested('http')[0]
            out = osurg.restore(src, target)
            requested = object_stores.bytes_requested('http')[0] - before
            np.testing.assert_array_equal(out['w'], w)
            assert requested == w.nbytes + 30  # The shards' bytes and the local header.
        src = osurg.PyTorchCheckpoint(url)
        before = object_stores.bytes_requested('http')[0]
        out = osurg.restore(src, None, [osurg.Slice('w', np.s_[8:16, 4:12])])
        np.testing.assert_array_equal(out['w'], w[8:16, 4:12])
        requested = object_stores.bytes_requested('http')[0] - before
        assert requested == 8 * 8 * 4 + 30  # 8 runs of 8 floats, nothing between them


def test_a_hugging_face_bin_restores_as_its_safetensors_do(tmp_path):
    transformers = pytest.importorskip('transformers')
    import hf_models

    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / 'st')
    (tmp_path / 'bin').mkdir()
    save_sharded_bin(model.state_dict(), tmp_path / 'bin', per_file=4)

    flax_model = hf_models.Llama(hf_models.LlamaConfig.of(config))
    ids = np.zeros((1, 4), np.int32)
    abstract = jax.eval_shape(flax_model.init, jax.random.key(0), ids)['params']
    mesh = jax.make_mesh((8,), ('x',))

    def sharded(leaf):  # Along the largest axis that divides evenly, if any.
        spec = [None] * leaf.ndim
        fits = [a for a, n in enumerate(leaf.shape) if n % 8 == 0]
        if fits:
            spec[max(fits, key=lambda a: leaf.shape[a])] = 'x'
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, P(*spec)))

    target = jax.tree.map(sharded, abstract)
    rules = osurg.from_pytorch(drop_prefix='model')
    from_bin = osurg.restore(tmp_path / 'bin', target, rules)
    from_st = osurg.restore(tmp_path / 'st', target, rules)
    leaves = jax.tree_util.tree_leaves_with_path(from_bin)
    assert len(leaves) == len(jax.tree.leaves(from_st)) > 8
    for (path, got), want in zip(leaves, jax.tree.leaves(from_st), strict=True):
        assert got.sharding == want.sharding, path
        np.testing.assert_array_equal(got, want, err_msg=str(path))
    src = osurg.PyTorchCheckpoint(tmp_path / 'bin')
    plan = osurg.plan_restore(src, target, rules)
    osurg.restore(src, target, rules)
    stored = sum(s.nbytes for s in src.arrays.values())
    assert src.bytes_read == plan.reads[0].needed == stored


def test_the_orbax_handler_and_inspect_read_pytorch_files(tmp_path, capsys):
    import orbax.checkpoint as ocp

    from orbax_surgery.cli import main as cli

    state = {'model.embed.weight': np.arange(12, dtype=np.float32).reshape(4, 3), 'step': 3}
    torch = pytest.importorskip('torch')
    path = tmp_path / 'pytorch_model.bin'
    torch.save(
        {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in state.items()}, path
    )
    rules = [osurg.Rename('model/embed/weight', 'embed/embedding')]
    with ocp.Checkpointer(osurg.SurgeryCheckpointHandler()) as checkpointer:
        args = osurg.SurgeryRestore(target=None, rules=rules)
        out = checkpointer.restore(tmp_path, args=args)  # Orbax takes directories.
    np.testing.assert_array_equal(out['embed']['embedding'], state['model.embed.weight'])
    assert cli.main(['inspect', str(path)]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f'PyTorch checkpoint {path}: 1 tensors, 48 B in 1 file; not tensors')
    assert 'skipped: step' in shown
