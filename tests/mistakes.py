"""Realistic mistakes and the fix each must suggest first; and every error's documented example.

`MISTAKES` drives `tests/plan/mistakes_test.py` (the plan's first error must
suggest the fix first) and, with `EXAMPLES`, `docs/errors.md` (`python
tests/mistakes.py > docs/errors.md`; `mistakes_test` checks it is current).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import orbax_surgery as osurg

S = jax.ShapeDtypeStruct
F32 = np.dtype(np.float32)
BF16 = np.dtype(jax.numpy.bfloat16)


def hf_llama(layers=2, d=64, vocab=256, ff=128, heads=4, kv=2, head_dim=16, dtype=F32):
    """A Llama checkpoint's keys and shapes as Hugging Face stores them."""
    out = {'model/embed_tokens/weight': (vocab, d), 'model/norm/weight': (d,)}
    out['lm_head/weight'] = (vocab, d)
    for i in range(layers):
        p = f'model/layers/{i}/'
        out |= {p + 'input_layernorm/weight': (d,), p + 'post_attention_layernorm/weight': (d,)}
        out[p + 'self_attn/q_proj/weight'] = (heads * head_dim, d)
        out[p + 'self_attn/k_proj/weight'] = (kv * head_dim, d)
        out[p + 'self_attn/v_proj/weight'] = (kv * head_dim, d)
        out[p + 'self_attn/o_proj/weight'] = (d, heads * head_dim)
        out[p + 'mlp/gate_proj/weight'] = (ff, d)
        out[p + 'mlp/up_proj/weight'] = (ff, d)
        out[p + 'mlp/down_proj/weight'] = (d, ff)
    return {k: S(v, dtype) for k, v in out.items()}


def flax_llama(layers=2, d=64, vocab=256, ff=128, heads=4, kv=2, stacked=False, dtype=F32):
    """The Flax target of the same model (the preset's target, from the sizes alone)."""
    config = {
        'model_type': 'llama',
        'vocab_size': vocab,
        'hidden_size': d,
        'intermediate_size': ff,
        'num_hidden_layers': layers,
        'num_attention_heads': heads,
        'num_key_value_heads': kv,
        'head_dim': 16,
        'tie_word_embeddings': False,
    }
    p = osurg.huggingface.preset(config, layers='stacked' if stacked else 'unrolled', dtype=dtype)
    return p.target


def mlp(prefix='params', layers=3, d=32, dtype=F32, name='Dense'):
    """A small Flax MLP's parameters, flat."""
    out = {}
    for i in range(layers):
        out[f'{prefix}/{name}_{i}/kernel'] = S((d, d), dtype)
        out[f'{prefix}/{name}_{i}/bias'] = S((d,), dtype)
    return out


def encoder(attention='attention', layers=2, d=32):
    out = {}
    for i in range(layers):
        for leaf in ('query', 'key', 'value', 'out'):
            out[f'encoder/layers_{i}/{attention}/{leaf}/kernel'] = S((d, d), F32)
    return out


def stacked(tree_keys, count):
    return {k: S((count, *v.shape), v.dtype) for k, v in tree_keys.items()}


BLOCK = {'w': S((8, 8), F32), 'b': S((8,), F32)}


def block_layers(count=4, stack=False):
    """A block's `w` and `b`, one `layers_{i}/...` per layer or stacked as `layers/...`."""
    if stack:
        return stacked({f'layers/{n}': v for n, v in BLOCK.items()}, count)
    return {f'layers_{i}/{n}': v for i in range(count) for n, v in BLOCK.items()}


def fp(**kwargs):
    return osurg.huggingface.from_pytorch(**kwargs)


@dataclasses.dataclass(frozen=True)
class Mistake:
    """A mistake a user makes, the plan's error for it, and the fix it must suggest first."""

    name: str
    category: str
    case: Callable[[], tuple[Any, Any, list[Any]]]  # -> (checkpoint shapes, target, rules)
    error: type[osurg.SurgeryError]
    fix: str


def _mlp_with(**changes):
    out = mlp()
    out.update(changes)
    return out


