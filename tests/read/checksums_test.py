"""Opt-in checksums: recorded per saved block, checked by verified restores."""

import asyncio
import json
import re
import shutil
import struct

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors
from fixtures import random_array
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orbax_surgery as osurg
from orbax_surgery.cli import main as cli
from orbax_surgery.cli.listing import describe
from orbax_surgery.huggingface import export_checksums
from orbax_surgery.huggingface.export import save_safetensors
from orbax_surgery.read.checksum_records import CHECKSUMS_DIR, digest
from orbax_surgery.read.verify import Verified, verified
from orbax_surgery.write.checksums import Recorder

W = random_array((256, 64), seed=1)


def save(path, item, *, ocdbt=True, **kwargs):
    with ocp.Checkpointer(osurg.SurgeryCheckpointHandler(use_ocdbt=ocdbt)) as ckptr:
        ckptr.save(path, args=osurg.SurgerySave(item=item, checksums=True, **kwargs))
    return path


def records(path):
    (file,) = (path / CHECKSUMS_DIR).iterdir()
    assert file.name == 'process_0.json'
    return json.loads(file.read_text())['arrays']


def flip(file, at=None):
    data = bytearray(file.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at] ^= 0x04
    file.write_bytes(bytes(data))


def test_numpy_leaves_and_scalars_are_hashed_whole_strings_not_at_all():
    recorder = Recorder()
    value = np.arange(12.0).reshape(3, 4)
    recorder.add_tree({'w': value, 'step': 3, 'name': 'llama'})
    w, step = recorder.records['w'], recorder.records['step']
    assert (w.shape, w.dtype, w.block_shape) == ((3, 4), 'float64', (3, 4))
    assert w.blocks == {(0, 0): digest(value)}
    assert (step.shape, step.dtype, step.blocks) == ((), 'int64', {(): digest(np.asarray(3))})
    assert 'name' not in recorder.records


def test_every_kind_of_leaf_round_trips_verified(tmp_path):
    tree = {
        'lr': 0.1,
        'step': 3,
        'flag': True,
        'np32': np.float32(1.5),
        'bf16': jax.numpy.ones((4, 4), jax.numpy.bfloat16),
        'i8': np.arange(6, dtype=np.int8),
        'j0': jax.numpy.float32(2.0),
        'name': 'llama',  # Not hashed, restored as is.
    }
    got = osurg.restore(save(tmp_path / 'c', tree), verify=True)
    assert jax.tree.map(lambda x: np.asarray(x).tolist(), got) == jax.tree.map(
        lambda x: np.asarray(x).tolist(), tree
    )
    assert sorted(records(tmp_path / 'c')) == sorted(set(tree) - {'name'})


def test_each_shard_of_a_jax_array_is_one_block_replicas_hashed_once(mesh2x4):
    value = jax.device_put(W, NamedSharding(mesh2x4, P('a', 'b')))
    replicated = jax.device_put(W, NamedSharding(mesh2x4, P(None, 'b')))
    recorder = Recorder()
    recorder.add_tree({'w': value, 'r': replicated})
    w, r = recorder.records['w'], recorder.records['r']
    assert w.block_shape == (128, 16) and len(w.blocks) == 8
    assert w.blocks[(1, 2)] == digest(W[128:, 32:48])
    assert r.block_shape == (256, 16) and sorted(r.blocks) == [(0, b) for b in range(4)]


def test_a_save_dtype_and_layer_chunks_are_what_is_hashed(tmp_path):
    layers = random_array((4, 8, 16), seed=2)
    path = save(
        tmp_path / 'c',
        {'layers': {'w': layers}},
        save_args={'layers': {'w': ocp.SaveArgs(dtype=np.dtype('float16'))}},
        layer_axes={'layers/.*': 0},
    )
    record = records(path)['layers/w']
    assert record['dtype'] == 'float16' and record['block_shape'] == [1, 8, 16]
    assert record['blocks']['2.0.0'] == digest(layers[2:3].astype(np.float16))
    source = verified(osurg.OrbaxCheckpoint(path))
    # The grid is the storage chunk grid: each block is read once, by one chunk read.
    assert source.arrays['layers/w'].chunk_shape == source.source.arrays['layers/w'].chunk_shape
    got = osurg.restore(source, {'layers': {'w': ...}})['layers']['w']
    np.testing.assert_array_equal(got, layers.astype(np.float16))


