"""A writer for crash_test.py to SIGKILL: sets up, prints 'ready', writes on 'go', prints 'done'.

Usage: crash_worker.py WRITER WORKDIR [STEP]

  convert-orbax, convert-safetensors: `orbax-surgery convert WORKDIR/src
      WORKDIR/dst --rules WORKDIR/rules.toml --overwrite` (the CLI's main).
  surgery-save STEP: SurgerySave of the unrolled tree with a Stack rule,
      as step STEP of a CheckpointManager in WORKDIR/run.
  lora-save STEP: LoraSave of adapters and a fully trained head, as step
      STEP (item 'adapters') of a CheckpointManager in WORKDIR/run.

Setup (imports, values, the manager) happens before 'ready', so the moments
crash_test.py picks after 'go' fall inside the write. The values are functions
of the step, so crash_test.py knows what every step must hold.
"""

from __future__ import annotations

import sys

import numpy as np

LAYERS, ROWS, COLS, RANK = 16, 1024, 512, 128
KEEP = 3  # Steps the writers' managers keep: saves also delete old steps.
# Orbax deletes an old step in place, file by file: killed midway, it leaves a step
# directory that a new manager lists but cannot restore. Moved to a subdirectory
# instead (one rename), an old step is either listed and whole or gone.
TRASH = 'deleted'
RULES_TOML = """\
[[rules]]
stack = { pattern = 'layers_{i}/(.*)', replacement = 'layers/\\1' }
[[rules]]
rename = { pattern = 'head/(.*)', replacement = 'lm_head/\\1' }
"""


def unrolled(step: int) -> dict:
    """The tree written at `step`: a layer per key, and a head."""
    rng = np.random.default_rng(step)
    tree = {
        f'layers_{i}': {'w': rng.standard_normal((ROWS, COLS), np.float32)} for i in range(LAYERS)
    }
    return tree | {'head': {'w': rng.standard_normal((COLS, 64), np.float32)}}


def stacked(step: int) -> dict:
    """`unrolled(step)` after the rules: what convert and SurgerySave write."""
    tree = unrolled(step)
    layers = np.stack([tree[f'layers_{i}']['w'] for i in range(LAYERS)])
    return {'layers': {'w': layers}, 'lm_head': {'w': tree['head']['w']}}


def lora(step: int) -> tuple:
    """(layout, trainable tree) of the LoRA writer at `step`."""
    from orbax_surgery import LoraSpec

    base = {f'layers_{i}': {'kernel': np.zeros((ROWS, COLS), np.float32)} for i in range(LAYERS)}
    base['head'] = {'kernel': np.zeros((COLS, 64), np.float32)}
    layout = LoraSpec([r'layers_\d+/kernel'], rank=RANK, train=['head/kernel']).bind(base)
    rng = np.random.default_rng(1000 + step)
    trainable = {
        f'layers_{i}': {
            'kernel_lora_a': rng.standard_normal((ROWS, RANK), np.float32),
            'kernel_lora_b': rng.standard_normal((RANK, COLS), np.float32),
        }
        for i in range(LAYERS)
    }
    trainable['head'] = {'kernel': rng.standard_normal((COLS, 64), np.float32)}
    return layout, trainable


def manager_options():
    import orbax.checkpoint as ocp

    return ocp.CheckpointManagerOptions(max_to_keep=KEEP, todelete_subdir=TRASH)


def main(writer: str, workdir: str, step: int) -> None:
    import orbax.checkpoint as ocp

    import orbax_surgery as osurg
    from orbax_surgery.cli import main as cli

    if writer.startswith('convert-'):
        to = writer.removeprefix('convert-')
        argv = ['convert', f'{workdir}/src', f'{workdir}/dst', '--rules', f'{workdir}/rules.toml']
        argv += ['--to', to, '--overwrite', '-q', '--max-inflight-bytes', '1M']
        if to == 'safetensors':
            argv += ['--max-shard-size', '1MB']  # Several files and an index.

        def write() -> None:
            assert cli.main(argv) == 0

    else:
        manager = ocp.CheckpointManager(f'{workdir}/run', options=manager_options())
        if writer == 'surgery-save':
            stack = osurg.Stack(r'layers_{i}/(.*)', r'layers/\1')
            rename = osurg.Rename(r'head/(.*)', r'lm_head/\1')
            args = osurg.SurgerySave(
                item=unrolled(step), rules=[stack, rename], max_inflight_bytes=2**20
            )
        else:
            layout, trainable = lora(step)
            args = ocp.args.Composite(adapters=osurg.LoraSave(item=trainable, lora=layout))

        def write() -> None:
            manager.save(step, args=args)
            manager.wait_until_finished()
            manager.close()

    print('ready', flush=True)
    if sys.stdin.readline().strip() != 'go':
        return
    write()
    print('done', flush=True)


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0)
