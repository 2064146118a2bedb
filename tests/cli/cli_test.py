"""The installed console script, run as a user would: inspect, plan, convert, demo."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import orbax.checkpoint as ocp
import pytest
from fixtures import random_array
from safetensors.numpy import load_file

import orbax_surgery as osurg
from orbax_surgery.cli import main as cli
from orbax_surgery.huggingface.safetensors_file import write_file


def run(*args, env=None, cwd=None):
    exe = shutil.which('orbax-surgery')
    cmd = [exe, *args] if exe else [sys.executable, '-m', 'orbax_surgery.cli', *args]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [str(a) for a in cmd], capture_output=True, text=True, timeout=300, env=full_env, cwd=cwd
    )


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def one_line_error(result, *parts):
    assert result.returncode == 2, result.stdout + result.stderr
    assert 'Traceback' not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    for part in parts:
        assert part in result.stderr, result.stderr


SCANNED = {
    'params': {
        'layers': {
            'mlp': {'kernel': random_array((4, 8, 16), seed=1)},
            'norm': {'scale': random_array((4, 8), seed=2)},
        },
        'embed': {'embedding': random_array((32, 8), seed=3)},
    },
    'opt_state': {'mu': np.zeros(8, np.float32)},
    'step': 5,
}
LORA = osurg.LoraSpec(['params/embed/embedding'], rank=2, alpha=4).bind(SCANNED)
LORA_A, LORA_B = random_array((32, 2), seed=4), random_array((2, 8), seed=5)
ADAPTERS = {'params': {'embed': {'embedding_lora_a': LORA_A, 'embedding_lora_b': LORA_B}}}
UNROLL = """
[[rules]]
drop = 'opt_state/.*|step'
[[rules]]
rename = { pattern = 'params/(.*)', replacement = '\\1' }
[[rules]]
unstack = { pattern = 'layers/(.*)', replacement = 'layers_{i}/\\1' }
"""
HF = {
    'model.embed_tokens.weight': random_array((32, 8), seed=6),
    'model.layers.0.q_proj.weight': random_array((16, 8), seed=7),
    'model.layers.1.q_proj.weight': random_array((16, 8), seed=8),
    'model.norm.weight': random_array((8,), seed=9),
    'lm_head.weight': random_array((32, 8), seed=10),
}


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    """A CheckpointManager directory: step 1 (the scanned tree), step 5 (it and adapters)."""
    path = tmp_path_factory.mktemp('run')
    with ocp.CheckpointManager(path) as manager:
        manager.save(1, args=ocp.args.Composite(default=ocp.args.StandardSave(SCANNED)))
        adapters = osurg.LoraSave(item=ADAPTERS, lora=LORA)
        both = ocp.args.Composite(default=ocp.args.StandardSave(SCANNED), adapters=adapters)
        manager.save(5, args=both)
    return path


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
    """Hugging Face safetensors in two shards with their index."""
    path = tmp_path_factory.mktemp('hf')
    names = list(HF)
    write_file(path / 'model-00001-of-00002.safetensors', {n: HF[n] for n in names[:3]})
    write_file(path / 'model-00002-of-00002.safetensors', {n: HF[n] for n in names[3:]})
    weight_map = {n: f'model-0000{1 + (i >= 3)}-of-00002.safetensors' for i, n in enumerate(names)}
    (path / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': weight_map}))
    return path


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def restored(path):
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path)


def test_inspect_orbax_item_manager_root_and_safetensors(root, hf_dir):
    out = ok(run('inspect', root)).stdout
    assert 'steps: 1, 5' in out and 'showing step 5, items: adapters, default' in out
    assert 'saved by LoraSave: LoRA layout: 1 adapters' in out
    assert 'params/embed/embedding (32, 8): rank 2, scale 2, A (32, 2), B (2, 8)' in out
    assert any(
        line.split() == ['kernel', '(4,', '8,', '16)', 'float32', '(4,', '8,', '16)', '2.0', 'KiB']
        for line in out.splitlines()
    )

    manager = json.loads(ok(run('inspect', root, '--step', '1', '--json')).stdout)
    assert manager['kind'] == 'manager' and manager['steps'] == [1, 5] and manager['step'] == 1
    assert list(manager['items']) == ['default']

    item = json.loads(ok(run('inspect', root / '5' / 'default', '--json')).stdout)
    arrays = {a['key']: a for a in item['arrays']}
    assert sorted(arrays) == [
        'opt_state/mu',
        'params/embed/embedding',
        'params/layers/mlp/kernel',
        'params/layers/norm/scale',
        'step',
    ]
    kernel = arrays['params/layers/mlp/kernel']
    assert kernel['shape'] == [4, 8, 16] and kernel['dtype'] == 'float32'
    assert kernel['bytes'] == 4 * 8 * 16 * 4 and kernel['chunk_shape'] == [4, 8, 16]
    assert item['bytes'] == sum(a['bytes'] for a in arrays.values()) and item['lora'] is None

    text = ok(run('inspect', hf_dir)).stdout
    assert f'Safetensors checkpoint {hf_dir}: 5 tensors' in text and 'in 2 files' in text
    assert any(line.split()[:3] == ['weight', '(16,', '8)'] for line in text.splitlines())
    hf = json.loads(ok(run('inspect', hf_dir, '--json')).stdout)
    by_name = {a['name']: a for a in hf['arrays']}
    assert set(by_name) == set(HF) and by_name['lm_head.weight']['shape'] == [32, 8]
    assert hf['files'] == ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']


@pytest.mark.slow
def test_plan_text_json_errors_and_debug(root, tmp_path):
    rules = write(tmp_path / 'unroll.toml', UNROLL)
    text = ok(run('plan', root, '--step', '5', '--item', 'default', '--rules', rules)).stdout
    assert text.startswith('Plan (ready): 9 target leaves from 5 checkpoint arrays')
    assert 'params/layers/mlp/kernel[3, 0:8, 0:16]' in text
    assert "Drop(pattern='opt_state/.*|step'): 'opt_state/mu', 'step'" in text

    summary = json.loads(ok(run('plan', root / '5' / 'default', '--rules', rules, '--json')).stdout)
    targets = {t['key']: t for t in summary['targets']}
    assert len(targets) == 9 and summary['errors'] == []
    assert targets['layers_2/norm/scale']['shape'] == [8]
    assert targets['layers_2/norm/scale']['sources'] == ['params/layers/norm/scale']

    model = write(
        tmp_path / 'model.py',
        """
        import jax
        import jax.numpy as jnp


        def init():
            layer = {'mlp': {'kernel': jnp.zeros((8, 16))}, 'norm': {'scale': jnp.zeros(8)}}
            params = {f'layers_{i}': layer for i in range(4)}
            params['layers_3'] = {**layer, 'mlp': {'kernel': jnp.zeros((16, 8))}}
            return {'embed': {'embedding': jnp.zeros((32, 8))}, **params}


        def abstract_params():
            return jax.eval_shape(init)
        """,
    )
    result = run(
        'plan', root / '5' / 'default', '--rules', rules, '--target', f'{model}:abstract_params'
    )
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert 'Plan (1 error(s)): 8 target leaves' in result.stdout
    assert 'Errors (1), causes first:' in result.stdout
    assert "Target 'layers_3/mlp/kernel' has shape (16, 8), but" in result.stdout
    assert 'a forgotten transpose?' in result.stdout

    typo = write(
        tmp_path / 'typo.toml', "[[rules]]\nunstak = { pattern = 'a', replacement = 'b' }\n"
    )
    result = run('plan', root / '5' / 'default', '--rules', typo)
    one_line_error(result, "rules[0]: unknown rule kind 'unstak'", "Did you mean 'unstack'")
    debug = run('plan', root / '5' / 'default', '--rules', typo, '--debug')
    assert debug.returncode != 0 and 'Traceback' in debug.stderr and 'RuleError' in debug.stderr


@pytest.mark.slow
def test_convert_orbax_unstacked_refuses_an_existing_destination(root, tmp_path):
    rules = write(tmp_path / 'unroll.toml', UNROLL)
    dst = tmp_path / 'unrolled'
    result = ok(run('convert', root / '5' / 'default', dst, '--rules', rules))
    assert result.stdout.startswith(f'Wrote {dst} (Orbax checkpoint): 9 arrays, 3.1 KiB')
    assert 'converting' in result.stderr and '3.1 KiB / 3.1 KiB' in result.stderr
    tree = restored(dst)
    assert sorted(tree) == ['embed', 'layers_0', 'layers_1', 'layers_2', 'layers_3']
    layers = SCANNED['params']['layers']
    for i in range(4):
        np.testing.assert_array_equal(
            tree[f'layers_{i}']['mlp']['kernel'], layers['mlp']['kernel'][i]
        )
        np.testing.assert_array_equal(
            tree[f'layers_{i}']['norm']['scale'], layers['norm']['scale'][i]
        )

    one_line_error(run('convert', root, dst, '--rules', rules), f'{dst} exists', '--overwrite')

    subset = write(
        tmp_path / 'subset.toml', UNROLL.replace("_{i}/\\1' }", "_{i}/\\1', layers = [3, 1] }")
    )
    result = ok(run('convert', root, dst, '--rules', subset, '--overwrite', '--quiet'))
    assert result.stdout == result.stderr == ''
    tree = restored(dst)
    assert sorted(tree) == ['embed', 'layers_0', 'layers_1']
    np.testing.assert_array_equal(tree['layers_0']['mlp']['kernel'], layers['mlp']['kernel'][3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ['subset.toml', 'unroll.toml', 'unrolled']


def test_convert_safetensors_to_orbax_with_from_pytorch_in_yaml(hf_dir, tmp_path):
    rules = write(
        tmp_path / 'import.yaml',
        """
        rules:
          - preset: from_pytorch
            drop_prefix: model
        target:
          embed_tokens: {embedding: {shape: [32, 8], dtype: float32}}
          layers_0/q_proj/kernel: {shape: [8, 16], dtype: float32}
          layers_1/q_proj/kernel: {shape: [8, 16], dtype: float32}
          norm/scale: {shape: [8], dtype: float32}
          lm_head/kernel: {shape: [8, 32], dtype: float32}
        """,
    )
    ok(run('convert', hf_dir, tmp_path / 'flax', '--rules', rules, '--max-inflight-bytes', '1K'))
    tree = restored(tmp_path / 'flax')
    np.testing.assert_array_equal(
        tree['layers_1']['q_proj']['kernel'], HF['model.layers.1.q_proj.weight'].T
    )
    np.testing.assert_array_equal(tree['lm_head']['kernel'], HF['lm_head.weight'].T)
    np.testing.assert_array_equal(
        tree['embed_tokens']['embedding'], HF['model.embed_tokens.weight']
    )
    np.testing.assert_array_equal(tree['norm']['scale'], HF['model.norm.weight'])


def test_convert_orbax_to_safetensors_with_python_rules(root, tmp_path):
    rules = write(
        tmp_path / 'export.py',
        """
        import orbax_surgery as osurg

        rules = [
            osurg.Drop('opt_state/.*|step'),
            osurg.Rename('params/(.*)', r'\\1'),
            osurg.Unstack('layers/(.*)', r'layers_{i}/\\1'),
            *osurg.to_pytorch(add_prefix='model'),
        ]
        """,
    )
    dst = tmp_path / 'hf'
    args = ('--to', 'safetensors', '--max-shard-size', '1KB')
    ok(run('convert', root / '5' / 'default', dst, '--rules', rules, *args))
    index = json.loads((dst / 'model.safetensors.index.json').read_text())
    tensors = {}
    for file in sorted(set(index['weight_map'].values())):
        tensors |= load_file(dst / file)
    assert len(set(index['weight_map'].values())) > 1 and set(tensors) == set(index['weight_map'])
    layers = SCANNED['params']['layers']
    np.testing.assert_array_equal(
        tensors['model.layers.2.mlp.weight'], layers['mlp']['kernel'][2].T
    )
    np.testing.assert_array_equal(tensors['model.layers.3.norm.weight'], layers['norm']['scale'][3])
    np.testing.assert_array_equal(
        tensors['model.embed.weight'], SCANNED['params']['embed']['embedding']
    )


KILLER = """
import os, signal
import numpy as np
import orbax_surgery as osurg

