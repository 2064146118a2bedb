"""2 processes save a live, sharded tree with rules: each reads only its own shards."""

from pathlib import Path

import pytest


@pytest.mark.multiprocess
def test_surgery_save_with_rules_of_a_live_multi_process_tree(launch):
    results = launch(Path(__file__).with_name('live_save_worker.py'), n=2, devices=4)
    for r in results:
        assert r['checked'] == 4
        assert r['error'].startswith('SourceReadError: Process ')
        assert "holds only part of 'layers_0/w'" in r['error']
        assert 'never gathered across processes' in r['error']
