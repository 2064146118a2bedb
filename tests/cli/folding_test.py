"""`inspect` folds alike numbered layers into `layers_{0..31}/`; --all-layers and --json do not."""

import json

import numpy as np
import orbax.checkpoint as ocp
import pytest

from orbax_surgery.cli import main as cli
from orbax_surgery.cli.folding import fold_layers


def arrays(keys, shape=(4, 4)):
    return [{'key': k, 'shape': list(shape), 'dtype': 'float32', 'bytes': 64} for k in keys]


@pytest.mark.parametrize(
    ('keys', 'want'),
    [
        (
            [f'params/layers_{i}/w' for i in range(32)],
            [('params/layers_{0..31}/w', 32)],
        ),
        (  # Safetensors names, split at their dots: the layer number is a segment of its own.
            [f'model/layers/{i}/self_attn/q_proj/weight' for i in range(3)] + ['model/norm/w'],
            [('model/layers/{0..2}/self_attn/q_proj/weight', 3), ('model/norm/w', 1)],
        ),
        (  # Layer 4 lacks `b`: it stays apart, and the others show the gap.
            [f'layers_{i}/{n}' for i in range(8) for n in ('w', 'b') if (i, n) != (4, 'b')],
            [('layers_{0..3,5..7}/w', 7), ('layers_{0..3,5..7}/b', 7), ('layers_4/w', 1)],
        ),
        (  # Experts inside layers fold too.
            [f'layers_{i}/experts_{e}/w' for i in range(2) for e in range(4)],
            [('layers_{0..1}/experts_{0..3}/w', 8)],
        ),
        (['w_01', 'w_1', 'step'], [('w_01', 1), ('step', 1), ('w_1', 1)]),  # No leading zeros
    ],
    ids=['unrolled', 'safetensors', 'gap', 'nested', 'single'],
)
def test_fold_layers(keys, want):
    got = [(a['key'], a['count']) for a in fold_layers(arrays(keys))]
    assert sorted(got) == sorted(want)


def test_layers_with_other_shapes_stay_apart():
    layers = arrays([f'layers_{i}/w' for i in range(4)])
    layers[2]['shape'] = [4, 8]
    folded = {a['key']: a for a in fold_layers(layers)}
    assert sorted(folded) == ['layers_2/w', 'layers_{0..1,3}/w']
    assert folded['layers_2/w']['shape'] == [4, 8] and folded['layers_{0..1,3}/w']['count'] == 3


@pytest.fixture(scope='module')
def layered(tmp_path_factory):
    tree = {f'layers_{i}': {'w': np.ones((4, 8), np.float32)} for i in range(12)}
    tree['layers_5'] = {'w': np.ones((4, 16), np.float32)}
    tree['embed'] = np.ones((8, 4), np.float32)
    path = tmp_path_factory.mktemp('layered') / 'ckpt'
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree)
    return path


def test_inspect_folds_unless_all_layers_and_json_keeps_every_array(layered, capsys):
    assert cli.main(['inspect', str(layered)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f'Orbax checkpoint item {layered}: 13 arrays, 1.8 KiB\n')
    rows = [line.split() for line in out.splitlines()[3:]]
    assert rows == [
        ['embed', '(8,', '4)', 'float32', '(8,', '4)', '128', 'B'],
        ['layers_{0..4,6..11}/', '1.4', 'KiB'],
        ['w', '(4,', '8)', 'float32', '(4,', '8)', '11', '×', '128', 'B'],
        ['layers_5/', '256', 'B'],
        ['w', '(4,', '16)', 'float32', '(4,', '16)', '256', 'B'],
    ]

    assert cli.main(['inspect', str(layered), '--all-layers']) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[3:]]
    assert names[1::2] == [f'layers_{i}/' for i in range(12)]  # In natural order.

    assert cli.main(['inspect', str(layered), '--json']) == 0
    keys = [a['key'] for a in json.loads(capsys.readouterr().out)['arrays']]
    assert len(keys) == 13 and 'layers_7/w' in keys and not any('{' in k for k in keys)
