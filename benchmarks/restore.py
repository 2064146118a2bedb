"""Restore a ~1 GiB checkpoint renamed and resharded: plain Orbax vs SurgeryRestore.

Each method runs in a fresh subprocess (8 fake CPU devices) so its peak RSS is
its own. Figures per method: wall time of the restore call, peak RSS over the
process's RSS just before restoring, and bytes TensorStore read from disk.
The last line of output is one JSON object with all figures.

    python benchmarks/restore.py            # 1 GiB, keeps the checkpoint in /tmp
    python benchmarks/restore.py --gib 0.25 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from measuring import tensorstore_bytes_read

ROWS = 4096
METHODS = ('orbax_transforms', 'orbax_same_layout', 'surgery')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--gib', type=float, default=1.0, help='checkpoint size in GiB')
    parser.add_argument('--dir', default='/tmp/orbax-surgery-bench/restore')
    parser.add_argument('--repeats', type=int, default=5, help='fresh processes per method')
    parser.add_argument('--worker', choices=[*METHODS, 'save'], help=argparse.SUPPRESS)
    args = parser.parse_args()
    layers = max(1, round(args.gib * 2**30 / (ROWS * ROWS * 4)))
    if args.worker:
        _setup_jax()
        result = (
            _save(args.dir, layers)
            if args.worker == 'save'
            else _restore(args.worker, args.dir, layers)
        )
        print(json.dumps(result))
        return

    ckpt = Path(args.dir) / f'{layers}x{ROWS}x{ROWS}'
    if not (ckpt / '1' / 'default' / '_METADATA').exists():
        print(f'Writing {layers} arrays of {ROWS}x{ROWS} float32 to {ckpt} ...', flush=True)
        _run_worker('save', str(ckpt), args.gib)
    results = {}
    for method in METHODS:
        runs = [_run_worker(method, str(ckpt), args.gib) for _ in range(args.repeats)]
        results[method] = {
            'wall_s_median': round(statistics.median(r['wall_s'] for r in runs), 3),
            'wall_s_best': min(r['wall_s'] for r in runs),
            'peak_rss_over_baseline_gib_max': max(r['peak_rss_over_baseline_gib'] for r in runs),
            'bytes_read': max(r['bytes_read'] for r in runs),
            'bytes_restored': runs[0]['bytes_restored'],
            'runs': runs,
        }
    _print_table(results, layers)
    print(
        json.dumps(
            {
                'benchmark': 'restore',
                'checkpoint_gib': layers * ROWS * ROWS * 4 / 2**30,
                'devices': 8,
                'results': results,
            }
        )
    )


def _run_worker(method: str, directory: str, gib: float) -> dict:
    cmd = [sys.executable, __file__, '--worker', method, '--dir', directory, '--gib', str(gib)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _setup_jax() -> None:
    import jax

    jax.config.update('jax_num_cpu_devices', 8)


def _save(directory: str, layers: int) -> dict:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rows = NamedSharding(jax.make_mesh((8,), ('x',)), P('x'))
    rng = np.random.default_rng(0)
    tree = {
        'encoder': {
            f'layer_{i}': {
                'kernel': jax.device_put(rng.random((ROWS, ROWS), dtype=np.float32), rows)
            }
            for i in range(layers)
        }
    }
    with ocp.CheckpointManager(directory) as manager:
        manager.save(1, args=ocp.args.StandardSave(tree))
        manager.wait_until_finished()
    return {'saved': layers}


def _restore(method: str, directory: str, layers: int) -> dict:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import orbax_surgery as osurg

    mesh = jax.make_mesh((8,), ('x',))
    saved_layout = NamedSharding(mesh, P('x'))
    columns = NamedSharding(mesh, P(None, 'x'))
    shape = (ROWS, ROWS)
    if method == 'orbax_same_layout':
        target = {
            'encoder': {
                f'layer_{i}': {
                    'kernel': jax.ShapeDtypeStruct(shape, np.float32, sharding=saved_layout)
                }
                for i in range(layers)
            }
        }
        args = ocp.args.StandardRestore(target)
    else:
        target = {
            'Encoder': {
                f'Layer_{i}': {'kernel': jax.ShapeDtypeStruct(shape, np.float32, sharding=columns)}
                for i in range(layers)
            }
        }
        if method == 'surgery':
            args = osurg.SurgeryRestore(
                target=target,
                rules=[osurg.Rename(r'encoder/layer_(\d+)/(.*)', r'Encoder/Layer_\1/\2')],
            )
        else:
            args = ocp.args.PyTreeRestore(
                target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                transforms={
                    r'Encoder/Layer_(\d+)/(.*)': ocp.Transform(original_key=r'encoder/layer_\1/\2')
                },
            )
    manager = ocp.CheckpointManager(directory)
    baseline = _rss_now()
    before = tensorstore_bytes_read()
    start = time.perf_counter()
    out = manager.restore(1, args=args)
    jax.block_until_ready(out)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    read = tensorstore_bytes_read() - before
    leaves = jax.tree.leaves(out)
    restored = sum(x.nbytes for x in leaves)
    assert all(x.shape == shape for x in leaves) and len(leaves) == layers
    assert np.isfinite(np.asarray(leaves[0].addressable_shards[0].data)).all()
    return {
        'wall_s': round(wall, 3),
        'peak_rss_over_baseline_gib': round((peak - baseline) / 2**30, 3),
        'peak_rss_gib': round(peak / 2**30, 3),
        'bytes_read': read,
        'bytes_restored': restored,
    }


def _rss_now() -> int:
    with open(f'/proc/{os.getpid()}/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _print_table(results: dict, layers: int) -> None:
    size = layers * ROWS * ROWS * 4 / 2**30
    runs = len(next(iter(results.values()))['runs'])
    print(
        f'\nRestore of {layers} x {ROWS}x{ROWS} float32 ({size:.2f} GiB), saved row-sharded, '
        f'restored column-sharded over 8 CPU devices; {runs} fresh processes per method\n'
    )
    header = (
        f'{"method":36s} {"wall s median":>13s} {"best":>6s} {"peak RSS over baseline GiB":>27s} '
        f'{"read GiB":>9s}'
    )
    print(header)
    print('-' * len(header))
    names = {
        'orbax_same_layout': 'Orbax StandardRestore, saved layout',
        'orbax_transforms': 'Orbax PyTreeRestore(transforms=...)',
        'surgery': 'orbax_surgery SurgeryRestore',
    }
    for method, r in results.items():
        print(
            f'{names[method]:36s} {r["wall_s_median"]:13.2f} {r["wall_s_best"]:6.2f} '
            f'{r["peak_rss_over_baseline_gib_max"]:27.2f} {r["bytes_read"] / 2**30:9.2f}'
        )
    base, ours = results['orbax_transforms'], results['surgery']
    print(
        f'\nSurgeryRestore / Orbax transforms: wall (median) '
        f'{ours["wall_s_median"] / base["wall_s_median"]:.2f}x, peak RSS (worst run) '
        f'{ours["peak_rss_over_baseline_gib_max"] / base["peak_rss_over_baseline_gib_max"]:.2f}x, '
        f'bytes read {ours["bytes_read"] / base["bytes_read"]:.2f}x. On CPU devices the restored '
        'arrays themselves count in RSS.'
    )


if __name__ == '__main__':
    main()
