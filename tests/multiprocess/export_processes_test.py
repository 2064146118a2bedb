from pathlib import Path

import pytest


@pytest.mark.multiprocess
def test_each_process_writes_only_its_part_of_the_safetensors_export(launch):
    results = launch(Path(__file__).with_name('export_worker.py'), n=2, devices=4)
    assert sorted(r['process'] for r in results) == [0, 1]
    total = (256 * 64 + 64 * 64 + 64 * 256 + 64) * 4 + 64 * 128 * 2
    for run in ('live', 'checkpoint', 'overwrite'):
        mine = [r[run]['bytes_written'] for r in results]
        # Every byte written once, by one process, and the work split about evenly.
        assert sum(mine) == total, (run, mine)
        assert all(0.4 * total <= b <= 0.6 * total for b in mine), (run, mine)
        assert all(r[run]['total_size'] == total for r in results), run
        # Process 0 read the files back with the safetensors library.
        assert results[0][run]['matches'], run
        assert results[0][run]['leftovers'] == [], run
    # 5 tensors of one block each, dealt in turn: 3 to process 0, 2 to process 1.
    for run in ('live', 'checkpoint'):
        assert results[0][run]['checksum_blocks'] == {'process_0.json': 3, 'process_1.json': 2}
    assert results[0]['overwrite']['checksum_blocks'] is None
    # 40 KB shards: several files with an index; 1 GB: one file, replacing them.
    assert results[0]['live']['files'][-1] == 'model.safetensors.index.json'
    assert len(results[0]['live']['files']) >= 4
    assert results[0]['overwrite']['files'] == ['model.safetensors']
    # A strided slice keeps each process to its rows; a reshape would need a gather.
    assert [r['strided_written'] for r in results] == [256 * 32 * 4 // 2] * 2
    for r in results:
        assert 'No process holds all the data of' in r['gather_error'], r['gather_error']
        assert not r['gathered_exists']
