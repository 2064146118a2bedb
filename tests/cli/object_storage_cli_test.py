"""The command line on s3:// and http:// locations, as a user runs it."""

import json
import shutil
import subprocess
import sys

import numpy as np
import object_stores
import orbax.checkpoint as ocp
import pytest

import orbax_surgery as osurg

TREE = {
    'layers_0': {'w': np.arange(12, dtype=np.float32).reshape(3, 4)},
    'layers_1': {'w': np.ones((3, 4), np.float32)},
}
RULES = "[[rules]]\nstack = { pattern = 'layers_{i}/(.*)', replacement = 'layers/\\1' }\n"


def run_raw(*args):
    exe = shutil.which('orbax-surgery')
    cmd = [exe, *args] if exe else [sys.executable, '-m', 'orbax_surgery.cli', *args]
    return subprocess.run([str(a) for a in cmd], capture_output=True, text=True, timeout=300)


def run(*args):
    done = run_raw(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_inspect_plan_and_convert_between_buckets_and_disk(s3, tmp_path):
    bucket = s3()
    with ocp.CheckpointManager(f'{bucket}/run') as manager:
        manager.save(5, args=ocp.args.StandardSave(TREE))
        manager.wait_until_finished()
    listed = json.loads(run('inspect', f'{bucket}/run', '--json'))
    assert listed['kind'] == 'manager' and listed['steps'] == [5]
    rules = tmp_path / 'stack.toml'
    rules.write_text(RULES)
    plan = json.loads(run('plan', f'{bucket}/run', '--rules', rules, '--json'))
    assert [t['key'] for t in plan['targets']] == ['layers/w']
    run('convert', f'{bucket}/run', f'{bucket}/stacked', '--rules', rules, '-q')
    stacked = osurg.restore(f'{bucket}/stacked')['layers']['w']
    np.testing.assert_array_equal(stacked, np.stack([TREE['layers_0']['w'], TREE['layers_1']['w']]))
    run('convert', f'{bucket}/stacked', f'{bucket}/hf', '--to', 'safetensors', '-q')
    run('convert', f'{bucket}/hf', tmp_path / 'local', '-q')  # And back to a local disk.
    np.testing.assert_array_equal(osurg.restore(tmp_path / 'local')['layers']['w'], stacked)
    run('convert', tmp_path / 'local', f'{bucket}/stacked', '--overwrite', '-q')
    np.testing.assert_array_equal(osurg.restore(f'{bucket}/stacked')['layers']['w'], stacked)


@pytest.mark.slow
def test_a_destination_in_a_bucket_is_kept_without_overwrite(s3):
    bucket = s3()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(f'{bucket}/src', TREE)
    run('convert', f'{bucket}/src', f'{bucket}/dst', '-q')
    again = run_raw('convert', f'{bucket}/src', f'{bucket}/dst')
    assert again.returncode == 2 and f'{bucket}/dst exists' in again.stderr


def test_inspect_a_model_over_http(tmp_path):
    osurg.save_safetensors(TREE, tmp_path / 'hf')
    with object_stores.range_server(tmp_path) as url:
        listed = json.loads(run('inspect', f'{url}/hf', '--json'))
    assert listed['kind'] == 'safetensors' and listed['path'] == f'{url}/hf'
    assert {a['name'] for a in listed['arrays']} == {'layers_0.w', 'layers_1.w'}
