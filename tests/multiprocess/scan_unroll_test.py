from pathlib import Path

import pytest


@pytest.mark.multiprocess
def test_scanned_checkpoint_restores_unrolled_each_process_reading_its_part(launch):
    results = launch(Path(__file__).with_name('scan_unroll_worker.py'), n=2, devices=4)
    assert sorted(r['process'] for r in results) == [0, 1]
    for r in results:
        # Saved one layer (half of one layer, in fact) per chunk.
        for key, chunks in r['chunk_shapes'].items():
            assert key == 'embed' or chunks[0] == 1, r
        # embed, and 3 stacked leaves x 4 layers: 13 leaves, 4 shards of each here.
        assert r['shards_checked'] == 13 * 4, r
        # Each process holds half of every leaf, and the plan knows it for both.
        assert r['bytes_needed'] == r['needed_other'] == r['checkpoint_bytes'] // 2, r
        assert r['planned_needed'] == r['bytes_needed'], r
        assert r['planned_needed_other'] == r['needed_other'], r
        # The chunks align with each process's half: no chunk is read for nothing.
        assert r['planned_chunked'] == r['bytes_needed'], r
        # What it actually read from disk: its part, and not much more.
        assert 0.9 * r['bytes_needed'] <= r['bytes_read'] <= 1.1 * r['bytes_needed'], r
