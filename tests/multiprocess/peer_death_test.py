"""A process of a 2-process job dies mid-operation: the survivor stops in bounded time, cleanly.

Process 1 SIGKILLs (or, for `hang`, SIGSTOPs) itself at its first block of a
SurgerySave, a SurgeryRestore or a safetensors export; or process 0, the
coordinator, dies in an export, and JAX aborts process 1 at once. With
`jax_enable_recoverability` the survivor gets an error within the barrier
timeout (3 s) and exits normally; without it, JAX's coordination service
terminates the survivor (SIGABRT) once the peer misses its heartbeats (4 s).
Either way nothing waits forever, no partial step is listed and no export is
finalized.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

import orbax_surgery as osurg

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

WORKER = Path(__file__).with_name('peer_death_worker.py')
BOUND_S = 90  # Far above what any case needs (3-4 s of timeouts); a hang fails here.
LAYERS, ROWS, COLS = 4, 256, 128


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _run(workdir: Path, case: str, *, recoverable: bool, survivor: int = 0) -> tuple[int, str, int]:
    """Runs the job; returns the survivor's exit status and output, and the peer's status."""
    port = _free_port()
    env = {**os.environ, 'PYTHONPATH': str(Path(__file__).parents[2])}
    env.pop('XLA_FLAGS', None)
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(port), '2', str(i), '2', str(workdir), case]
            + ['1' if recoverable else '0'],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    alive, peer = procs[survivor], procs[1 - survivor]
    try:
        try:
            out, _ = alive.communicate(timeout=BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f'process {survivor} still running {BOUND_S} s after its peer died ({case})'
            )
        peer.kill()  # A stopped (hung) peer is still there.
        peer.communicate(timeout=BOUND_S)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return alive.returncode, out, peer.returncode


def _result(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith('{')][-1])


def _values() -> dict[str, np.ndarray]:
    return {
        f'layers_{i}': {
            'w': np.random.default_rng(i).standard_normal((ROWS, COLS)).astype(np.float32)
        }
        for i in range(LAYERS)
    }


def _assert_only_step_1_listed(run: Path) -> None:
    """A fresh manager lists step 1 alone, and it restores with its values."""
    with ocp.CheckpointManager(run) as manager:
        assert manager.all_steps() == [1] and manager.latest_step() == 1
    restored = osurg.restore(run / '1' / 'default')
    for name, leaf in _values().items():
        np.testing.assert_array_equal(np.asarray(restored[name]['w']), leaf['w'], err_msg=name)


def test_surgery_save_when_the_peer_dies(tmp_path):
    status, out, peer = _run(tmp_path, 'save', recoverable=True)
    assert peer == -signal.SIGKILL, out
    assert status == 0, out[-4000:]
    result = _result(out)
    # Orbax's CheckpointManager waits for the peer at its own barrier, for
    # AsyncOptions(timeout_secs=3), then wait_until_finished raises.
    assert result['error'] == 'TimeoutError', result
    assert 'async_write_complete barrier' in result['message'], result
    _assert_only_step_1_listed(tmp_path / 'run')
    assert [p.name for p in (tmp_path / 'run').iterdir() if p.name.startswith('2')] == [
        '2.orbax-checkpoint-tmp'
    ]


def test_surgery_restore_when_the_peer_dies(tmp_path):
    status, out, peer = _run(tmp_path, 'restore', recoverable=True)
    assert peer == -signal.SIGKILL, out
    assert status == 0, out[-4000:]
    result = _result(out)
    # A restore needs nothing from the peer: process 0 got its 8 shards, all right.
    assert result['shards_checked'] == 8, result
    # But Orbax's Checkpointer ends a restore with a barrier over all processes (a
    # gloo collective): the dead peer's closed sockets make it fail at once.
    assert result['error'] == 'JaxRuntimeError', result
    assert 'Gloo AllGather failed' in result['message'], result
    assert 'by peer' in result['message'], result
    _assert_only_step_1_listed(tmp_path / 'run')


@pytest.mark.parametrize('case', ['export', 'hang'], ids=['killed', 'hung'])
def test_export_when_the_peer_dies_or_hangs(tmp_path, case):
    status, out, peer = _run(tmp_path, case, recoverable=True)
    assert peer == -signal.SIGKILL, out
    assert status == 0, out[-4000:]
    result = _result(out)
    assert result['error'] == 'PeerTimeoutError' and result['is_surgery_error'], result
    assert "barrier 'orbax_surgery.export.1.written'" in result['message'], result
    assert 'processes [0, 1]' in result['message'], result
    assert f'The export left nothing finalized: {tmp_path}/hf is as it was.' in result['message']
    # Process 0 removed the temporary directory; no export was finalized.
    assert sorted(p.name for p in tmp_path.iterdir()) == ['run']


def test_export_when_the_coordinator_dies(tmp_path):
    status, out, peer = _run(tmp_path, 'coordinator', recoverable=True, survivor=1)
    assert peer == -signal.SIGKILL, out
    # Process 0 hosts the coordination service. Once it is gone, JAX aborts the survivor
    # at once, even with recoverability: a bounded end, but not one Python can catch.
    assert status == -signal.SIGABRT, out[-4000:]
    assert 'Terminating process because the JAX distributed service detected fatal errors' in out
    assert 'the leader task was preempted/died' in out
    # Nothing was finalized: at most the export's temporary directory is left.
    assert not (tmp_path / 'hf').exists()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert 'run' in left and all(n.startswith('hf.tmp-') for n in left if n != 'run'), left


def test_without_recoverability_jax_ends_the_survivor(tmp_path):
    status, out, peer = _run(tmp_path, 'export', recoverable=False)
    assert peer == -signal.SIGKILL, out
    # The coordination service finds the peer's heartbeats missing (4 s) and
    # terminates every other process: LOG(FATAL), so SIGABRT. Nothing avoids
    # it but `jax_enable_recoverability`; the export's barrier times out in 60 s.
    assert status == -signal.SIGABRT, out[-4000:]
    assert 'Terminating process because the JAX distributed service detected fatal errors' in out
    assert not (tmp_path / 'hf').exists()
