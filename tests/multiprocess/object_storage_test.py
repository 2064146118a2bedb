from pathlib import Path

import pytest


@pytest.mark.multiprocess
def test_two_processes_read_only_their_shards_from_s3(launch, s3):
    bucket = s3()
    results = launch(Path(__file__).with_name('object_storage_worker.py'), 2, 4, bucket)
    assert sorted(r['process'] for r in results) == [0, 1]
    for r in results:
        assert r['checked'] == 16
        assert r['hf_read'] == r['own_bytes'], r  # Exactly its shards' bytes, requested.
        # Its chunks (zstd-compressed random floats: a little under their bytes) and the
        # OCDBT manifest and index nodes; no chunk of the other process's shards.
        assert 0.9 * r['own_bytes'] <= r['orbax_read'] <= r['own_bytes'] + 16_384, r
        assert r['orbax_gap_read'] > r['orbax_read'], r  # Orbax's 1 MB gaps: fewer requests
        assert r['orbax_gap_requests'] < r['orbax_requests'], r
