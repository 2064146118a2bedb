"""Orbax v1's eager `model_surgery.transformations`, each done lazily with rules, value for value.

Each case is the example in the function's own docstring: the eager function runs on the
loaded flat dict; the rules run while v1's `load_checkpointables` restores the same checkpoint.
"""

import warnings

import jax
import numpy as np
import pytest

import orbax_surgery as osurg

v1 = pytest.importorskip('orbax.checkpoint.experimental.v1')
with warnings.catch_warnings():  # fusing.py's jit(backend='cpu') is deprecated in jax 0.10.
    warnings.simplefilter('ignore', DeprecationWarning)
    transformations = pytest.importorskip(
        'orbax.checkpoint.experimental.model_surgery.transformations'
    )
    from orbax.checkpoint.experimental.model_surgery.transformations import (
        fusing,
        nesting,
        renaming,
        repeating,
        stacking,
    )


def arange(*shape):
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 1


def experts(axis_shape=(2, 3), n=4):
    return {f'layers.0.mlp.experts.{i}.weight': arange(*axis_shape) * (i + 1) for i in range(n)}


REPEAT = [
    osurg.Rename(r'(.*\.weight)', r'\1/0'),
    osurg.Copy(r'(.*\.weight)/0', r'\1/1'),
    osurg.Stack(r'(.*\.weight)/{i}', r'\1', axis=2),  # A new axis after `dimension` (1)...
    osurg.Reshape(r'.*\.weight', (2, -1)),  # ... merged into it: np.repeat(x, 2, axis=1).
]

CASES = {
    'rename_by_regex': (
        {'params.dense.weight_scale_inv': arange(2, 3), 'params.dense.bias': arange(3)},
        renaming.rename_by_regex(
            [(r'^params\.', 'carried_state.'), (r'\.weight_scale_inv$', '.weight_scale')]
        ),
        [
            osurg.Rename(r'params\.(.*)', r'carried_state.\1'),
            osurg.Rename(r'(.*)\.weight_scale_inv', r'\1.weight_scale'),
        ],
    ),
    'unflatten': (
        {'linear1.kernel.qvalue': arange(4, 2), 'linear1.kernel.scale': arange(2)},
        nesting.unflatten(),
        [osurg.Rename(r'([^.]+)\.([^.]+)\.([^.]+)', r'\1/\2/\3')],
    ),
    'stack': (
        experts(),
        stacking.stack(r'mlp\.experts\.(\d+\.)', expected_count=4),
        [osurg.Stack(r'(.*)mlp\.experts\.{i}\.(.*)', r'\1mlp.experts.\2')],
    ),
    'stack_axis_1': (
        experts(),
        stacking.stack(r'mlp\.experts\.(\d+\.)', expected_count=4, axis=1),
        [osurg.Stack(r'(.*)mlp\.experts\.{i}\.(.*)', r'\1mlp.experts.\2', axis=1)],
    ),
    'fuse_by_pattern': (
        {
            'model.layers.0.gate_proj.weight': arange(2, 3),
            'model.layers.0.up_proj.weight': -arange(2, 3),
            'model.layers.1.gate_proj.weight': arange(2, 3) * 10,
            'model.layers.1.up_proj.weight': -arange(2, 3) * 10,
        },
        fusing.fuse_by_pattern(
            pattern=r'^(.*)\.(gate_proj|up_proj)\.weight$',
            unique_parts=['gate_proj', 'up_proj'],
            fused_unique_part='gate_up_proj',
        ),
        [
            osurg.Concatenate(
                (r'(.*)\.gate_proj\.weight', r'\1.up_proj.weight'), r'\1.gate_up_proj.weight'
            )
        ],
    ),
    'fuse_by_keys': (
        {'layer0.gate': arange(3, 2), 'layer0.up': -arange(3, 2), 'layer0.norm': arange(2)},
        fusing.fuse_by_keys(
            source_keys=['layer0.gate', 'layer0.up'], target_key='layer0.gate_up', axis=1
        ),
        [osurg.Concatenate((r'layer0\.gate', 'layer0.up'), 'layer0.gate_up', axis=1)],
    ),
    'repeat_by_pattern': (
        {'model.layers.0.weight': arange(2, 2), 'model.layers.0.bias': arange(2)},
        repeating.repeat_by_pattern(pattern=r'^(.*)\.weight$', dimension=1, repeat_count=2),
        REPEAT,
    ),
    'repeat_by_keys': (
        {'layer0.weight': arange(2, 2), 'layer1.weight': arange(2, 3)},
        repeating.repeat_by_keys(target_keys=['layer0.weight'], dimension=1, repeat_count=2),
        [osurg.Rename(r'(layer0\.weight)', r'\1/0'), *REPEAT[1:]],
    ),
}


def flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {'/'.join(str(k.key) for k in path): np.asarray(v) for path, v in leaves}


@pytest.mark.parametrize('name', list(CASES), ids=list(CASES))
def test_lazy_rules_equal_the_eager_transformation(tmp_path, name):
    saved, eager, rules = CASES[name]
    v1.save_checkpointables(tmp_path / 'ckpt', {'params': saved})
    theirs = flat(eager(v1.load_checkpointables(tmp_path / 'ckpt')['params']))
    ours = v1.load_checkpointables(
        tmp_path / 'ckpt', {'params': osurg.SurgeryRestore(rules=rules)}
    )['params']
    ours = flat(ours)
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)
        assert ours[key].dtype == value.dtype, key
    plan = osurg.plan_restore(tmp_path / 'ckpt' / 'params', None, rules)
    assert plan.not_lazy == ()
