"""Eight processes restore one checkpoint at once: plain Orbax vs SurgeryRestore.

The checkpoint holds 4 incompressible float32 arrays saved sharded by rows on 8 devices. All
processes start together; each restores every array renamed and sharded by
rows on its own 8 fake CPU devices, checks the values, and reports its wall
time, peak RSS over its RSS just before restoring, and bytes TensorStore read.
Plain Orbax restores the same arrays under their saved names (it cannot
rename), so both read and place the same bytes. The last line is JSON.

    python benchmarks/load.py                     # 256 MiB checkpoint, 8 processes
    python benchmarks/load.py --mib 64 --processes 4 --budget-mib 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from incompressible import random_float32
from measuring import PeakRss, summarize, tensorstore_bytes_read, worker_env

ARRAYS, COLS = 4, 1024
METHODS = ('orbax', 'surgery')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--mib', type=float, default=256, help='checkpoint size in MiB')
    parser.add_argument('--processes', type=int, default=8, help='concurrent restores')
    parser.add_argument('--budget-mib', type=float, default=16, help="surgery's max_inflight_bytes")
    parser.add_argument('--dir', default='/tmp/orbax-surgery-bench/load')
    parser.add_argument('--worker', choices=[*METHODS, 'save'], help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.dir) / f'{args.mib:g}MiB'
    if args.worker:
        _setup_jax()
        if args.worker == 'save':
            result = _save(root, args.mib)
        else:
            result = _restore(args.worker, root, args.mib, int(args.budget_mib * 2**20))
        print(json.dumps(result))
        return

    if not (root / '1' / 'default' / '_METADATA').exists():
        print(f'Writing {args.mib:g} MiB to {root} ...', flush=True)
        _run_all('save', args, 1)
    results = {}
    for method in METHODS:
        start = time.monotonic()
        runs = _run_all(method, args, args.processes)
        results[method] = summarize(runs, bytes_field='bytes_restored')
        results[method]['all_done_s'] = round(time.monotonic() - start, 3)
        results[method]['all_equal'] = all(r['equal'] for r in runs)
    _print_table(results, args)
    print(json.dumps({'mib': args.mib, 'processes': args.processes, 'results': results}))


def _run_all(method: str, args: argparse.Namespace, processes: int) -> list[dict]:
    cmd = [sys.executable, __file__, '--worker', method, '--mib', str(args.mib)]
    cmd += ['--dir', args.dir, '--budget-mib', str(args.budget_mib)]
    procs = [
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=worker_env()
        )
        for _ in range(processes)
    ]
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        if p.returncode:
            sys.exit(f'{method} worker failed:\n{out[-6000:]}')
    return [json.loads(out.strip().splitlines()[-1]) for out in outs]


def _setup_jax() -> None:
    import jax

    jax.config.update('jax_num_cpu_devices', 8)


def _values(mib: float) -> dict:
    rows = max(8, int(mib * 2**20 / (ARRAYS * COLS * 4)) // 8 * 8)
    return {f'layer_{i}': {'kernel': random_float32(i, (rows, COLS))} for i in range(ARRAYS)}


def _sharding():
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    return NamedSharding(jax.make_mesh((8,), ('x',)), P('x'))


def _save(root: Path, mib: float) -> dict:
    import jax
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(root) as manager:
        manager.save(1, args=ocp.args.StandardSave(jax.device_put(_values(mib), _sharding())))
    return {}


def _restore(method: str, root: Path, mib: float, budget: int) -> dict:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    import orbax_surgery as osurg

    values = _values(mib)
    sharding = _sharding()
    if method == 'orbax':
        want = values
        args = ocp.args.StandardRestore(
            jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), want)
        )
    else:
        want = {'blocks': {str(i): {'w': values[f'layer_{i}']['kernel']} for i in range(ARRAYS)}}
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), want
        )
        rules = [osurg.Rename(r'layer_(\d+)/kernel', r'blocks/\1/w')]
        args = osurg.SurgeryRestore(target=target, rules=rules, max_inflight_bytes=budget)
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    with ocp.CheckpointManager(root, options=options) as manager:
        read_before = tensorstore_bytes_read()
        peak = PeakRss()
        start = time.monotonic()
        restored = jax.block_until_ready(manager.restore(1, args=args))
        wall = time.monotonic() - start
        rss = peak.stop()
        read = tensorstore_bytes_read() - read_before
    equal = all(
        np.array_equal(np.asarray(got), w)
        for got, w in zip(jax.tree.leaves(restored), jax.tree.leaves(want), strict=True)
    )
    return {
        'equal': equal,
        'wall_s': round(wall, 3),
        'peak_rss_over_baseline': rss,
        'bytes_read': read,
        'bytes_restored': sum(a.nbytes for a in jax.tree.leaves(want)),
    }


def _print_table(results: dict, args: argparse.Namespace) -> None:
    mib = 2**20
    print(
        f'\n{args.processes} processes restoring one {args.mib:g} MiB checkpoint at once '
        f'(surgery budget {args.budget_mib:g} MiB)\n'
    )
    header = (
        f'{"method":<10}{"all done s":>12}{"wall s median":>15}{"peak RSS MiB max":>18}'
        f'{"read MiB max":>14}{"restored MiB":>14}{"correct":>9}'
    )
    print(header)
    print('-' * len(header))
    for method, r in results.items():
        print(
            f'{method:<10}{r["all_done_s"]:>12.2f}{r["wall_s_median"]:>15.2f}'
            f'{r["peak_rss_over_baseline_max"] / mib:>18.1f}{r["bytes_read_max"] / mib:>14.1f}'
            f'{r["bytes_restored"] / mib:>14.1f}{str(r["all_equal"]):>9}'
        )
    print()


if __name__ == '__main__':
    main()
