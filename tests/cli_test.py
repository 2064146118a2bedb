"""The installed console script, run as a user would."""

import shutil
import subprocess
import sys

import pytest


def run(*args, **kwargs):
    exe = shutil.which('orbax-surgery')
    cmd = [exe, *args] if exe else [sys.executable, '-m', 'orbax_surgery.cli', *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.mark.slow
def test_demo_restores_and_checks_every_leaf(tmp_path):
    result = run('demo', '--dir', str(tmp_path / 'demo'))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert 'Plan (ready): 7 target leaves from 11 checkpoint arrays' in out
    assert 'cast(transpose(params/embed/embedding, (1, 0)), bfloat16)' in out
    assert out.count('   ok  ') == 7 and 'BAD' not in out
    assert out.rstrip().endswith('All leaves match.')
    assert (tmp_path / 'demo' / '100' / 'default' / '_METADATA').exists()


def test_no_command_prints_help_and_fails():
    result = run()
    assert result.returncode == 2 and 'demo' in result.stdout
