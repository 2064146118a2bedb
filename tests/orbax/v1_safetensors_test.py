"""Safetensors: v1's own layout reads exact names and shapes; ours also renames and transposes."""

import re

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orbax_surgery as osurg
from orbax_surgery.huggingface.safetensors_file import write_file

v1 = pytest.importorskip('orbax.checkpoint.experimental.v1')

WEIGHT = np.arange(48, dtype=np.float32).reshape(8, 6)  # PyTorch's (out, in).


@pytest.fixture
def hf_file(tmp_path):
    path = tmp_path / 'model.safetensors'
    write_file(path, {'proj.weight': WEIGHT, 'embed.weight': np.ones((4, 2), np.float32)})
    return path


def safetensors_context():
    ctx = v1.Context()
    ctx.checkpoint_layout = 'safetensors'
    return ctx


def test_v1_reads_exact_names_and_we_read_the_renamed_transposed_kernel(hf_file, mesh8):
    rows = NamedSharding(mesh8, P('x'))
    with safetensors_context():
        theirs = v1.load(
            hf_file, {'proj.weight': jax.ShapeDtypeStruct((8, 6), np.float32, sharding=rows)}
        )
    np.testing.assert_array_equal(np.asarray(theirs['proj.weight']), WEIGHT)

    kernel = jax.ShapeDtypeStruct((6, 8), np.float32, sharding=NamedSharding(mesh8, P(None, 'x')))
    rules = [
        osurg.Rename(r'proj/weight', 'proj/kernel'),
        osurg.Transpose('proj/kernel', (1, 0)),
        osurg.Drop('embed/.*'),
    ]
    ours = osurg.restore(hf_file, {'proj': {'kernel': kernel}}, rules)['proj']['kernel']
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs['proj.weight']).T)
    assert ours.sharding == kernel.sharding
    plan = osurg.plan_restore(hf_file, {'proj': {'kernel': kernel}}, rules)
    assert plan.not_lazy == () and plan.steps[0].expr.describe() == 'transpose(proj/weight, (1, 0))'


def test_v1s_safetensors_layout_refuses_what_needs_surgery(hf_file):
    with safetensors_context():
        with pytest.raises(KeyError, match=re.escape("'proj/kernel' not found")):
            v1.load(hf_file, {'proj/kernel': jax.ShapeDtypeStruct((6, 8), np.float32)})
        with pytest.raises(ValueError, match='Shape mismatch'):
            v1.load(hf_file, {'proj.weight': jax.ShapeDtypeStruct((6, 8), np.float32)})
        with pytest.raises(NotImplementedError, match='load_checkpointables'):
            v1.load_checkpointables(hf_file, {'params': osurg.SurgeryRestore()})
