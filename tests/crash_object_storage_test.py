"""A writer into s3:// SIGKILLed at random moments never leaves what restores wrong.

The writers export safetensors (several files and an index) and save an Orbax
checkpoint with `SurgerySave`, into moto's S3 server. After each kill the
destination is either not a checkpoint (no index, no commit file: restoring it is
a `CheckpointNotFoundError` or `UnfinalizedCheckpointError`) or whole, with every
value right; and a rerun over the leftovers completes.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import orbax_surgery as osurg

WRITER = r"""
import sys
import numpy as np
import orbax.checkpoint as ocp
import orbax_surgery as osurg
kind, where = sys.argv[1:3]
rng = np.random.default_rng(0)
tree = {f'layer_{i}': {'w': rng.standard_normal((256, 256)).astype(np.float32)} for i in range(8)}
print('ready', flush=True)
sys.stdin.readline()
if kind == 'export':
    osurg.save_safetensors(tree, where, max_shard_size='600KB', overwrite=True)
else:
    with ocp.Checkpointer(osurg.SurgeryCheckpointHandler()) as ckptr:
        ckptr.save(where, args=osurg.SurgerySave(item=tree), force=True)
print('done', flush=True)
"""
KILLS = 8


def expected():
    rng = np.random.default_rng(0)
    return {f'layer_{i}': rng.standard_normal((256, 256)).astype(np.float32) for i in range(8)}


def start(kind, where):
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
    proc = subprocess.Popen(
        [sys.executable, '-c', WRITER, kind, where],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert proc.stdout.readline() == 'ready\n'
    proc.stdin.write('go\n')
    proc.stdin.flush()
    return proc, time.monotonic()


def check(where) -> str:
    try:
        out = osurg.restore(where)
    except (osurg.CheckpointNotFoundError, osurg.UnfinalizedCheckpointError):
        return 'absent'
    want = expected()
    for key, value in want.items():
        np.testing.assert_array_equal(out[key]['w'], value, err_msg=key)
    return 'whole'


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['export', 'orbax'])
def test_a_writer_killed_at_random_moments_in_s3(s3, kind):
    where = f'{s3()}/out'
    proc, started = start(kind, where)
    assert proc.stdout.readline() == 'done\n'
    duration = time.monotonic() - started
    proc.communicate()
    assert check(where) == 'whole'
    outcomes = []
    for moment in np.random.default_rng(1).uniform(0, duration, KILLS):
        proc, started = start(kind, where)
        time.sleep(max(0.0, started + moment - time.monotonic()))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        outcomes.append(check(where))
    print(f'\n{kind} into s3, {duration * 1000:.0f} ms a write: {outcomes}')
    proc, _ = start(kind, where)  # A rerun over whatever the last kill left.
    assert proc.stdout.readline() == 'done\n'
    proc.communicate()
    assert check(where) == 'whole'