MISTAKES = [
    # Typos and names.
    Mistake(
        'typo in a Rename replacement',
        'typo',
        lambda: (
            mlp('params', name='dense'),
            mlp(),
            [osurg.Rename(r'params/dense_(\d+)/(.*)', r'params/Dens_\1/\2')],
        ),
        osurg.UnmatchedKeyError,
        r"Rename('(.*)/Dens_(\\d+)/(.*)', '\\1/Dense_\\2/\\3')",
    ),
    Mistake(
        "typo in from_pytorch's drop_prefix",
        'typo',
        lambda: (hf_llama(), flax_llama(), fp(drop_prefix='modle')),
        osurg.UnmatchedKeyError,
        "from_pytorch(drop_prefix='model')",
    ),
    Mistake(
        "another family's prefix in drop_prefix",
        'wrong prefix',
        lambda: (hf_llama(), flax_llama(), fp(drop_prefix='transformer')),
        osurg.UnmatchedKeyError,
        "from_pytorch(drop_prefix='model')",
    ),
    Mistake(
        'typo in a Rename pattern',
        'typo',
        lambda: (
            mlp('params'),
            {k.removeprefix('params/'): v for k, v in mlp().items()},
            [osurg.Rename('parms/(.*)', r'\1')],
        ),
        osurg.UnmatchedKeyError,
        r"Rename(pattern='params/(.*)', replacement='\\1')",
    ),
    Mistake(
        'typo in a Drop pattern',
        'typo',
        lambda: ({**mlp(), 'opt_state/mu': S((2,), F32)}, mlp(), [osurg.Drop('opt_sate/.*')]),
        osurg.UnmatchedKeyError,
        "Drop(pattern='opt_state/.*')",
    ),
    Mistake(
        'a module renamed in the new model',
        'typo',
        lambda: (encoder('attention'), encoder('self_attention'), []),
        osurg.UnmatchedKeyError,
        r"Rename('(.*)/attention/(.*)', '\\1/self_attention/\\2')",
    ),
    Mistake(
        "the target's leading 'params'",
        'wrong prefix',
        lambda: ({k.removeprefix('params/'): v for k, v in mlp().items()}, mlp(), []),
        osurg.UnmatchedKeyError,
        r"Rename('(.*)', 'params/\\1')",
    ),
    Mistake(
        "the checkpoint's extra leading 'model'",
        'wrong prefix',
        lambda: ({f'model/{k}': v for k, v in mlp().items()}, mlp(), []),
        osurg.UnmatchedKeyError,
        r"Rename('model/(.*)', '\\1')",
    ),
    Mistake(
        'a new parameter the checkpoint never had',
        'new parameter',
        lambda: (mlp(), {**mlp(), 'value_head/w': S((32,), F32)}, []),
        osurg.UnmatchedKeyError,
        "Fallback(pattern='value_head/w')",
    ),
    Mistake(
        'a Hugging Face checkpoint with no rules',
        'forgotten transpose',
        lambda: (hf_llama(), flax_llama(), []),
        osurg.UnmatchedKeyError,
        "from_pytorch(drop_prefix='model')",
    ),
    Mistake(
        'PyTorch weights renamed by hand',
        'forgotten transpose',
        lambda: (
            {k.replace('kernel', 'weight'): v for k, v in mlp().items()},
            mlp(),
            [],
        ),
        osurg.UnmatchedKeyError,
        'from_pytorch(...): PyTorch names and layouts (a weight is transposed too)',
    ),
    # Layers.
    Mistake(
        'more unrolled layers in the target',
        'wrong layer count',
        lambda: (hf_llama(layers=2), flax_llama(layers=3), fp(drop_prefix='model')),
        osurg.UnmatchedKeyError,
        "a target with 2 layers (the checkpoint's count)",
    ),
    Mistake(
        'more stacked layers in the target',
        'wrong layer count',
        lambda: (
            hf_llama(layers=2),
            flax_llama(layers=3, stacked=True),
            fp(drop_prefix='model', layers='stacked'),
        ),
        osurg.ShapeMismatchError,
        "a target with 2 layers (the checkpoint's count)",
    ),
    Mistake(
        'fewer stacked layers in the target',
        'wrong layer count',
        lambda: (
            hf_llama(layers=3),
            flax_llama(layers=2, stacked=True),
            fp(drop_prefix='model', layers='stacked'),
        ),
        osurg.ShapeMismatchError,
        "a target with 3 layers (the checkpoint's count)",
    ),
    Mistake(
        'a scanned checkpoint into an unrolled model, no Unstack',
        'scan/unroll',
        lambda: (
            block_layers(stack=True),
            block_layers(),
            [],
        ),
        osurg.UnmatchedKeyError,
        r"Unstack('layers/(.*)', 'layers_{i}/\\1')",
    ),
    Mistake(
        'an unrolled checkpoint into a scanned model, no Stack',
        'scan/unroll',
        lambda: (
            block_layers(),
            block_layers(stack=True),
            [],
        ),
        osurg.UnmatchedKeyError,
        r"Stack('layers_{i}/(.*)', 'layers/\\1')",
    ),
    Mistake(
        'layers stacked on the wrong axis',
        'scan/unroll',
        lambda: (
            {f'layers_{i}/w': S((8,), F32) for i in range(4)},
            {'layers/w': S((8, 4), F32)},
            [osurg.Stack('layers_{i}/w', 'layers/w')],
        ),
        osurg.ShapeMismatchError,
        "Stack(pattern='layers_{i}/w', replacement='layers/w', axis=1, layers=None)",
    ),
    # Shapes: transposes, heads, sizes.
    Mistake(
        'PyTorch Linear weights renamed, not transposed',
        'forgotten transpose',
        lambda: (
            {k: S(v.shape[::-1], v.dtype) for k, v in mlp(d=32).items()}
            | {f'params/Dense_{i}/kernel': S((16, 32), F32) for i in range(3)},
            {**mlp(), **{f'params/Dense_{i}/kernel': S((32, 16), F32) for i in range(3)}},
            [],
        ),
        osurg.ShapeMismatchError,
        "Transpose('.*/kernel', (1, 0))",
    ),
    Mistake(
        'one transposed kernel',
        'forgotten transpose',
        lambda: (
            _mlp_with(**{'params/Dense_1/kernel': S((16, 32), F32)}),
            _mlp_with(**{'params/Dense_1/kernel': S((32, 16), F32)}),
            [],
        ),
        osurg.ShapeMismatchError,
        "Transpose('params/Dense_1/kernel', (1, 0))",
    ),
    Mistake(
        'a PyTorch conv kernel',
        'forgotten transpose',
        lambda: (
            {'conv/kernel': S((16, 3, 5, 7), F32)},
            {'conv/kernel': S((5, 7, 3, 16), F32)},
            [],
        ),
        osurg.ShapeMismatchError,
        "Transpose('conv/kernel', (2, 3, 1, 0))",
    ),
    Mistake(
        'heads not split',
        'wrong heads',
        lambda: (
            {'attn/query/kernel': S((64, 64), F32)},
            {'attn/query/kernel': S((64, 4, 16), F32)},
            [],
        ),
        osurg.ShapeMismatchError,
        "Reshape('attn/query/kernel', (64, 4, 16))",
    ),
    Mistake(
        'heads not merged',
        'wrong heads',
        lambda: (
            {'attn/out/kernel': S((4, 16, 64), F32)},
            {'attn/out/kernel': S((64, 64), F32)},
            [],
        ),
        osurg.ShapeMismatchError,
        "Reshape('attn/out/kernel', (64, 64))",
    ),
    Mistake(
        'a target with twice the heads',
        'wrong heads',
        lambda: (hf_llama(ff=96), flax_llama(heads=8, ff=96), fp(drop_prefix='model')),
        osurg.ShapeMismatchError,
        "a target with the checkpoint's attention width (64, not 128)",
    ),
    Mistake(
        'a target of another hidden size',
        'wrong size',
        lambda: (hf_llama(d=32), flax_llama(d=64), fp(drop_prefix='model')),
        osurg.ShapeMismatchError,
        "a target with the checkpoint's hidden size (32, not 64)",
    ),
    Mistake(
        'a norm scale of another hidden size',
        'wrong size',
        lambda: (
            {
                'norm/scale': S((64,), F32),
                'dense/kernel': S((64, 64), F32),
                'out/kernel': S((64, 8), F32),
            },
            {
                'norm/scale': S((512,), F32),
                'dense/kernel': S((512, 512), F32),
                'out/kernel': S((512, 8), F32),
            },
            [],
        ),
        osurg.ShapeMismatchError,
        "a target with the checkpoint's hidden size (64, not 512)",
    ),
    Mistake(
        'a target of another MLP width',
        'wrong size',
        lambda: (hf_llama(ff=96), flax_llama(ff=128), fp(drop_prefix='model')),
        osurg.ShapeMismatchError,
        "a target with the checkpoint's MLP width (96, not 128)",
    ),
    Mistake(
        'a padded vocabulary',
        'wrong size',
        lambda: (
            {'embed_tokens/embedding': S((264, 64), F32), 'norm/scale': S((64,), F32)},
            {'embed_tokens/embedding': S((256, 64), F32), 'norm/scale': S((64,), F32)},
            [],
        ),
        osurg.ShapeMismatchError,
        "Slice('embed_tokens/embedding', np.s_[:256])",
    ),
    # Dtypes.
    Mistake(
        'a bfloat16 checkpoint into a float32 model',
        'wrong dtype',
        lambda: (mlp(dtype=BF16), mlp(dtype=F32), []),
        osurg.DtypeMismatchError,
        "Cast('.*', 'float32')",
    ),
    Mistake(
        'one float32 leaf into a bfloat16 model',
        'wrong dtype',
        lambda: (
            _mlp_with(**{'params/Dense_2/bias': S((32,), F32)})
            | {k: S(v.shape, BF16) for k, v in mlp().items() if k != 'params/Dense_2/bias'},
            mlp(dtype=BF16),
            [],
        ),
        osurg.DtypeMismatchError,
        "Cast('params/Dense_2/bias', 'bfloat16')",
    ),
    Mistake(
        'float16 into float32 for the head only',
        'wrong dtype',
        lambda: (
            {**mlp(), 'head/kernel': S((32, 8), np.dtype(np.float16))},
            {**mlp(), 'head/kernel': S((32, 8), F32)},
            [],
        ),
        osurg.DtypeMismatchError,
        "Cast('head/kernel', 'float32')",
    ),
    # Unused keys.
    Mistake(
        'optimizer state left in the checkpoint',
        'unused keys',
        lambda: (
            {**mlp(), **{f'opt_state/{m}/{k}': v for m in ('mu', 'nu') for k, v in mlp().items()}},
            mlp(),
            [],
        ),
        osurg.UnusedKeyError,
        "Drop('opt_state/.*')",
    ),
    Mistake(
        'rotary buffers in a PyTorch checkpoint',
        'unused keys',
        lambda: (
            {
                **hf_llama(),
                **{
                    f'model/layers/{i}/self_attn/rotary_emb/inv_freq': S((8,), F32)
                    for i in range(2)
                },
            },
            flax_llama(),
            fp(drop_prefix='model'),
        ),
        osurg.UnusedKeyError,
        "Drop('.*/inv_freq')",
    ),
    Mistake(
        'a step counter beside the params',
        'unused keys',
        lambda: ({**mlp(), 'step': S((), np.dtype(np.int32))}, mlp(), []),
        osurg.UnusedKeyError,
        "Drop('step')",
    ),
    Mistake(
        'unused keys under a prefix that also holds used ones',
        'unused keys',
        lambda: (
            {
                **mlp(),
                'params/Dense_0/kernel_ema': S((32, 32), F32),
                'params/Dense_1/kernel_ema': S((32, 32), F32),
            },
            mlp(),
            [],
        ),
        osurg.UnusedKeyError,
        "Drop('.*/kernel_ema')",
    ),
    # Rule order.
    Mistake(
        'a Rename placed after the rule that renamed its keys',
        'rule order',
        lambda: (
            {f'model/{k}': v for k, v in mlp().items()},
            {k.replace('Dense', 'dense'): v for k, v in mlp().items()},
            [
                osurg.Rename('model/(.*)', r'\1'),
                osurg.Rename(r'model/params/Dense_(\d+)/(.*)', r'params/dense_\1/\2'),
            ],
        ),
        osurg.UnmatchedKeyError,
        'put rules[1] before rules[0]',
    ),
]


