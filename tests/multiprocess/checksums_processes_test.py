from pathlib import Path

import pytest


@pytest.mark.multiprocess
def test_each_process_records_its_blocks_and_verifies_what_it_reads(launch):
    results = launch(Path(__file__).with_name('checksums_worker.py'), n=2, devices=4)
    first, second = sorted(results, key=lambda r: r['process'])
    # Each process hashed the 4 row blocks it wrote; NumPy leaves only on process 0.
    assert first['keys'] == ['b', 'w'] and second['keys'] == ['w']
    assert first['w_blocks'] == ['0.0', '1.0', '2.0', '3.0']
    assert second['w_blocks'] == ['4.0', '5.0', '6.0', '7.0']
    assert first['shards_checked'] == second['shards_checked'] == 4
    # Block 5 was swapped: process 1 reads it and refuses; process 0 never reads it.
    assert first['error_after_swap'] is None
    assert second['error_after_swap'].startswith('ChecksumMismatchError: ')
    assert "'w' block (5, 0) [320:384, 0:64] does not match" in second['error_after_swap']
