import asyncio
import os
import pathlib
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from fixtures import random_array, save, sharded

import orbax_surgery as osurg


def read(ckpt, key, region):
    return asyncio.run(ckpt.read(ckpt.arrays[key], region))


def test_opening_reads_shapes_dtypes_chunks_and_kinds(tmp_path, mesh8):
    tree = {
        'sharded': sharded(random_array((64, 16)), mesh8, 'x'),
        'host': np.arange(6, dtype=np.int32),
        'count': 3,
        'name': 'llama',
    }
    ocp.PyTreeCheckpointer().save(tmp_path / 'c', tree)
    ckpt = osurg.OrbaxCheckpoint(tmp_path / 'c')
    arrays = ckpt.arrays
    assert (arrays['sharded'].shape, arrays['sharded'].chunk_shape) == ((64, 16), (8, 16))
    assert [arrays[k].kind for k in ('sharded', 'host', 'count', 'name')] == [
        'jax.Array',
        'np.ndarray',
        'scalar',
        'scalar',
    ]
    assert arrays['host'].dtype == np.int32 and arrays['count'].dtype == np.int64
    assert read(ckpt, 'name', ()).item() == 'llama'
    assert 'OrbaxCheckpoint(' in repr(ckpt)


@pytest.mark.parametrize('ocdbt', [True, False], ids=['ocdbt', 'zarr'])
def test_reads_exactly_the_region_asked_for(tmp_path, ocdbt):
    value = random_array((12, 10))
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt)).save(
        tmp_path / 'c', {'w': value}
    )
    ckpt = osurg.OrbaxCheckpoint(tmp_path / 'c')
    for region in [(range(12), range(10)), (range(2, 9, 3), range(9, 0, -2)), (range(0), range(4))]:
        np.testing.assert_array_equal(
            read(ckpt, 'w', region), value[np.ix_(list(region[0]), list(region[1]))]
        )


def test_tree_source_serves_and_counts_reads():
    src = osurg.TreeSource({'w': np.arange(10.0), 'j': jax.numpy.ones(3)})
    assert src.arrays['j'].kind == 'jax.Array' and src.arrays['w'].kind == 'np.ndarray'
    np.testing.assert_array_equal(
        asyncio.run(src.read(src.arrays['w'], (range(2, 5),))), [2.0, 3.0, 4.0]
    )
    assert src.bytes_read['w'] == 3 * 8


def test_a_missing_directory_suggests_its_neighbours(tmp_path):
    save(tmp_path / 'checkpoint_100', {'w': np.ones(2)})
    with pytest.raises(
        osurg.CheckpointNotFoundError,
        match=r"checkpoint_10: it does not exist\. Did you mean 'checkpoint_100'",
    ):
        osurg.OrbaxCheckpoint(tmp_path / 'checkpoint_10')


def test_an_unfinalized_save_is_named_as_such(tmp_path):
    save(tmp_path / 'run' / '3.orbax-checkpoint-tmp-1234' / 'default', {'w': np.ones(2)})
    with pytest.raises(osurg.UnfinalizedCheckpointError, match='interrupted or is still running'):
        osurg.OrbaxCheckpoint(tmp_path / 'run' / '3' / 'default')
    with pytest.raises(osurg.UnfinalizedCheckpointError, match='temporary directory'):
        osurg.OrbaxCheckpoint(tmp_path / 'run' / '3.orbax-checkpoint-tmp-1234' / 'default')


def test_step_and_manager_directories_point_at_the_item(tmp_path):
    manager = ocp.CheckpointManager(tmp_path / 'run')
    manager.save(5, args=ocp.args.StandardSave({'w': np.ones(2)}))
    manager.wait_until_finished()
    with pytest.raises(
        osurg.CheckpointNotFoundError, match=re.escape("holding the items ['default']")
    ):
        osurg.OrbaxCheckpoint(tmp_path / 'run' / '5')
    with pytest.raises(osurg.CheckpointNotFoundError, match=re.escape("with steps ['5']")):
        osurg.OrbaxCheckpoint(tmp_path / 'run')


def test_a_file_or_a_plain_directory_is_not_a_checkpoint(tmp_path):
    (tmp_path / 'file').write_text('x')
    with pytest.raises(osurg.CheckpointNotFoundError, match='is a file'):
        osurg.OrbaxCheckpoint(tmp_path / 'file')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(osurg.CheckpointNotFoundError, match='no _METADATA'):
        osurg.OrbaxCheckpoint(tmp_path / 'empty')


def _largest_data_file(root: pathlib.Path) -> pathlib.Path:
    files = [p for p in root.rglob('*') if p.is_file() and p.parent.name in ('d', 'w')]
    return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.parametrize('ocdbt', [True, False], ids=['ocdbt', 'zarr'])
@pytest.mark.parametrize('damage', ['truncate', 'delete'])
def test_damaged_chunks_raise_source_read_error_naming_the_key(tmp_path, ocdbt, damage):
    value = random_array((256, 64))
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt)).save(
        tmp_path / 'c', {'w': value}
    )
    victim = _largest_data_file(tmp_path / 'c')
    if damage == 'truncate':
        os.truncate(victim, victim.stat().st_size // 2)
    else:
        victim.unlink()
    with pytest.raises(osurg.SourceReadError, match=re.escape("Reading 'w'[0:256, 0:64]")) as info:
        with ocp.Checkpointer(osurg.SurgeryCheckpointHandler()) as ckptr:
            ckptr.restore(tmp_path / 'c', args=osurg.SurgeryRestore(target={'w': ...}))
    assert str(tmp_path / 'c') in str(info.value)


def test_a_one_element_backward_slice_reads_one_element(tmp_path):
    """Found by the property test: TensorStore reads slice(0, None, -1) as two elements."""
    value = random_array((2,))
    path = save(tmp_path / 'c', {'w': value})
    with ocp.Checkpointer(osurg.SurgeryCheckpointHandler()) as ckptr:
        restored = ckptr.restore(
            path,
            args=osurg.SurgeryRestore(target={'w': ...}, rules=[osurg.Slice('w', np.s_[0::-1])]),
        )
    np.testing.assert_array_equal(restored['w'], value[0::-1])


def test_a_relative_orbax_path_is_opened(tmp_path, monkeypatch):
    save(tmp_path / 'ckpt', {'w': np.arange(3.0)})
    monkeypatch.chdir(tmp_path)
    np.testing.assert_array_equal(osurg.restore('ckpt')['w'], np.arange(3.0))