def first_error(mistake: Mistake) -> osurg.SurgeryError:
    """The first error of the plan the mistake makes (the root cause)."""
    source, target, rules = mistake.case()
    plan = osurg.resolve(source, target, rules)
    assert plan.errors, f'{mistake.name}: the plan has no errors'
    return plan.errors[0]


def _raises(fn: Callable[[], Any]) -> osurg.SurgeryError:
    try:
        fn()
    except osurg.SurgeryError as e:
        return e
    raise AssertionError(f'{fn} raised nothing')


def _destination_exists():
    osurg.save_safetensors({'w': np.ones(2)}, tempfile.mkdtemp())


def _not_found():
    osurg.plan_restore('/no/such/checkpoint')


def _unfinalized():
    osurg.plan_restore('/ckpts/7.orbax-checkpoint-tmp-1700000000/default')


def _truncated():
    from orbax_surgery.huggingface.safetensors_file import write_file

    path = tempfile.mkdtemp() + '/model.safetensors'
    write_file(path, {'w': np.ones(4, np.float32)})
    os.truncate(path, os.path.getsize(path) - 4)
    osurg.SafetensorsCheckpoint(path)


def _no_lora_layout():
    import orbax.checkpoint as ocp

    path = tempfile.mkdtemp() + '/ckpt'
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, {'w': np.ones(2)})
    osurg.read_lora_layout(path)


