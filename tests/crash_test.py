"""Crash safety: each writer, SIGKILLed at 20 seeded moments, never leaves a broken result.

The writers (crash_worker.py) are `orbax-surgery convert` to Orbax and to
safetensors (with --overwrite, over a previous result half of the time), and
SurgerySave and LoraSave through a CheckpointManager that keeps 3 steps (so
saves also delete). The moments are drawn over the measured time of an
uninterrupted write, plus two at the start and two past its end. After each
kill: the destination is absent or whole (every array compared), an old
result is never lost, every step a fresh CheckpointManager lists restores
with the right values, and some reruns complete with the right values.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from crash_worker import RULES_TOML, lora, manager_options, stacked, unrolled

import orbax_surgery as osurg
from orbax_surgery.cli import main as cli
from orbax_surgery.keys import flatten
from orbax_surgery.write import atomic

WORKER = Path(__file__).with_name('crash_worker.py')
KILLS = 20
RERUN = (0, 7, 13, 19)  # The kills after which the write is run again to completion.
OLD_STEP = 99  # The source of the result a convert --overwrite replaces.


class Child:
    """One writer process, set up and waiting for 'go'."""

    def __init__(self, writer: str, workdir: Path, step: int = 0):
        env = {**os.environ, 'PYTHONPATH': str(Path(__file__).parents[1]), 'JAX_PLATFORMS': 'cpu'}
        env.pop('XLA_FLAGS', None)
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), writer, str(workdir), str(step)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    def go(self) -> float:
        line = self.proc.stdout.readline()
        assert line == 'ready\n', (line, self.proc.stderr.read() if not line else '')
        self.proc.stdin.write('go\n')
        self.proc.stdin.flush()
        return time.monotonic()

    def finish(self) -> float:
        """Waits for a whole write; returns when it said 'done'."""
        line = self.proc.stdout.readline()
        end = time.monotonic()
        _, err = self.proc.communicate(timeout=120)
        assert line == 'done\n' and self.proc.returncode == 0, err[-3000:]
        return end

    def kill_at(self, started: float, moment: float) -> bool:
        """SIGKILLs it `moment` s after 'go'; True if it had finished by then."""
        time.sleep(max(0.0, started + moment - time.monotonic()))
        self.proc.send_signal(signal.SIGKILL)
        out, _ = self.proc.communicate(timeout=120)
        return 'done' in out


def moments(duration: float, seed: int) -> list[float]:
    """Two at the start, two past the end, the rest spread over the write."""
    rng = np.random.default_rng(seed)
    inside = rng.uniform(0, duration, KILLS - 4)
    return [0.0, 0.002, *inside, duration * 1.3, duration * 2]


def assert_same(got: dict, want: dict, where: str) -> None:
    got, want = flatten(got)[0], flatten(want)[0]
    assert sorted(got) == sorted(want), (where, sorted(got))
    for key, value in want.items():
        np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg=f'{where}: {key}')


def kill_series(writer: str, workdir: Path, seed: int, check, rerun, step_of=lambda i: 0):
    """Measures a whole write, then kills one child per moment; returns the outcome counts.

    The duration is the shorter of two whole writes (the first runs with cold caches).
    """
    durations = []
    for i in (-2, -1):
        child = Child(writer, workdir, step_of(i))
        started = child.go()
        durations.append(child.finish() - started)
        check(i)
    duration = min(durations)
    outcomes: collections.Counter[str] = collections.Counter()
    nxt = Child(writer, workdir, step_of(0))
    for i, moment in enumerate(moments(duration, seed)):
        child = nxt
        finished = child.kill_at(child.go(), moment)
        # The next child imports while this kill is checked (its setup writes nothing);
        # after a rerun, so that its manager sees the rerun's step.
        if i + 1 < KILLS and i not in RERUN:
            nxt = Child(writer, workdir, step_of(i + 1))
        outcome = check(i)
        outcomes[outcome + (', finished' if finished else '')] += 1
        if i in RERUN:
            rerun(i)
            if i + 1 < KILLS:
                nxt = Child(writer, workdir, step_of(i + 1))
    print(f'\n{writer}: write {duration * 1000:.0f} ms; after {KILLS} kills: {dict(outcomes)}')
    return outcomes


@pytest.mark.slow
@pytest.mark.parametrize('to', ['orbax', 'safetensors'])
def test_convert_killed_at_random_moments(tmp_path, to):
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / 'src', unrolled(0))
        ckptr.save(tmp_path / 'old_src', unrolled(OLD_STEP))
    (tmp_path / 'rules.toml').write_text(RULES_TOML)
    dst = tmp_path / 'dst'
    argv = ['--rules', str(tmp_path / 'rules.toml'), '--to', to, '-q', '--overwrite']
    assert cli.main(['convert', str(tmp_path / 'old_src'), str(tmp_path / 'old'), *argv]) == 0
    new, old = stacked(0), stacked(OLD_STEP)
    before = {'dst': False}

    def check(i: int) -> str:
        leftovers = sorted(p.name for p in tmp_path.glob('dst.*'))
        assert not [p for p in leftovers if '.replaced-' in p], leftovers  # The swap is atomic.
        if not dst.exists():
            assert not before['dst'], f'kill {i}: the old result was lost; {leftovers}'
            outcome = 'no destination'
        else:
            got = osurg.restore(dst)
            is_new = np.array_equal(got['layers']['w'], new['layers']['w'])
            assert_same(got, new if is_new else old, f'kill {i}')
            outcome = 'new destination' if is_new else 'old destination'
        if leftovers:
            outcome += ' + temp leftovers'
        # Half the kills replace an old result.
        if i % 2 == 0 and i + 1 < KILLS:
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(tmp_path / 'old', dst)
        before['dst'] = dst.exists()
        return outcome

    def rerun(i: int) -> None:
        assert cli.main(['convert', str(tmp_path / 'src'), str(dst), *argv]) == 0
        assert_same(osurg.restore(dst), new, f'rerun after kill {i}')
        assert not list(tmp_path.glob('dst.*')), 'a rerun removes what the killed one left'
        before['dst'] = True

    outcomes = kill_series(f'convert-{to}', tmp_path, 10 + len(to), check, rerun)
    assert sum(outcomes.values()) == KILLS


def listed_steps_are_whole(run: Path, restore_step, expected) -> list[int]:
    """Every step a fresh manager lists restores with its values; returns the steps."""
    with ocp.CheckpointManager(run) as manager:
        steps = manager.all_steps()
        assert manager.latest_step() == (max(steps) if steps else None)
        for step in steps:
            assert_same(restore_step(manager, step), expected(step), f'step {step}')
    return steps


def manager_series(tmp_path: Path, writer: str, restore_step, expected, seed: int) -> None:
    run = tmp_path / 'run'
    written = set()

    def step_of(i: int) -> int:
        return i + 2

    def check(i: int) -> str:
        step = step_of(i)  # The measuring writes saved steps 0 and 1.
        steps = listed_steps_are_whole(run, restore_step, expected)
        tmp = (run / f'{step}.orbax-checkpoint-tmp').exists()  # Left by this kill.
        # Orbax keeps the newest 3 of those written; a listed step was written.
        assert set(steps) <= written | {step}, (steps, written)
        outcome = 'step listed' if step in steps else 'step not listed'
        if step in steps:
            written.add(step)
        elif i >= 0:
            assert max(written) in steps, 'the latest whole step stays listed'
        return outcome + (' + its temp directory' if tmp else '')

    def rerun(i: int) -> None:
        step = step_of(i)
        if step in written:
            return  # The killed save had finished; Orbax refuses to save a step twice.
        with ocp.CheckpointManager(run, options=manager_options()) as manager:
            manager.save(step, args=save_args(writer, step))
            manager.wait_until_finished()
        written.add(step)
        assert step in listed_steps_are_whole(run, restore_step, expected)

    outcomes = kill_series(writer, tmp_path, seed, check, rerun, step_of)
    assert sum(outcomes.values()) == KILLS


def save_args(writer: str, step: int):
    if writer == 'surgery-save':
        rules = [
            osurg.Stack(r'layers_{i}/(.*)', r'layers/\1'),
            osurg.Rename('head/(.*)', r'lm_head/\1'),
        ]
        return osurg.SurgerySave(item=unrolled(step), rules=rules)
    layout, trainable = lora(step)
    return ocp.args.Composite(adapters=osurg.LoraSave(item=trainable, lora=layout))


@pytest.mark.slow
def test_surgery_save_killed_at_random_moments(tmp_path):
    def restore_step(manager, step):
        return manager.restore(step, args=osurg.SurgeryRestore())

    manager_series(tmp_path, 'surgery-save', restore_step, stacked, seed=20)


@pytest.mark.slow
def test_lora_save_killed_at_random_moments(tmp_path):
    def restore_step(manager, step):
        return manager.restore(step, args=ocp.args.Composite(adapters=osurg.LoraRestore())).adapters

    manager_series(tmp_path, 'lora-save', restore_step, lambda step: lora(step)[1], seed=30)


def test_a_kill_after_the_swap_leaves_the_new_result_in_place(tmp_path, monkeypatch):
    (tmp_path / 'new').mkdir()
    (tmp_path / 'new' / 'x').write_text('new')
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'x').write_text('old')

    def killed(path):
        raise KeyboardInterrupt  # As a SIGKILL would stop it: before the old one is removed.

    monkeypatch.setattr(atomic, '_remove', killed)
    with pytest.raises(KeyboardInterrupt):
        atomic.move_into_place(tmp_path / 'new', tmp_path / 'out', aside='.replaced-')
    # One atomic swap: the destination is the new result; the old one took its temporary name.
    assert (tmp_path / 'out' / 'x').read_text() == 'new'
    assert (tmp_path / 'new' / 'x').read_text() == 'old'


def test_without_the_swap_a_failed_second_rename_puts_the_old_result_back(tmp_path, monkeypatch):
    (tmp_path / 'new').mkdir()
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'x').write_text('old')
    monkeypatch.setattr(atomic, '_exchange', lambda a, b: False)
    renames = []

    def rename(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            raise OSError('disk gone')
        os.replace(src, dst)

    monkeypatch.setattr(atomic.os, 'rename', rename)
    with pytest.raises(OSError, match='disk gone'):
        atomic.move_into_place(tmp_path / 'new', tmp_path / 'out', aside='.replaced-')
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['new', 'out']
    assert (tmp_path / 'out' / 'x').read_text() == 'old'


def test_convert_after_a_kill_between_the_two_renames(tmp_path, capsys):
    """Without the swap, a kill between the renames leaves no DST and the old one aside."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / 'src', unrolled(0))
    (tmp_path / 'rules.toml').write_text(RULES_TOML)
    dst = tmp_path / 'dst'
    rules = ['--rules', str(tmp_path / 'rules.toml'), '-q']
    assert cli.main(['convert', str(tmp_path / 'src'), str(dst), *rules]) == 0
    os.rename(dst, tmp_path / 'dst.replaced-1a2b3c4d')  # What the kill left.
    capsys.readouterr()
    # inspect and plan say where the old result is.
    assert cli.main(['inspect', str(dst)]) == 2
    err = capsys.readouterr().err
    assert f'No checkpoint at {dst}: a `convert --overwrite` to it was killed' in err, err
    assert f'the previous result is at {tmp_path}/dst.replaced-1a2b3c4d' in err, err
    assert cli.main(['plan', str(dst)]) == 2
    assert 'dst.replaced-1a2b3c4d' in capsys.readouterr().err
    # Converting again makes DST, then removes the old result.
    assert cli.main(['convert', str(tmp_path / 'src'), str(dst), *rules]) == 0
    assert_same(osurg.restore(dst), stacked(0), 'dst')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['dst', 'rules.toml', 'src']
