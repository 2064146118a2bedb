from pathlib import Path

import pytest


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_save_and_restore_through_v1s_checkpointer(launch):
    results = launch(Path(__file__).with_name('v1_restore_worker.py'), n=2, devices=4)
    assert sorted(r['process'] for r in results) == [0, 1]
    for r in results:
        assert r['shards_checked'] == 4
        assert 0 < r['bytes_read'] <= 0.6 * r['checkpoint_bytes'], r