def _checksum_mismatch():
    import shutil

    import orbax.checkpoint as ocp

    from orbax_surgery.read.checksum_records import CHECKSUMS_DIR

    path = tempfile.mkdtemp() + '/ckpt'
    with ocp.Checkpointer(osurg.SurgeryCheckpointHandler(use_ocdbt=False)) as ckptr:
        ckptr.save(path, args=osurg.SurgerySave(item={'w': np.ones(4)}, checksums=True))
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)) as ckptr:
        ckptr.save(path + '2', {'w': np.zeros(4)})
    shutil.copytree(f'{path}/{CHECKSUMS_DIR}', f'{path}2/{CHECKSUMS_DIR}')
    osurg.restore(path + '2', verify=True)


def _peer_timeout():
    from orbax_surgery.write.barrier import Barrier

    barrier = Barrier('orbax_surgery.export', call=1, timeout_secs=5, process=0, count=2)
    raise barrier.timed_out('written', 5.0, 'DEADLINE_EXCEEDED', 'Nothing written.')


@dataclasses.dataclass(frozen=True)
class Example:
    """An error outside planning: how to cause it and what fixes it."""

    error: type[osurg.SurgeryError]
    cause: Callable[[], Any]
    fix: str


EXAMPLES = [
    Example(
        osurg.RuleError,
        lambda: osurg.Cast('w', 'bfloat17'),
        "Name a real dtype: Cast('w', 'bfloat16').",
    ),
    Example(
        osurg.AmbiguousRuleError,
        lambda: osurg.apply_rules(
            {'a': np.ones(2), 'b': np.ones(2)}, None, [osurg.Rename('a|b', 'w')]
        ),
        'Give each key its own name, or Drop the one not wanted.',
    ),
    Example(
        osurg.CheckpointNotFoundError,
        _not_found,
        'Point at the item directory (`<step>/<item>`), or the step with `--step/--item`.',
    ),
    Example(
        osurg.UnfinalizedCheckpointError,
        _unfinalized,
        'Restore a finalized step; the temporary one is from an interrupted or running save.',
    ),
    Example(
        osurg.SourceReadError,
        _truncated,
        'Copy the file again: it is shorter than its header says.',
    ),
    Example(
        osurg.ChecksumMismatchError,
        _checksum_mismatch,
        'The data changed since it was saved: restore another step, or save again.',
    ),
    Example(
        osurg.LoraMismatchError,
        _no_lora_layout,
        'Pass the LoraSpec to LoraRestore, or restore a checkpoint that LoraSave wrote.',
    ),
    Example(
        osurg.DestinationExistsError,
        _destination_exists,
        'Choose a new destination, or pass overwrite=True.',
    ),
    Example(
        osurg.PeerTimeoutError,
        _peer_timeout,
        'Find the process that died or hangs (its log); raise timeout_secs if it is only slow.',
    ),
]


