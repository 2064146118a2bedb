"""Every notebook in notebooks/ runs top to bottom, and is committed without outputs."""

from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / 'notebooks').glob('*.ipynb'))


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore::DeprecationWarning')
@pytest.mark.parametrize('path', NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv('JUPYTER_PLATFORM_DIRS', '1')
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=300,
        kernel_name='python3',
        resources={'metadata': {'path': str(tmp_path)}},
    )
    client.execute()
    outputs = [o for c in notebook.cells for o in c.get('outputs', [])]
    assert outputs and not [o for o in outputs if o.get('output_type') == 'error']


@pytest.mark.parametrize('path', NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    assert not [c for c in notebook.cells if c.cell_type == 'code' and c.get('outputs')]