def test_a_planned_save_records_the_saved_tree(tmp_path):
    unrolled = {'layers_0': {'w': random_array((8, 4), seed=3)}, 'layers_1': {'w': W[:8, :4]}}
    stack = osurg.Stack(r'layers_{i}/(.*)', r'layers/\1')
    path = save(tmp_path / 'c', unrolled, rules=[stack], ocdbt=False)
    assert list(records(path)) == ['layers/w']
    restored = osurg.restore(path, verify=True)
    np.testing.assert_array_equal(restored['layers']['w'][1], W[:8, :4])
    flip(path / 'layers.w' / '0.0.0')
    with pytest.raises(osurg.SourceReadError, match=re.escape("'layers/w'")):
        osurg.restore(path, verify=True)


def test_verified_reads_serve_any_region_from_whole_blocks(tmp_path, mesh8):
    path = save(tmp_path / 'c', {'w': jax.device_put(W, NamedSharding(mesh8, P('x')))})
    source = verified(osurg.OrbaxCheckpoint(path))
    assert isinstance(source, Verified) and source.arrays['w'].chunk_shape == (32, 64)
    w = source.arrays['w']
    for region in [(range(30, 70), range(3, 9)), (range(200, 10, -7), range(63, 0, -5))]:
        got = asyncio.run(source.read(w, region))
        np.testing.assert_array_equal(got, W[np.ix_(list(region[0]), list(region[1]))])
    # The regions touch blocks 0..2 and 0..6, read whole: 3 + 7 blocks of 32 x 64 float32.
    assert source.bytes_read == 10 * 32 * 64 * 4
    # A restore into another sharding reads each block once per host (the Session shares).
    target = {
        'w': jax.ShapeDtypeStruct(W.shape, W.dtype, sharding=NamedSharding(mesh8, P(None, 'x')))
    }
    source = verified(osurg.OrbaxCheckpoint(path))
    got = osurg.restore(source, target)['w']
    np.testing.assert_array_equal(np.asarray(got), W)
    assert source.bytes_read == W.nbytes


def test_verify_needs_recorded_checksums_and_says_how(tmp_path):
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / 'plain', {'w': W})
    with pytest.raises(osurg.SourceReadError, match=r'saved without checksums.*checksums=True'):
        osurg.restore(tmp_path / 'plain', verify=True)
    from orbax_surgery.huggingface.safetensors_file import write_file

    (tmp_path / 'st').mkdir()
    write_file(tmp_path / 'st' / 'model.safetensors', {'w': W})
    with pytest.raises(osurg.SourceReadError, match=r'st holds no checksums.*--to safetensors'):
        osurg.restore(tmp_path / 'st' / 'model.safetensors', verify=True)
    with pytest.raises(osurg.SourceReadError, match='carries no checksums'):
        osurg.restore(osurg.TreeSource({'w': W}), verify=True)


def test_a_stored_shape_or_dtype_other_than_recorded_raises(tmp_path):
    save(tmp_path / 'a', {'w': W, 'b': np.ones(3)})
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / 'b', {'w': W.astype(np.float16), 'b': np.ones(3)})
    shutil.copytree(tmp_path / 'a' / CHECKSUMS_DIR, tmp_path / 'b' / CHECKSUMS_DIR)
    with pytest.raises(
        osurg.ChecksumMismatchError,
        match=r"'w' is stored as float16\[256, 64\], but was saved as float32\[256, 64\]",
    ):
        osurg.restore(tmp_path / 'b', verify=True)


def test_lost_or_damaged_checksum_files_are_named(tmp_path):
    path = save(tmp_path / 'c', {'w': W, 'b': np.ones(3)})
    file = path / CHECKSUMS_DIR / 'process_0.json'
    data = json.loads(file.read_text())
    del data['arrays']['w']['blocks']['0.0']
    file.write_text(json.dumps(data))
    with pytest.raises(osurg.SourceReadError, match=r"1 of the 1 blocks of 'w' are missing"):
        osurg.restore(path, verify=True)
    del data['arrays']['w']
    file.write_text(json.dumps(data))
    with pytest.raises(osurg.SourceReadError, match=r"no checksum recorded for 'w'"):
        osurg.restore(path, verify=True)
    file.write_text('{"garbage')
    with pytest.raises(osurg.SourceReadError, match=r'checksum file .*process_0.json is damaged'):
        osurg.restore(path, verify=True)