def errors_doc() -> str:
    """docs/errors.md: every SurgeryError subclass, an example message and the fix."""
    by_class: dict[type, list[tuple[str, str, str]]] = {}
    for mistake in MISTAKES:
        error = first_error(mistake)
        by_class.setdefault(type(error), []).append((mistake.name, str(error), mistake.fix))
    for example in EXAMPLES:
        error = _raises(example.cause)
        by_class.setdefault(type(error), []).append(('', str(error), example.fix))
    lines = [
        '# Errors',
        '',
        'Every error this package raises is a `SurgeryError` (a `ValueError`). A plan lists its',
        'errors root cause first, each with the errors that follow from it folded under it',
        '(`error.consequences`) and its fixes, best first (`error.suggestions`).',
        '',
        'Generated by `python tests/mistakes.py > docs/errors.md` from the table of mistakes that',
        '`tests/plan/mistakes_test.py` checks: for each one, the first suggestion is the fix.',
        '',
    ]
    classes = [osurg.SurgeryError, *_subclasses(osurg.SurgeryError)]
    for cls in classes:
        doc = inspect.getdoc(cls).split('\n\n')[0].replace('\n', ' ')
        lines += [f'## `{cls.__name__}`', '', doc, '']
        for name, message, fix in by_class.get(cls, []):
            if name:
                lines.append(f'**{name}**')
                lines.append('')
            lines += ['```text', _shortened(message), '```', '', f'Fix: {fix}', '']
    return '\n'.join(lines).rstrip() + '\n'


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in sorted(cls.__subclasses__(), key=lambda c: c.__name__):
        out += [sub, *_subclasses(sub)]
    return out


def _shortened(message: str, width: int = 96) -> str:
    import textwrap

    message = re.sub(re.escape(tempfile.gettempdir()) + r'/tmp\w+', '/tmp/dir', message)
    return '\n'.join(textwrap.wrap(message, width, break_on_hyphens=False, break_long_words=False))


if __name__ == '__main__':
    sys.stdout.write(errors_doc())
