"""Safetensors exports into object storage: each file one upload, the index last."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orbax_surgery as osurg

RNG = np.random.default_rng(0)
TREE = {
    f'layer_{i}': {'kernel': RNG.standard_normal((48, 32)).astype(np.float32)} for i in range(3)
}
TREE['norm'] = {'scale': RNG.standard_normal(32).astype(np.float32)}


@pytest.fixture(params=['s3', 'gcs'])
def bucket(request):
    return request.getfixturevalue(request.param)()


def downloaded(directory: str, tmp_path) -> dict[str, np.ndarray]:
    """Every tensor of an export, read by the safetensors library from a downloaded copy."""
    out = {}
    for file in epath.Path(directory).glob('*.safetensors'):
        local = tmp_path / file.name
        local.write_bytes(file.read_bytes())
        out |= safetensors.numpy.load_file(str(local))
    return out


@pytest.mark.parametrize('shard_size', ['1MB', '10KB'], ids=['one-file', 'sharded'])
def test_a_live_sharded_tree_exports_into_a_bucket(bucket, shard_size, mesh8, tmp_path):
    live = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh8, P('x'))), TREE)
    out = osurg.save_safetensors(live, f'{bucket}/hf', max_shard_size=shard_size)
    names = set(out.files)
    stored = {p.name for p in epath.Path(f'{bucket}/hf').iterdir()}
    assert stored == names
    assert ('model.safetensors.index.json' in names) == (shard_size == '10KB')
    got = downloaded(f'{bucket}/hf', tmp_path)
    for key, value in osurg.apply_rules(TREE).items():
        for name, array in value.items():
            np.testing.assert_array_equal(got[f'{key}.{name}'], array)
    back = osurg.restore(f'{bucket}/hf')
    np.testing.assert_array_equal(back['layer_2']['kernel'], TREE['layer_2']['kernel'])


def test_an_orbax_checkpoint_in_a_bucket_converts_to_safetensors_in_a_bucket(bucket):
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(f'{bucket}/orbax', TREE)
    out = osurg.save_safetensors(f'{bucket}/orbax', f'{bucket}/hf', rules=osurg.to_pytorch())
    assert out.files == ('model.safetensors',)
    back = osurg.restore(f'{bucket}/hf')  # PyTorch's names and layouts: layer.1.weight
    np.testing.assert_array_equal(back['layer']['1']['weight'], TREE['layer_1']['kernel'].T)


def test_an_existing_model_is_kept_unless_overwritten_and_then_fully_replaced(s3):
    bucket = s3()
    osurg.save_safetensors(TREE, f'{bucket}/hf', max_shard_size='10KB', checksums=True)
    with pytest.raises(osurg.DestinationExistsError, match=rf'{bucket}/hf holds a model'):
        osurg.save_safetensors(TREE, f'{bucket}/hf')
    small = {'norm': TREE['norm']}
    out = osurg.save_safetensors(small, f'{bucket}/hf', overwrite=True)
    # The old shards and the old checksums went; what is left reads as the new model.
    assert {p.name for p in epath.Path(f'{bucket}/hf').iterdir()} == set(out.files)
    assert set(osurg.SafetensorsCheckpoint(f'{bucket}/hf').arrays) == {'norm/scale'}


def test_checksums_are_recorded_and_verified_in_a_bucket(bucket):
    osurg.save_safetensors(TREE, f'{bucket}/hf', max_shard_size='10KB', checksums=True)
    out = osurg.restore(f'{bucket}/hf', verify=True)
    np.testing.assert_array_equal(out['norm']['scale'], TREE['norm']['scale'])


def test_an_interrupted_export_leaves_no_index_and_the_next_one_completes(s3):
    bucket = s3()
    calls = []

    def fail_midway(nbytes):
        calls.append(nbytes)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        osurg.save_safetensors(TREE, f'{bucket}/hf', max_shard_size='10KB', progress=fail_midway)
    left = (
        [p.name for p in epath.Path(f'{bucket}/hf').iterdir()]
        if epath.Path(f'{bucket}/hf').exists()
        else []
    )
    assert 'model.safetensors.index.json' not in left and 'model.safetensors' not in left
    with pytest.raises(osurg.CheckpointNotFoundError):
        osurg.restore(f'{bucket}/hf')
    out = osurg.save_safetensors(TREE, f'{bucket}/hf', max_shard_size='10KB')
    assert {p.name for p in epath.Path(f'{bucket}/hf').iterdir()} == set(out.files)
    assert not any('.tmp-' in p.name for p in epath.Path(bucket).iterdir())


def test_config_files_of_a_hugging_face_source_come_along(bucket, tmp_path):
    source = tmp_path / 'hf'
    osurg.save_safetensors(TREE, source)
    (source / 'config.json').write_text(json.dumps({'model_type': 'llama'}))
    (source / 'generation_config.json').write_text('{}')
    osurg.save_safetensors(str(source), f'{bucket}/hf')
    copied = json.loads((epath.Path(f'{bucket}/hf') / 'config.json').read_text())
    assert copied == {'model_type': 'llama'}
    local = osurg.save_safetensors(str(source), tmp_path / 'again')
    assert (local.directory / 'generation_config.json').exists()


def test_http_destinations_are_refused(tmp_path):
    with pytest.raises(osurg.SurgeryError, match='HTTP servers are read-only here'):
        osurg.save_safetensors(TREE, 'https://example.com/models/x')
