"""The README's Python examples run as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / 'README.md'


def python_blocks() -> list[str]:
    return re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.DOTALL)


@pytest.mark.slow
@pytest.mark.parametrize('index', range(len(python_blocks())))
def test_readme_example_runs(index, tmp_path):
    code = python_blocks()[index]
    # This checkout's package, not whichever copy the interpreter has installed.
    env = {
        **os.environ,
        'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
    }
    result = subprocess.run(
        [sys.executable, '-c', code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