def test_plain_orbax_and_inspect_read_a_checkpoint_with_checksums(tmp_path):
    path = save(tmp_path / 'c', {'w': W, 'step': 3})
    with ocp.StandardCheckpointer() as ckptr:
        np.testing.assert_array_equal(ckptr.restore(path)['w'], W)
    assert [a['key'] for a in describe(path)['arrays']] == ['step', 'w']


def test_checkpoint_manager_and_composite_end_to_end(tmp_path, mesh8):
    state = {'w': jax.device_put(W, NamedSharding(mesh8, P('x'))), 'step': 7}
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(
            1,
            args=ocp.args.Composite(
                state=osurg.SurgerySave(item=state, checksums=True),
                meta=ocp.args.JsonSave({'lr': 0.1}),
            ),
        )
    target = {
        'W': jax.ShapeDtypeStruct(W.shape, W.dtype, sharding=NamedSharding(mesh8, P(None, 'x')))
    }
    args = ocp.args.Composite(
        state=osurg.SurgeryRestore(
            target=target, rules=[osurg.Rename('w', 'W'), osurg.Drop('step')], verify=True
        ),
        meta=ocp.args.JsonRestore(),
    )
    with ocp.CheckpointManager(tmp_path) as manager:
        got = manager.restore(1, args=args)
    np.testing.assert_array_equal(np.asarray(got.state['W']), W)
    assert got.meta == {'lr': 0.1}
    victim = max(
        (tmp_path / '1' / 'state' / 'ocdbt.process_0' / 'd').iterdir(),
        key=lambda p: p.stat().st_size,
    )
    flip(victim, at=100)
    with ocp.CheckpointManager(tmp_path) as manager, pytest.raises(osurg.SourceReadError) as info:
        manager.restore(1, args=args)
    assert "'w'" in str(info.value) and str(tmp_path / '1' / 'state') in str(info.value)


def test_lora_save_and_verified_lora_restore(tmp_path):
    base = {'dense': {'kernel': random_array((16, 8), seed=4)}}
    save(tmp_path / 'base', base)
    lora = osurg.LoraSpec(['dense/kernel'], rank=2, alpha=4).bind(base)
    trainable = {
        'dense': {
            'kernel_lora_a': random_array((16, 2), seed=5),
            'kernel_lora_b': random_array((2, 8), seed=6),
        }
    }
    with ocp.Checkpointer(osurg.LoraCheckpointHandler()) as ckptr:
        ckptr.save(
            tmp_path / 'adapters', args=osurg.LoraSave(item=trainable, lora=lora, checksums=True)
        )
        merged = ckptr.restore(
            tmp_path / 'adapters', args=osurg.LoraRestore(base=tmp_path / 'base', verify=True)
        )
    want = lora.merge(base, trainable)['dense']['kernel']
    np.testing.assert_allclose(merged['dense']['kernel'], want, rtol=1e-6)
    assert sorted(records(tmp_path / 'adapters')) == ['dense/kernel_lora_a', 'dense/kernel_lora_b']
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / 'plain_base', base)
    with (
        ocp.Checkpointer(osurg.LoraCheckpointHandler()) as ckptr,
        pytest.raises(osurg.SourceReadError, match='plain_base holds no checksums'),
    ):
        ckptr.restore(
            tmp_path / 'adapters', args=osurg.LoraRestore(base=tmp_path / 'plain_base', verify=True)
        )


def test_cli_convert_records_and_verifies_checksums(tmp_path, capsys):
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / 'src', {'w': W})
    assert (
        cli.main(['convert', str(tmp_path / 'src'), str(tmp_path / 'a'), '--checksums', '-q']) == 0
    )
    assert (tmp_path / 'a' / CHECKSUMS_DIR / 'process_0.json').exists()
    assert cli.main(['convert', str(tmp_path / 'a'), str(tmp_path / 'b'), '--verify', '-q']) == 0
    assert cli.main(['convert', str(tmp_path / 'src'), str(tmp_path / 'c'), '--verify', '-q']) == 2
    assert 'saved without checksums' in capsys.readouterr().err


