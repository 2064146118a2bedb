"""The README's Python examples run as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / 'README.md'


def python_blocks() -> list[str]:
    return re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.DOTALL)


@pytest.mark.slow
@pytest.mark.parametrize('index', range(len(python_blocks())))
def test_readme_example_runs(index, tmp_path):
    code = python_blocks()[index]
    result = subprocess.run(
        [sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
