"""What a running command shows: the status line, the bar (binary units, the array being read),
`--json` results, one line on Ctrl-C at every phase, and `--help` without JAX."""

import asyncio
import importlib.abc
import io
import json
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from orbax_surgery.cli import commands, convert, progress
from orbax_surgery.cli import main as cli
from orbax_surgery.read.materialize import DEFAULT_MAX_INFLIGHT_BYTES
from orbax_surgery.units import format_bytes

VALUES = {f'layers_{i}': {'w': np.full((16, 16), i, np.float32)} for i in range(8)}


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, as a user's is."""

    def isatty(self):
        return True


@pytest.fixture
def python_handles_sigint():
    """Python's own Ctrl-C handler, as at a terminal. A shell starts background jobs with
    SIGINT ignored, and then Python installs none: nothing would be interrupted."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


# The command line as at a terminal: Python's Ctrl-C handler, whatever the parent ignored.
AT_A_TERMINAL = (
    'import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); '
    'from orbax_surgery_cli import main; sys.exit(main(sys.argv[1:]))'
)


@pytest.fixture(scope='module')
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp('progress') / 'src'
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, VALUES)
    return path


def lines(text):
    return [line for line in text.splitlines() if line.strip()]


def test_the_status_line_shows_each_phase_on_a_terminal_only(src, capsys, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, 'stderr', terminal)
    assert cli.main(['plan', str(src), '--json']) == 0
    shown = [s.removeprefix('\x1b[2K') for s in terminal.getvalue().split('\r') if s]
    assert shown[:3] == ['loading JAX and Orbax...', f'opening {src}...', 'planning 8 arrays...']
    assert terminal.getvalue().endswith('\r\x1b[2K')  # Erased before the output.
    assert len(json.loads(capsys.readouterr().out)['targets']) == 8  # Stdout: JSON only.

    monkeypatch.setattr(sys, 'stderr', io.StringIO())  # A pipe or a log: no partial lines.
    assert cli.main(['inspect', str(src)]) == 0
    assert sys.stderr.getvalue() == ''


def test_convert_json_and_the_bar_in_binary_units_with_the_array_read(
    src, tmp_path, capsys, monkeypatch
):
    read = []
    monkeypatch.setattr(progress.Bar, 'reading', lambda self, key: read.append(key))
    assert cli.main(['convert', str(src), str(tmp_path / 'out'), '--json']) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result == {
        'written': True,
        'destination': str(tmp_path / 'out'),
        'format': 'orbax',
        'step': None,
        'arrays': 8,
        'bytes': 8 * 16 * 16 * 4,
        'seconds': result['seconds'],
    }
    assert set(read) == {f'layers_{i}/w' for i in range(8)}
    bar = lines(err)[-1]  # Not a terminal: rich prints the finished bar once.
    assert '8.0 KiB / 8.0 KiB' in bar and ('KiB/s' in bar or 'MiB/s' in bar), bar
    assert 'MB' not in err and 'kB' not in err

    # The plan's errors: written false, and nothing on disk.
    bad = tmp_path / 'bad.toml'
    bad.write_text("[target]\nmissing = { shape = [2], dtype = 'float32' }\n")
    argv = ['convert', str(src), str(tmp_path / 'no'), '--rules', str(bad), '--json', '-q']
    assert cli.main(argv) == 1
    result = json.loads(capsys.readouterr().out)
    assert result['written'] is False and any('missing' in e for e in result['errors'])
    assert not (tmp_path / 'no').exists()


def test_the_bar_shows_the_key_read_shortened_from_the_start():
    status = progress.Status(io.StringIO())
    with progress.progress_bar(100, status, quiet=False) as bar:

        class Source:
            arrays = {}

            async def read(self, source, region):
                return np.zeros(2)

        class Leaf:
            key = 'model/layers/12/self_attn/q_proj/weight/' * 2

        asyncio.run(progress.watched(Source(), bar).read(Leaf(), ()))
        key = bar._progress.tasks[0].fields['key']
    assert key.startswith('…') and key.endswith('q_proj/weight/') and len(key) == 48
    assert status.doing == 'writing'


class _InterruptImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == 'orbax_surgery.cli.convert':
            raise KeyboardInterrupt
        return None


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    'phase', ['imports', 'planning', 'reading', 'moving', 'leftover'], ids=lambda p: p
)
def test_ctrl_c_prints_one_line_and_exits_130(phase, src, tmp_path, capsys, monkeypatch):
    dst = tmp_path / 'out'
    if phase == 'imports':
        monkeypatch.delitem(sys.modules, 'orbax_surgery.cli.convert')
        monkeypatch.setattr(sys, 'meta_path', [_InterruptImport(), *sys.meta_path])
    elif phase == 'planning':
        monkeypatch.setattr(commands, 'resolve', _interrupt)
    elif phase == 'moving':
        monkeypatch.setattr(convert, 'move_into_place', _interrupt)
    else:  # Reading a block (what a killed writer could leave is kept for 'leftover').
        monkeypatch.setattr(progress._Watched, 'read', _interrupt)
        if phase == 'leftover':
            monkeypatch.setattr(convert, '_discard', lambda paths: None)
    code = cli.main(['convert', str(src), str(dst), '-q'])
    err = capsys.readouterr().err
    assert code == 130 and len(lines(err)) == 1 and 'Traceback' not in err, err
    doing = {
        'imports': 'loading JAX and Orbax',
        'planning': 'planning 8 arrays',
        'reading': 'writing',
        'moving': f'moving the result to {dst}',
        'leftover': 'writing',
    }[phase]
    left = f'nothing was written ({dst} is not created)'
    if phase in ('imports', 'planning'):
        left = 'nothing was written'
    if phase == 'leftover':
        (partial,) = [p for p in tmp_path.iterdir() if p.name.startswith('out.converting-')]
        left = f'left {partial}, which the next convert to {dst} removes (or rm -r it now)'
    assert err == f'orbax-surgery convert: interrupted while {doing}; {left}.\n'
    if phase == 'leftover':  # As the message says: the next convert removes it.
        monkeypatch.undo()
        assert cli.main(['convert', str(src), str(dst)]) == 0
        assert f'Removing {partial}, left by an interrupted convert.' in capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.iterdir()) == ['out']
    else:
        assert list(tmp_path.iterdir()) == []


class _DiesInterrupted:
    def __del__(self):
        raise KeyboardInterrupt  # Where nothing can catch it, as in JAX's gc callback.


def test_a_ctrl_c_lost_in_a_callback_is_delivered_again(
    src, capsys, monkeypatch, python_handles_sigint
):
    def lost_then_busy(*args, **kwargs):
        _DiesInterrupted()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # Busy, as planning is.
            pass
        raise AssertionError('not interrupted')

    monkeypatch.setattr(commands, 'resolve', lost_then_busy)
    assert cli.main(['plan', str(src)]) == 130
    assert capsys.readouterr().err == 'orbax-surgery plan: interrupted while planning 8 arrays.\n'


def test_help_imports_no_jax_and_the_default_budget_is_right():
    code = textwrap.dedent("""
        import contextlib, io, sys
        from orbax_surgery_cli import main  # The console script's entry point.
        for argv in (['--help'], ['convert', '--help'], ['inspect', '--help']):
            with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
                main(argv)
        print(sorted(m for m in ('jax', 'numpy', 'orbax', 'rich', 'etils') if m in sys.modules))
    """)
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert result.stdout == '[]\n', result.stderr
    assert cli.DEFAULT_BUDGET == format_bytes(DEFAULT_MAX_INFLIGHT_BYTES).replace('.0 ', ' ')


SIGINT_AT = """
import os, signal
import numpy as np
import orbax_surgery as osurg

calls = 0


def interrupt(x):
    global calls
    if isinstance(x, np.ndarray):  # Not while jax.eval_shape traces it.
        calls += 1
        if calls == 3:
            os.kill(os.getpid(), signal.SIGINT)
    return x


rules = [osurg.MapValue('.*', interrupt, elementwise=True)]
"""


@pytest.mark.slow
def test_sigint_in_a_real_convert(src, tmp_path):
    (tmp_path / 'rules.py').write_text(SIGINT_AT)
    argv = ['convert', src, tmp_path / 'out', '--rules', tmp_path / 'rules.py']
    argv += ['--max-inflight-bytes', '2K', '-q']
    run = [sys.executable, '-c', AT_A_TERMINAL, *map(str, argv)]
    result = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert result.returncode == 130 and 'Traceback' not in result.stderr, result.stderr
    (line,) = lines(result.stderr)
    assert line.startswith('orbax-surgery convert: interrupted while writing; ')
    assert not (tmp_path / 'out').exists()
    left = [p for p in tmp_path.iterdir() if p.name.startswith('out.converting-')]
    assert (str(left[0]) in line) if left else 'nothing was written' in line