@pytest.fixture(scope='module')
def pristine(tmp_path_factory):
    mesh = jax.make_mesh((8,), ('x',))
    out = {}
    for ocdbt in (True, False):
        path = tmp_path_factory.mktemp('c') / ('ocdbt' if ocdbt else 'zarr')
        save(path, {'w': jax.device_put(W, NamedSharding(mesh, P('x')))}, ocdbt=ocdbt)
        files = path.glob('ocdbt.process_0/d/*' if ocdbt else 'w/[0-9]*')
        out[ocdbt] = (path, sorted(files))
    return out


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ocdbt=st.booleans(),
    pick=st.integers(0, 10**9),
    at=st.floats(0, 1, exclude_max=True),
    mask=st.integers(1, 255),
)
def test_any_flipped_byte_of_stored_data_is_caught_or_unread(pristine, ocdbt, pick, at, mask):
    path, files = pristine[ocdbt]
    file = files[pick % len(files)]
    original = file.read_bytes()
    data = bytearray(original)
    data[int(at * len(data))] ^= mask
    file.write_bytes(bytes(data))
    try:
        got = osurg.restore(path, {'w': ...}, verify=True)
    except osurg.SourceReadError as e:
        assert "'w'" in str(e) and str(path) in str(e), e
        if isinstance(e, osurg.ChecksumMismatchError):
            assert re.search(r'block \(\d, 0\) \[\d+:\d+, 0:64\] does not match', str(e)), e
    else:
        np.testing.assert_array_equal(np.asarray(got['w']), W)  # The byte was not read.
    finally:
        file.write_bytes(original)


# Safetensors exports: digests of a fixed block grid, read back after every process wrote.

TENSORS = {
    'f32': random_array((40, 24), seed=7),
    'bf16': random_array((16, 8), seed=8).astype(ml_dtypes.bfloat16),
    'f16': random_array((5, 3, 2), seed=9).astype(np.float16),
    'i8': np.arange(-60, 60, dtype=np.int8).reshape(2, 60),
    'flag': np.array([True, False, True]),
    'scalar': np.asarray(2.5, np.float32),
    'empty': np.zeros((0, 4), np.float32),
}


def export(path, tree, **kwargs):
    return save_safetensors(tree, path, checksums=True, **kwargs).directory


def data_offset(file, name):
    """Where tensor `name`'s bytes start in a safetensors file."""
    raw = file.read_bytes()
    (n,) = struct.unpack('<Q', raw[:8])
    return 8 + n + json.loads(raw[8 : 8 + n])[name]['data_offsets'][0]


@pytest.mark.parametrize('shard_size', ['1GB', 600], ids=['one_file', 'indexed'])
def test_a_safetensors_export_round_trips_verified(tmp_path, monkeypatch, shard_size):
    # float32[40, 24]: 16 rows a block, 3 blocks.
    monkeypatch.setattr(export_checksums, 'SAFETENSORS_BLOCK_BYTES', 1536)
    path = export(tmp_path / 'hf', TENSORS, max_shard_size=shard_size)
    record = records(path)
    assert sorted(record) == sorted(TENSORS)
    assert record['f32']['block_shape'] == [16, 24] and len(record['f32']['blocks']) == 3
    assert record['f32']['blocks']['1.0'] == digest(TENSORS['f32'][16:32])
    assert record['bf16']['dtype'] == 'bfloat16' and record['scalar']['blocks'] == {
        '': digest(TENSORS['scalar'])
    }
    assert record['empty']['blocks'] == {}
    got = osurg.restore(path, verify=True)
    assert sorted(got) == sorted(TENSORS)
    for key, got_value in got.items():
        assert np.asarray(got_value).dtype == TENSORS[key].dtype, key
        np.testing.assert_array_equal(np.asarray(got_value), TENSORS[key], err_msg=key)
    # The plain readers still read it, the _CHECKSUMS/ directory beside the files ignored.
    loaded = {}
    for file in path.glob('*.safetensors'):
        with safetensors.safe_open(file, 'np') as f:
            loaded |= {k: f.get_tensor(k) for k in f.keys()}
    assert sorted(loaded) == sorted(TENSORS)
    np.testing.assert_array_equal(loaded['bf16'], TENSORS['bf16'])
    assert osurg.SafetensorsCheckpoint(path).arrays.keys() == TENSORS.keys()


