"""The Orbax v1 names the integration uses exist, and without v1 the package still works."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import orbax_surgery as osurg
from orbax_surgery.orbax import v1_surface

ROOT = Path(__file__).parents[2]


def test_every_pinned_v1_name_exists():
    assert v1_surface.MISSING == [], (
        f'This orbax-checkpoint moved or removed v1 names that orbax_surgery uses: '
        f'{v1_surface.MISSING}. Update PINNED and the functions in '
        'orbax_surgery/orbax/v1_surface.py (and orbax/v1_handler.py) to the new names.'
    )
    assert v1_surface.AVAILABLE and v1_surface.REASON is None
    assert isinstance(v1_surface.use_ocdbt(), bool)
    assert v1_surface.primary_host() == 0
    assert v1_surface.is_primary_host(v1_surface.primary_host())


def test_a_moved_name_is_named_and_disables_only_v1():
    pinned = (*v1_surface.PINNED, (f'{v1_surface.V1}.handlers', 'moved_away'))
    found, missing, reason = v1_surface._look_up(pinned)
    assert missing == [f'{v1_surface.V1}.handlers.moved_away']
    assert 'moved_away' in reason and 'register_handler' in found


def test_handlers_are_registered_with_v1():
    v1 = pytest.importorskip('orbax.checkpoint.experimental.v1')
    registered = [h for h, _ in v1.handlers.global_registry().get_all_entries()]
    assert osurg.SurgeryCheckpointableHandler in registered
    assert osurg.LoraCheckpointableHandler in registered
    v1_surface.register_handler(osurg.SurgeryCheckpointableHandler)  # Idempotent.
    again = [h for h, _ in v1.handlers.global_registry().get_all_entries()]
    assert again.count(osurg.SurgeryCheckpointableHandler) == 1


WITHOUT_V1 = """
import importlib.abc, sys, tempfile
import numpy as np
import orbax.checkpoint as ocp  # 0.12.8 imports v1 itself: hide it only afterwards.
V1 = 'orbax.checkpoint.experimental.v1'
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == V1 or name.startswith(V1 + '.'):
            raise ImportError(f'{name} hidden by the test')
for name in [n for n in sys.modules if n == V1 or n.startswith(V1 + '.')]:
    del sys.modules[name]
sys.meta_path.insert(0, Hide())
import orbax_surgery as osurg
from orbax_surgery.orbax import v1_surface
assert not v1_surface.AVAILABLE
path = tempfile.mkdtemp() + '/ckpt'
with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, {'w': np.arange(3.0)})
with ocp.Checkpointer(osurg.SurgeryCheckpointHandler()) as ckptr:
    out = ckptr.restore(path, args=osurg.SurgeryRestore(rules=[osurg.Rename('w', 'W')]))
assert out['W'].tolist() == [0.0, 1.0, 2.0]
try:
    v1_surface.require('SurgeryCheckpointableHandler')
except osurg.SurgeryError as e:
    print('REFUSED:', e)
"""


def test_without_v1_the_package_imports_says_so_and_v0_works():
    result = subprocess.run(
        [sys.executable, '-c', WITHOUT_V1],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, 'PYTHONPATH': str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Orbax v1 integration skipped' in result.stderr
    assert 'orbax.checkpoint.experimental.v1 hidden by the test' in result.stderr
    assert 'REFUSED: SurgeryCheckpointableHandler needs Orbax v1' in result.stdout
