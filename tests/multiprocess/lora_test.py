from pathlib import Path

import pytest


@pytest.mark.multiprocess
@pytest.mark.slow
def test_merged_restore_each_process_reads_its_shards_of_w_a_and_b(launch):
    results = launch(Path(__file__).with_name('lora_worker.py'), n=2, devices=4)
    assert sorted(r['process'] for r in results) == [0, 1]
    for r in results:
        # 7 leaves (5 adapted kernels, a frozen and a trained bias), 4 shards each here.
        assert r['merged_checked'] == 7 * 4, r
        # The adapters change (almost) every element of W: the merge is not a copy.
        assert r['changed_by_merge'] > 0.9, r
        # Split: 6 frozen leaves, and 5 x (A, B) plus the trained bias, all bit for bit.
        assert (r['split_frozen_keys'], r['split_trainable_keys']) == (6, 11), r
        assert r['split_checked'] == (6 + 11) * 4, r
        # The plan counts what this worker counts: W's shards, A's rows, B's columns.
        assert r['planned_needed'] == r['bytes_needed'], r
        assert r['planned_needed_other'] == r['needed_other'], r
        # Stored chunks lie within the shards that need them: no chunk is read for nothing.
        assert r['planned_chunked'] == r['bytes_needed'], r
        # Each process needs about half of the base, not all of it.
        assert r['bytes_needed'] < 0.6 * (r['base_bytes'] + r['adapter_bytes']), r
        # What it actually read from disk: its part, and not much more.
        assert 0.9 * r['bytes_needed'] <= r['bytes_read'] <= 1.1 * r['bytes_needed'], r