calls = 0


def double(x):
    global calls
    if isinstance(x, np.ndarray):  # Not while jax.eval_shape traces it.
        calls += 1
        if calls == int(os.environ.get('KILL_AT_BLOCK', 0)):
            os.kill(os.getpid(), signal.SIGKILL)
    return x * 2


rules = [osurg.MapValue('.*', double, elementwise=True)]
"""


@pytest.mark.slow
def test_an_interrupted_convert_leaves_no_destination_and_a_rerun_works(tmp_path):
    values = {f'w{i}': random_array((64, 64), seed=i) for i in range(8)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / 'src', values)
    rules = write(tmp_path / 'double.py', KILLER)
    dst = tmp_path / 'out'
    args = ('convert', tmp_path / 'src', dst, '--rules', rules, '--max-inflight-bytes', '16K')

    killed = run(*args, env={'KILL_AT_BLOCK': '5'})  # Killed with four leaves written.
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not dst.exists()
    (partial,) = [p for p in tmp_path.iterdir() if p.name.startswith('out.converting-')]

    again = ok(run(*args))
    assert f'Removing {partial}, left by an interrupted convert.' in again.stderr
    assert not partial.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        'double.py',
        'out',
        'src',
    ]
    tree = restored(dst)
    for key, value in values.items():
        np.testing.assert_array_equal(tree[key], value * 2)

    failing = write(
        tmp_path / 'fails.py',
        KILLER.replace('os.kill(os.getpid(), signal.SIGKILL)', "raise RuntimeError('boom')"),
    )
    result = run(
        'convert',
        tmp_path / 'src',
        tmp_path / 'out2',
        '--rules',
        failing,
        '--max-inflight-bytes',
        '16K',
        env={'KILL_AT_BLOCK': '3'},
    )
    assert result.returncode == 2 and 'RuntimeError: boom' in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ['double.py', 'fails.py', 'out', 'src']


@pytest.mark.slow
def test_convert_merges_lora_adapters_and_plans_a_peft_merge(root, hf_dir, tmp_path):
    (tmp_path / 'adapters').symlink_to(root / '5' / 'adapters')
    rules = "[[rules]]\ndrop = 'opt_state/.*|step'\n[[rules]]\nlora = 'adapters'\n"
    write(tmp_path / 'merge.toml', rules)  # Paths relative to the working directory and the file.
    ok(run('convert', root, 'merged', '--rules', 'merge.toml', '--item', 'default', cwd=tmp_path))
    tree = restored(tmp_path / 'merged')
    want = SCANNED['params']['embed']['embedding'] + 2 * LORA_A @ LORA_B
    np.testing.assert_allclose(tree['params']['embed']['embedding'], want, rtol=1e-6)
    np.testing.assert_array_equal(
        tree['params']['layers']['mlp']['kernel'], SCANNED['params']['layers']['mlp']['kernel']
    )

    peft = tmp_path / 'peft'
    peft.mkdir()
    factors = {
        'lora_A.weight': random_array((2, 8), seed=11),
        'lora_B.weight': random_array((16, 2), seed=12),
    }
    write_file(
        peft / 'adapter_model.safetensors',
        {f'base_model.model.model.layers.0.q_proj.{k}': v for k, v in factors.items()},
    )
    (peft / 'adapter_config.json').write_text(json.dumps({'r': 2, 'lora_alpha': 3}))
    out = ok(run('inspect', peft)).stdout
    assert out.startswith(f'PEFT adapter {peft}: 2 tensors, 192 B\n  r=2, lora_alpha=3\n')
    rules = write(tmp_path / 'peft.yaml', 'rules:\n  - lora: peft\n')
    out = ok(run('plan', hf_dir, '--rules', rules)).stdout
    assert 'model/layers/0/q_proj/weight  (16, 8)' in out and ' + 1.5 * ' in out


@pytest.mark.parametrize('command', ['inspect', 'plan', 'convert', 'demo'])
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, '--help'])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f'orbax-surgery {command}' in out and 'example' in out


def test_no_command_prints_help_and_fails():
    result = run()
    assert result.returncode == 2
    assert all(c in result.stdout for c in ('inspect', 'plan', 'convert', 'demo'))


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


def test_convert_writes_a_step_of_a_checkpoint_manager(root, tmp_path, capsys):
    rules = write(tmp_path / 'unroll.toml', UNROLL)
    managed = tmp_path / 'managed'
    # Into a new manager directory, then step 1 of the source's own manager as another step.
    first = [root, managed, '--dst-step', '3', '--rules', rules]
    assert cli.main(['convert', *map(str, first)]) == 0
    assert 'Wrote step 3 of' in capsys.readouterr().out
    args = [root, root, '--step', '1', '--dst-step', '7', '--rules', rules, '--quiet']
    assert cli.main(['convert', *map(str, args)]) == 0
    layers = SCANNED['params']['layers']
    for path, step in ((managed, 3), (root, 7)):
        with ocp.CheckpointManager(path) as manager:
            assert step in manager.all_steps()
            tree = manager.restore(step, args=osurg.SurgeryRestore())
            assert manager.metadata(step).item_metadata is not None  # Orbax's step metadata
        np.testing.assert_array_equal(tree['layers_2']['mlp']['kernel'], layers['mlp']['kernel'][2])
    with ocp.CheckpointManager(root) as manager:
        manager.delete(7)  # The module's fixture, as the other tests expect it.
    # An existing step is kept unless --overwrite; safetensors have no steps.
    assert cli.main(['convert', str(root), str(managed), '--dst-step', '3', '-q']) == 2
    assert 'has step 3 already (steps: [3])' in capsys.readouterr().err
    again = [root, managed, '--step', '5', '--dst-step', '3', '--overwrite', '-q']
    assert cli.main(['convert', *map(str, again)]) == 0
    with ocp.CheckpointManager(managed) as manager:
        assert manager.all_steps() == [3]
        assert 'layers' in manager.restore(3, args=osurg.SurgeryRestore())['params']  # No rules
    bad = ['convert', str(root), str(tmp_path / 'hf'), '--dst-step', '1', '--to', 'safetensors']
    assert cli.main(bad) == 2
    assert 'safetensors have no steps' in capsys.readouterr().err