def test_a_flipped_byte_of_a_tensor_names_key_file_block_and_region(tmp_path, monkeypatch):
    monkeypatch.setattr(export_checksums, 'SAFETENSORS_BLOCK_BYTES', 1024)  # W: 4 rows
    path = export(tmp_path / 'hf', {'w': W, 'b': np.ones(3, np.float32)}, max_shard_size=8)
    file = path / 'model-00002-of-00002.safetensors'
    assert osurg.SafetensorsCheckpoint(file).arrays.keys() == {'w'}
    flip(file, at=data_offset(file, 'w') + 4 * 64 * 4 * 5 + 7)  # In rows 20..23: block 5.
    message = r"hf: 'w' block \(5, 0\) \[20:24, 0:64\] does not match .*" + re.escape(
        f'(stored in {file}, bytes '
    )
    with pytest.raises(osurg.ChecksumMismatchError, match=message):
        osurg.restore(path, verify=True)
    # A read that needs no changed block passes; unverified reads do not notice.
    got = osurg.restore(path, {'b': ...}, [osurg.Drop('w')], verify=True)
    np.testing.assert_array_equal(got['b'], np.ones(3))
    osurg.restore(path)
    # One shard file opened alone is checked against its own tensors' records.
    with pytest.raises(osurg.ChecksumMismatchError, match=re.escape(str(file))):
        osurg.restore(file, verify=True)
    osurg.restore(path / 'model-00001-of-00002.safetensors', verify=True)


def test_a_changed_header_or_lost_checksums_are_errors(tmp_path):
    path = export(tmp_path / 'hf', {'w': W})
    (path / 'model.safetensors').unlink()
    from orbax_surgery.huggingface.safetensors_file import write_file

    write_file(path / 'model.safetensors', {'w': W[:, :32]})
    with pytest.raises(osurg.ChecksumMismatchError, match=r"'w' is stored as float32\[256, 32\]"):
        osurg.restore(path, verify=True)
    shutil.rmtree(path / CHECKSUMS_DIR)
    with pytest.raises(osurg.SourceReadError, match='saved without checksums'):
        osurg.restore(path, verify=True)


def test_a_sharded_target_reads_each_safetensors_block_once(tmp_path, mesh8, monkeypatch):
    monkeypatch.setattr(export_checksums, 'SAFETENSORS_BLOCK_BYTES', 4096)  # W: 16 rows
    path = export(tmp_path / 'hf', {'w': W})
    for spec in [P(None, 'x'), P('x'), P('x', None)]:
        source = verified(osurg.SafetensorsCheckpoint(path))
        assert source.arrays['w'].chunk_shape == (16, 64) and not source.arrays['w'].byte_ranges
        target = {'w': jax.ShapeDtypeStruct(W.shape, W.dtype, sharding=NamedSharding(mesh8, spec))}
        got = osurg.restore(source, target)['w']
        np.testing.assert_array_equal(np.asarray(got), W)
        assert source.bytes_read <= W.nbytes and source.source.bytes_read == W.nbytes, spec
    # Through the handler too.
    with ocp.Checkpointer(osurg.SurgeryCheckpointHandler()) as ckptr:
        got = ckptr.restore(path, args=osurg.SurgeryRestore(target=target, verify=True))
    np.testing.assert_array_equal(np.asarray(got['w']), W)


def test_a_failure_while_hashing_leaves_nothing_finalized(tmp_path, monkeypatch):
    def broken(block):
        raise OSError('read back failed')

    monkeypatch.setattr(export_checksums, 'digest', broken)
    with pytest.raises(OSError, match='read back failed'):
        export(tmp_path / 'hf', {'w': W})
    assert list(tmp_path.iterdir()) == []


def test_cli_converts_to_safetensors_with_checksums_and_verifies_them(tmp_path, capsys):
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / 'src', {'w': W, 'b': np.ones(3, np.float32)})
    argv = ['convert', str(tmp_path / 'src'), str(tmp_path / 'hf'), '--to', 'safetensors']
    assert cli.main([*argv, '--checksums', '-q', '--max-shard-size', '100']) == 0
    assert (tmp_path / 'hf' / CHECKSUMS_DIR / 'process_0.json').is_file()
    back = tmp_path / 'back'
    assert cli.main(['convert', str(tmp_path / 'hf'), str(back), '--verify', '-q']) == 0
    with ocp.StandardCheckpointer() as ckptr:
        np.testing.assert_array_equal(ckptr.restore(back)['w'], W)
    file = tmp_path / 'hf' / 'model-00002-of-00002.safetensors'
    flip(file, at=data_offset(file, 'w') + 100)
    assert cli.main(['convert', str(tmp_path / 'hf'), str(tmp_path / 'c'), '--verify', '-q']) == 2
    err = capsys.readouterr().err
    assert "'w' block (0, 0)" in err and str(file) in err and not (tmp_path / 'c').exists()
