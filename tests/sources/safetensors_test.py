"""SafetensorsCheckpoint: headers only, exact region reads, sharded indexes, bad files."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from fixtures import axis_request, random_array, sds
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file

import orbax_surgery as osurg
from orbax_surgery.arrays import regions
from orbax_surgery.errors import CheckpointNotFoundError, DtypeMismatchError, SourceReadError
from orbax_surgery.huggingface.safetensors_file import write_file
from orbax_surgery.sources.safetensors import INDEX_FILE, SafetensorsCheckpoint

TENSORS = {
    'model.embed.weight': random_array((40, 16), seed=1),
    'model.layers.0.proj.weight': random_array((8, 6, 5), seed=2),
    'model.norm.weight': random_array((16,), seed=3).astype(ml_dtypes.bfloat16),
    'lm_head.bias': np.arange(7, dtype=np.int8),
    'scalar': np.array(3.5, np.float16),
}


@pytest.fixture(scope='module')
def single(tmp_path_factory):
    path = tmp_path_factory.mktemp('st') / 'model.safetensors'
    save_file(TENSORS, str(path), metadata={'format': 'pt'})
    return path


def sharded_dir(tmp_path, tensors=TENSORS, per_file=2):
    names = list(tensors)
    files = [names[i : i + per_file] for i in range(0, len(names), per_file)]
    weight_map = {}
    for n, group in enumerate(files):
        file = f'model-{n + 1:05d}-of-{len(files):05d}.safetensors'
        save_file({k: tensors[k] for k in group}, str(tmp_path / file))
        weight_map.update(dict.fromkeys(group, file))
    index = {'metadata': {'total_size': 0}, 'weight_map': weight_map}
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    return tmp_path


def test_opening_reads_headers_only_and_names_keys_with_slashes(single):
    src = SafetensorsCheckpoint(single)
    assert src.arrays['model/layers/0/proj/weight'].shape == (8, 6, 5)
    assert src.arrays['model/norm/weight'].dtype == np.dtype(ml_dtypes.bfloat16)
    assert src.arrays['scalar'].shape == ()
    assert src.metadata == {'model.safetensors': {'format': 'pt'}}
    assert src.bytes_read == 0


@st.composite
def reads(draw):
    name = draw(st.sampled_from(sorted(TENSORS)))
    region = tuple(draw(axis_request(n)) for n in TENSORS[name].shape)
    return name, region


@settings(max_examples=150, deadline=None)
@given(reads())
def test_any_region_reads_exactly_its_bytes(single, case):
    name, region = case
    src = SafetensorsCheckpoint(single)
    source = src.arrays[name.replace('.', '/')]
    got = src.read_now(source, region)
    want = regions.take(TENSORS[name], region)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    assert src.bytes_read == want.nbytes


def test_a_sharded_checkpoint_opens_from_its_directory_or_index(tmp_path):
    directory = sharded_dir(tmp_path)
    for path in (directory, directory / INDEX_FILE):
        src = SafetensorsCheckpoint(path)
        assert sorted(src.arrays) == sorted(k.replace('.', '/') for k in TENSORS)
        assert len(src.metadata) == 3


def test_restore_into_sharded_targets_reads_only_the_bytes_needed(tmp_path, mesh8):
    directory = sharded_dir(tmp_path)
    src = SafetensorsCheckpoint(directory)
    rows = NamedSharding(mesh8, P('x'))
    target = {'embed': sds((16, 40), sharding=NamedSharding(mesh8, P('x')))}
    rules = [
        osurg.Rename('model/embed/weight', 'embed'),
        osurg.Transpose('embed', (1, 0)),
        osurg.Drop('model/(layers|norm)/.*|lm_head/.*|scalar'),
    ]
    plan = osurg.plan_restore(src, target, rules)
    out = osurg.restore(src, target, rules)
    np.testing.assert_array_equal(out['embed'], TENSORS['model.embed.weight'].T)
    assert out['embed'].sharding == rows
    assert plan.reads[0].needed == plan.reads[0].chunked == src.bytes_read == 40 * 16 * 4


def test_bfloat16_and_small_dtypes_stay_exact(tmp_path):
    tensors = {
        'bf16': random_array((5, 3)).astype(ml_dtypes.bfloat16),
        'f8': random_array((4,)).astype(ml_dtypes.float8_e4m3fn),
        'u16': np.arange(6, dtype=np.uint16),
        'b': np.array([True, False]),
    }
    path = tmp_path / 'x.safetensors'
    write_file(path, tensors)
    out = osurg.restore(path)
    for name, value in tensors.items():
        assert out[name].dtype == value.dtype
        np.testing.assert_array_equal(np.asarray(out[name]), value)


def test_written_files_are_read_by_the_safetensors_library(tmp_path):
    from safetensors.numpy import load_file

    path = tmp_path / 'w.safetensors'
    write_file(path, {k: v for k, v in TENSORS.items()}, metadata={'format': 'pt'})
    loaded = load_file(str(path))
    for name, value in TENSORS.items():
        np.testing.assert_array_equal(loaded[name], value)


def test_a_target_dtype_the_tensor_does_not_hold_asks_for_a_cast(single):
    target = {'head': sds((7,), np.float32)}
    plan = osurg.plan_restore(single, target, [osurg.Rename('lm_head/bias', 'head')])
    assert any(isinstance(e, DtypeMismatchError) and 'Cast(' in str(e) for e in plan.errors)


# Bad files.


def write_raw(path, header, data=b''):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack('<Q', len(raw)) + raw + data)
    return path


def test_a_header_that_lies_about_sizes_names_the_tensor(tmp_path):
    header = {'w': {'dtype': 'F32', 'shape': [4, 4], 'data_offsets': [0, 32]}}
    path = write_raw(tmp_path / 'a.safetensors', header, bytes(64))
    with pytest.raises(SourceReadError, match=r"'w' is F32\[4, 4\] \(64 bytes\).*0\.\.32.*lies"):
        SafetensorsCheckpoint(path)


def test_a_truncated_file_names_the_tensor_and_sizes(tmp_path):
    header = {'w': {'dtype': 'F32', 'shape': [4, 4], 'data_offsets': [0, 64]}}
    path = write_raw(tmp_path / 'b.safetensors', header, bytes(40))
    with pytest.raises(SourceReadError, match=r"truncated: 'w' needs data bytes up to 64.*40"):
        SafetensorsCheckpoint(path)
    short = tmp_path / 'c.safetensors'
    short.write_bytes(b'\x05\x00')
    with pytest.raises(SourceReadError, match='too short for a header'):
        SafetensorsCheckpoint(short)


def test_a_header_size_beyond_the_file_or_not_json(tmp_path):
    path = tmp_path / 'd.safetensors'
    path.write_bytes(struct.pack('<Q', 10**6) + b'{}')
    with pytest.raises(SourceReadError, match='header is 1000000 bytes, but the file has 10'):
        SafetensorsCheckpoint(path)
    path.write_bytes(struct.pack('<Q', 3) + b'{x}')
    with pytest.raises(SourceReadError, match='not JSON'):
        SafetensorsCheckpoint(path)


def test_an_unknown_dtype_is_named(tmp_path):
    header = {'w': {'dtype': 'C64', 'shape': [1], 'data_offsets': [0, 8]}}
    path = write_raw(tmp_path / 'e.safetensors', header, bytes(8))
    with pytest.raises(SourceReadError, match="'w' has dtype 'C64'"):
        SafetensorsCheckpoint(path)


def test_a_missing_shard_named_in_the_index(tmp_path):
    directory = sharded_dir(tmp_path)
    (directory / 'model-00002-of-00003.safetensors').unlink()
    with pytest.raises(
        CheckpointNotFoundError, match=r'model-00002-of-00003.*should hold 2 tensors'
    ):
        SafetensorsCheckpoint(directory)


def test_an_index_naming_a_tensor_its_file_lacks(tmp_path):
    directory = sharded_dir(tmp_path)
    index = json.loads((directory / INDEX_FILE).read_text())
    index['weight_map']['model.extra.weight'] = 'model-00001-of-00003.safetensors'
    (directory / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(SourceReadError, match=r"puts 'model.extra.weight' in .*no such tensor"):
        SafetensorsCheckpoint(directory)


def test_a_directory_in_place_of_a_file_and_a_missing_path(tmp_path):
    (tmp_path / 'model.safetensors').mkdir()
    with pytest.raises(SourceReadError, match='is a directory'):
        SafetensorsCheckpoint(tmp_path / 'model.safetensors')
    with pytest.raises(CheckpointNotFoundError, match='does not exist'):
        SafetensorsCheckpoint(tmp_path / 'nothing.safetensors')


def test_a_file_truncated_after_opening_fails_the_read_clearly(tmp_path):
    path = tmp_path / 'f.safetensors'
    write_file(path, {'w': random_array((64, 64))})
    src = SafetensorsCheckpoint(path)
    with open(path, 'r+b') as f:
        f.truncate(200)
    with pytest.raises(SourceReadError, match=r"Reading 'w' from .*failed"):
        src.read_now(src.arrays['w'], regions.full((64, 64)))


def test_open_source_tells_orbax_from_safetensors(single, tmp_path):
    from fixtures import save

    from orbax_surgery.sources.open import open_source
    from orbax_surgery.sources.orbax_checkpoint import OrbaxCheckpoint

    assert isinstance(open_source(single), SafetensorsCheckpoint)
    assert isinstance(open_source(save(tmp_path / 'o', {'w': np.ones(3)})), OrbaxCheckpoint)


def test_tied_weights_read_once(tmp_path, mesh8):
    path = tmp_path / 'tied.safetensors'
    embedding = random_array((40, 16), seed=4)
    write_file(path, {'embed.weight': embedding})
    src = SafetensorsCheckpoint(path)
    target = {
        'embed': {'embedding': sds((40, 16), sharding=NamedSharding(mesh8, P('x')))},
        'lm_head': {'kernel': sds((16, 40), sharding=NamedSharding(mesh8, P(None, 'x')))},
    }
    rules = [
        osurg.Rename('embed/weight', 'embed/embedding'),
        osurg.Copy('embed/embedding', 'lm_head/kernel'),
        osurg.Transpose('lm_head/kernel', (1, 0)),
    ]
    out = osurg.restore(src, target, rules)
    np.testing.assert_array_equal(out['lm_head']['kernel'], embedding.T)
    np.testing.assert_array_equal(out['embed']['embedding'], embedding)
    assert src.bytes_read == embedding.nbytes  # Each row block once, for both targets.


def test_an_orbax_checkpointer_restores_a_hugging_face_directory(tmp_path, mesh8):
    import orbax.checkpoint as ocp

    directory = sharded_dir(tmp_path)
    target = {'embed': sds((40, 16), sharding=NamedSharding(mesh8, P('x')))}
    rules = [
        osurg.Rename('model/embed/weight', 'embed'),
        osurg.Drop('model/(layers|norm)/.*|lm_head/.*|scalar'),
    ]
    with ocp.Checkpointer(osurg.SurgeryCheckpointHandler()) as ckptr:
        out = ckptr.restore(directory, args=osurg.SurgeryRestore(target=target, rules=rules))
    np.testing.assert_array_equal(out['embed'], TENSORS['model.embed.weight'])
