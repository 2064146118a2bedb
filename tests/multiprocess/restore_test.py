from pathlib import Path

import pytest


@pytest.mark.multiprocess
def test_two_processes_each_read_their_half(launch):
    results = launch(Path(__file__).with_name('restore_worker.py'), n=2, devices=4)
    assert sorted(r['process'] for r in results) == [0, 1]
    for r in results:
        assert r['shards_checked'] == 8
        assert r['bytes_read'] <= 0.6 * r['checkpoint_bytes'], r
        assert r['planned'] == r['planned_other'] == r['checkpoint_bytes'] // 2, r
