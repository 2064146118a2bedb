"""Load: concurrent restores of one checkpoint, and restores while a newer step is saved.

Eight threads of one process share one `CheckpointManager`; eight processes
restore at once, each within its in-flight byte budget; one process restores
the latest step over and over while another saves newer steps. Every result is
checked value for value (`load_worker.expected`).
"""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from load_worker import ARRAYS, expected, renamed, save

import orbax_surgery as osurg

WORKER = Path(__file__).with_name('load_worker.py')
pytestmark = pytest.mark.slow


def _run(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
    )


def _env() -> dict[str, str]:
    env = {**os.environ, 'PYTHONPATH': str(Path(__file__).parents[1])}
    env.pop('XLA_FLAGS', None)
    return env


def _result(proc: subprocess.Popen, timeout: float = 240) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return json.loads(out.strip().splitlines()[-1])


def test_eight_threads_restore_one_checkpoint_through_one_manager(tmp_path, mesh8, mesh2x4):
    mib = 8
    save(tmp_path, 1, mib)
    want = renamed(expected(1, mib))
    shardings = [
        NamedSharding(mesh8, P('x')),
        NamedSharding(mesh8, P(None, 'x')),
        NamedSharding(mesh2x4, P('a', 'b')),
        NamedSharding(mesh2x4, P('b', None)),
        NamedSharding(mesh8, P()),
    ]
    rules = [osurg.Rename(r'layer_(\d+)/kernel', r'blocks/\1/w')]
    start = threading.Barrier(8)
    results: dict[int, object] = {}

    with ocp.CheckpointManager(tmp_path) as manager:

        def restore(i: int) -> None:
            sharding = shardings[i % len(shardings)]
            target = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), want
            )
            args = osurg.SurgeryRestore(target=target, rules=rules, max_inflight_bytes=2**20 * i)
            start.wait()
            try:
                results[i] = manager.restore(1, args=args)
            except BaseException as e:  # Reported below, with the thread that raised it.
                results[i] = e

        threads = [threading.Thread(target=restore, args=(i + 1,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)

    assert sorted(results) == list(range(1, 9))
    for i, got in results.items():
        assert not isinstance(got, BaseException), (i, got)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert a.sharding == shardings[i % len(shardings)]
            np.testing.assert_array_equal(np.asarray(a), w)


def test_eight_processes_restore_one_checkpoint_within_their_budget(tmp_path):
    mib, budget = 32, 4 * 2**20
    save(tmp_path, 1, mib)
    procs = [_run('restore', str(tmp_path), '1', str(mib), str(budget)) for _ in range(8)]
    results = [_result(p) for p in procs]

    for r in results:
        assert r['equal']
        assert r['result_bytes'] == mib * 2**20
        # Host memory: the restored arrays themselves, at most the budget in flight
        # (a 1 MiB block per device at a time here), and allocator slack.
        assert r['peak_rss_over_baseline'] < r['result_bytes'] + budget + 16 * 2**20, r


def test_restore_latest_while_another_process_saves_newer_steps(tmp_path):
    mib, last = 24, 4
    save(tmp_path, 1, 1)
    saver = subprocess.Popen(
        [sys.executable, '-c', _SAVE_STEPS, str(WORKER.parent), str(tmp_path), str(last), str(mib)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
    )
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    seen: list[int] = []
    during = 0
    try:
        while True:
            running = saver.poll() is None
            with ocp.CheckpointManager(tmp_path, options=options) as manager:
                step = manager.latest_step()
                restored = manager.restore(step, args=osurg.SurgeryRestore(target=None))
            want = expected(step, 1 if step == 1 else mib)
            for i in range(ARRAYS):
                np.testing.assert_array_equal(
                    restored[f'layer_{i}']['kernel'], want[f'layer_{i}']['kernel']
                )
            seen.append(step)
            during += running and saver.poll() is None
            if not running:
                break
    finally:
        out, _ = saver.communicate(timeout=240)
    assert saver.returncode == 0, out[-4000:]
    assert seen == sorted(seen) and seen[-1] == last, seen
    assert during >= 1, 'no restore overlapped a save; make the saved steps bigger'
    with ocp.CheckpointManager(tmp_path, options=options) as manager:
        assert manager.all_steps() == list(range(1, last + 1))


# Saves steps 2..LAST one after another through its own manager.
_SAVE_STEPS = """
import sys
import jax
jax.config.update('jax_num_cpu_devices', 8)
sys.path.insert(0, sys.argv[1])
from load_worker import save
for step in range(2, int(sys.argv[3]) + 1):
    save(sys.argv[2], step, float(sys.argv[4]))
"""
