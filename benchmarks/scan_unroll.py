"""Restore a scanned ~1 GB transformer checkpoint unrolled into layers, in 2 processes.

The checkpoint holds an embedding and L stacked (scanned) layers: attention
q, k, v, o kernels (L, d, d), an MLP wi (L, d, 4d) and wo (L, 4d, d), and two
norm scales (L, d), as random float32 bits (incompressible). It is written once
by plain Orbax from one process with 8 CPU devices, in two layouts: one
layer's per-device slice per chunk (`SaveArgs(shard_axes=(0,))`), and one
chunk per array.

Each method then runs in 2 fresh processes joined by `jax.distributed` (gloo on
loopback), 4 fake CPU devices each, every layer sharded over all 8 devices:

  (a) plain Orbax restores the scanned layout with the same per-device bytes (the floor),
  (b) plain Orbax restores the stacked tree, then slices it into layers (what users do today),
  (c) `SurgeryRestore` with `Unstack` restores the layers directly.

Each process reports its own wall time of the restore, its peak RSS over its
RSS just before restoring, the bytes TensorStore read from disk, and the bytes
its own shards hold. The last line of output is one JSON object with all figures.

    python benchmarks/scan_unroll.py                  # L=16, d=1024, vocab 32000 (~1 GB)
    python benchmarks/scan_unroll.py --layers 4 --d 256 --vocab 4000 --runs 1
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

from incompressible import random_float32
from measuring import (
    PeakRss,
    free_port,
    join_job,
    run_processes,
    shard_bytes,
    summarize,
    tensorstore_bytes_read,
    worker_env,
)

METHODS = ('orbax_scanned', 'orbax_then_slice', 'surgery')
SINGLE_CHUNK_METHODS = ('orbax_scanned', 'surgery')
LAYOUTS = {'per_layer': METHODS, 'single_chunk': SINGLE_CHUNK_METHODS}
PROCESSES, DEVICES = 2, 4
TIMEOUT_S = 1800
NAMES = {
    'orbax_scanned': '(a) Orbax, scanned layout (floor)',
    'orbax_then_slice': '(b) Orbax stacked, then slice',
    'surgery': '(c) SurgeryRestore + Unstack',
}
TARGETS = {'read': 1.05, 'rss': 1.5, 'wall': 1.25}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--layers', type=int, default=16, help='stacked layers L')
    parser.add_argument('--d', type=int, default=1024, help='model width (a multiple of 8)')
    parser.add_argument('--vocab', type=int, default=32000, help='embedding rows (multiple of 8)')
    parser.add_argument('--runs', type=int, default=3, help='fresh process pairs per method')
    parser.add_argument('--dir', default='/tmp/orbax-surgery-bench/scan_unroll')
    parser.add_argument('--keep', action='store_true', help='keep (and reuse) the checkpoints')
    parser.add_argument(
        '--max-inflight-mib', type=int, default=None, help="SurgeryRestore's in-flight budget"
    )
    parser.add_argument('--only', choices=METHODS, help='run one method (for experiments)')
    parser.add_argument('--worker', choices=[*METHODS, 'save'], help=argparse.SUPPRESS)
    parser.add_argument('--layout', choices=list(LAYOUTS), help=argparse.SUPPRESS)
    parser.add_argument('--port', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--process-id', type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.d % 8 or args.vocab % 8:
        parser.error('--d and --vocab must be multiples of the 8 devices')
    params = _params(args.layers, args.d, args.vocab)
    if args.worker == 'save':
        print(json.dumps(_save(args.dir, args.layout, params)))
        return
    if args.worker:
        result = _restore(
            args.worker,
            args.dir,
            args.layers,
            params,
            args.port,
            args.process_id,
            args.max_inflight_mib,
        )
        print(json.dumps(result))
        return

    root = Path(args.dir) / f'L{args.layers}_d{args.d}_v{args.vocab}'
    raw = sum(4 * math.prod(shape) for shape, _ in params.values())
    results, chunks, stored = {}, {}, {}
    try:
        for layout, methods in LAYOUTS.items():
            ckpt = root / layout
            if not (ckpt / '1' / 'default' / '_METADATA').exists():
                shutil.rmtree(ckpt, ignore_errors=True)
                print(f'Writing {raw / 2**30:.2f} GiB, {layout}, to {ckpt} ...', flush=True)
                _run_save(args, layout, str(ckpt))
            chunks[layout] = _chunk_shapes(ckpt / '1' / 'default')
            stored[layout] = sum(f.stat().st_size for f in ckpt.rglob('*') if f.is_file())
            results[layout] = {}
            for method in methods:
                if args.only and method != args.only:
                    continue
                print(f'{layout}: {method} x {args.runs} ...', flush=True)
                pairs = [_run_pair(args, method, layout, str(ckpt)) for _ in range(args.runs)]
                results[layout][method] = {
                    str(pid): summarize([pair[pid] for pair in pairs], bytes_field='shard_bytes')
                    for pid in range(PROCESSES)
                }
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.only:  # An experiment: the raw figures of one method, no comparison.
        print(json.dumps(results))
        return
    targets = _targets(results)
    _print_tables(args, params, raw, stored, chunks, results, targets)
    print(
        json.dumps(
            {
                'benchmark': 'scan_unroll',
                'layers': args.layers,
                'd': args.d,
                'vocab': args.vocab,
                'checkpoint_bytes': raw,
                'stored_bytes': stored,
                'processes': PROCESSES,
                'devices_per_process': DEVICES,
                'runs': args.runs,
                'chunk_shapes': chunks,
                'targets': targets,
                'results': results,
            }
        )
    )


def _params(layers: int, d: int, vocab: int) -> dict[str, tuple[tuple[int, ...], tuple]]:
    """Stored key -> (stored shape, stored PartitionSpec); layers stack along axis 0."""
    layer = {
        'attn/q/kernel': ((d, d), (None, 'x')),
        'attn/k/kernel': ((d, d), (None, 'x')),
        'attn/v/kernel': ((d, d), (None, 'x')),
        'attn/o/kernel': ((d, d), ('x', None)),
        'attn_norm/scale': ((d,), ('x',)),
        'mlp/wi/kernel': ((d, 4 * d), (None, 'x')),
        'mlp/wo/kernel': ((4 * d, d), ('x', None)),
        'mlp_norm/scale': ((d,), ('x',)),
    }
    params = {'embed/embedding': ((vocab, d), ('x', None))}
    for key, (shape, spec) in layer.items():
        params[f'layers/{key}'] = ((layers, *shape), (None, *spec))
    return params


def _common_args(args: argparse.Namespace) -> list[str]:
    common = ['--layers', str(args.layers), '--d', str(args.d), '--vocab', str(args.vocab)]
    if args.max_inflight_mib is not None:
        common += ['--max-inflight-mib', str(args.max_inflight_mib)]
    return common


def _run_save(args: argparse.Namespace, layout: str, directory: str) -> None:
    cmd = [sys.executable, __file__, '--worker', 'save', '--layout', layout, '--dir', directory]
    out = subprocess.run(
        [*cmd, *_common_args(args)],
        capture_output=True,
        text=True,
        env=worker_env(),
        timeout=TIMEOUT_S,
    )
    if out.returncode:
        sys.exit(f'saving {layout} failed:\n{(out.stdout + out.stderr)[-6000:]}')


def _run_pair(args: argparse.Namespace, method: str, layout: str, directory: str) -> list[dict]:
    """Runs `method` in PROCESSES fresh processes of one jax.distributed job."""
    port = free_port()
    cmd = [sys.executable, __file__, '--worker', method, '--layout', layout, '--dir', directory]
    cmd += [*_common_args(args), '--port', str(port)]
    return run_processes(cmd, PROCESSES, f'{layout} {method}', TIMEOUT_S)


def _chunk_shapes(item: Path) -> dict[str, list[int] | None]:
    import orbax_surgery as osurg

    arrays = osurg.OrbaxCheckpoint(item).arrays
    return {k: list(a.chunk_shape) if a.chunk_shape else None for k, a in arrays.items()}


def _save(directory: str, layout: str, params: dict) -> dict:
    import jax

    jax.config.update('jax_num_cpu_devices', PROCESSES * DEVICES)
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from orbax_surgery.keys import nest

    mesh = jax.make_mesh((PROCESSES * DEVICES,), ('x',))
    tree, save_args = {}, {}
    for index, (key, (shape, spec)) in enumerate(params.items()):
        value = random_float32(index, shape)
        if layout == 'single_chunk':
            # Written from one device, an array is one chunk (no chunk_byte_size).
            tree[key] = jax.device_put(value, jax.devices()[0])
            save_args[key] = ocp.SaveArgs()
        else:
            # The restore's per-device slice of one layer per chunk: split axis 0 fully.
            sharding = NamedSharding(mesh, P(*spec))
            tree[key] = jax.make_array_from_callback(shape, sharding, lambda i, v=value: v[i])
            stacked = key.startswith('layers/')
            save_args[key] = ocp.SaveArgs(shard_axes=(0,) if stacked else ())
        del value
    with ocp.CheckpointManager(directory) as manager:
        manager.save(1, args=ocp.args.StandardSave(nest(tree), save_args=nest(save_args)))
        manager.wait_until_finished()
    return {'saved': len(tree)}


def _restore(
    method: str,
    directory: str,
    layers: int,
    params: dict,
    port: int,
    pid: int,
    max_inflight_mib: int | None,
) -> dict:
    import jax

    mesh = join_job(port, pid, PROCESSES, DEVICES)

    import numpy as np
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import orbax_surgery as osurg
    from orbax_surgery.keys import flatten, nest

    scanned, unrolled, layer_sharding = {}, {}, {}
    for key, (shape, spec) in params.items():
        scanned[key] = jax.ShapeDtypeStruct(
            shape, np.float32, sharding=NamedSharding(mesh, P(*spec))
        )
        if key.startswith('layers/'):
            name = key.removeprefix('layers/')
            layer_sharding[key] = NamedSharding(mesh, P(*spec[1:]))
            for i in range(layers):
                unrolled[f'layers_{i}/{name}'] = jax.ShapeDtypeStruct(
                    shape[1:], np.float32, sharding=layer_sharding[key]
                )
        else:
            unrolled[key] = scanned[key]
    own_bytes = shard_bytes(scanned)
    assert own_bytes == shard_bytes(unrolled), 'the methods must place the same bytes'

    rules = [osurg.Unstack(r'layers/(.*)', r'layers_{i}/\1')]
    planned = None
    if method == 'surgery':
        reads = osurg.plan_restore(f'{directory}/1/default', nest(unrolled), rules).reads[pid]
        planned = {
            'needed': reads.needed,
            'chunked': reads.chunked,
            'amplification': round(reads.amplification, 4),
        }
        budget = {} if max_inflight_mib is None else {'max_inflight_bytes': max_inflight_mib << 20}
        args = osurg.SurgeryRestore(target=nest(unrolled), rules=rules, **budget)
    else:
        args = ocp.args.StandardRestore(nest(scanned))
    split = {
        key: jax.jit(lambda x: [x[i] for i in range(layers)], out_shardings=sharding)
        for key, sharding in layer_sharding.items()
    }
    manager = ocp.CheckpointManager(directory)
    multihost_utils.sync_global_devices('restore')
    gc.collect()
    peak = PeakRss()
    before = tensorstore_bytes_read()
    start = time.perf_counter()
    out = manager.restore(1, args=args)
    if method == 'orbax_then_slice':
        stacked = flatten(out)[0]
        out = {}
        for key, value in stacked.items():
            if key in split:
                name = key.removeprefix('layers/')
                for i, layer in enumerate(split[key](value)):
                    out[f'layers_{i}/{name}'] = layer
            else:
                out[key] = value
        del stacked, value
    jax.block_until_ready(out)
    wall = time.perf_counter() - start
    over = peak.stop()
    read = tensorstore_bytes_read() - before

    restored = flatten(out)[0]
    expected = unrolled if method != 'orbax_scanned' else scanned
    assert set(restored) == set(expected), sorted(set(restored) ^ set(expected))
    checked = 0
    for index, (key, (shape, _)) in enumerate(params.items()):
        value = random_float32(index, shape).view(np.uint32)
        names = [(key, ())]
        if key.startswith('layers/') and method != 'orbax_scanned':
            names = [(f'layers_{i}/{key.removeprefix("layers/")}', (i,)) for i in range(layers)]
        for name, layer in names:
            got = restored[name]
            assert got.sharding == expected[name].sharding, (name, got.sharding)
            for shard in got.addressable_shards:
                data = np.asarray(shard.data).view(np.uint32)
                np.testing.assert_array_equal(data, value[layer + tuple(shard.index)])
                checked += 1
    multihost_utils.sync_global_devices('checked')
    return {
        'process': pid,
        'method': method,
        'wall_s': round(wall, 3),
        'peak_rss_over_baseline': over,
        'baseline_rss': peak.baseline,
        'rss_measured_as': peak.how,
        'bytes_read': read,
        'shard_bytes': own_bytes,
        'shards_checked': checked,
        'planned': planned,
    }


def _targets(results: dict) -> dict:
    """(c)'s ratios per process: read and RSS over its shard bytes, wall over (a)'s."""
    per_layer = results['per_layer']
    out = {}
    for pid in map(str, range(PROCESSES)):
        ours, floor = per_layer['surgery'][pid], per_layer['orbax_scanned'][pid]
        ratios = {
            'read': ours['bytes_read_max'] / ours['shard_bytes'],
            'rss': ours['peak_rss_over_baseline_max'] / ours['shard_bytes'],
            'wall': ours['wall_s_median'] / floor['wall_s_median'],
            'wall_best': ours['wall_s_best'] / floor['wall_s_best'],
        }
        single = results['single_chunk']['surgery'][pid]
        out[pid] = {
            **{k: round(v, 3) for k, v in ratios.items()},
            'met': {
                'read': ratios['read'] <= TARGETS['read'],
                'rss': ratios['rss'] < TARGETS['rss'],
                'wall': ratios['wall'] <= TARGETS['wall'],
                'wall_best': ratios['wall_best'] <= TARGETS['wall'],
            },
            'single_chunk_amplification': round(
                single['bytes_read_max'] / single['shard_bytes'], 3
            ),
            'single_chunk_planned_amplification': single['runs'][0]['planned']['amplification'],
        }
    return out


def _print_tables(
    args: argparse.Namespace,
    params: dict,
    raw: int,
    stored: dict,
    chunks: dict,
    results: dict,
    targets: dict,
) -> None:
    mib = 2**20
    print(
        f'\nScanned checkpoint: {args.layers} layers, d={args.d}, vocab {args.vocab}, '
        f'{raw / 2**30:.3f} GiB float32 (on disk: '
        + ', '.join(f'{layout} {b / 2**30:.3f} GiB' for layout, b in stored.items())
        + f'). Restored unrolled by {PROCESSES} processes x {DEVICES} CPU devices, each layer '
        f'sharded over all {PROCESSES * DEVICES}; {args.runs} fresh process pairs per method.'
    )
    for layout, shapes in chunks.items():
        print(f'\nChunk shapes, {layout}:')
        for key, shape in shapes.items():
            print(f'  {key:22s} {str(tuple(params[key][0])):22s} chunk {tuple(shape or ())}')
    header = (
        f'{"method":34s} {"proc":>4s} {"wall s median":>13s} {"best":>6s} '
        f'{"peak RSS over base MiB":>22s} {"read MiB":>9s} {"shards MiB":>10s} '
        f'{"read/shards":>11s} {"RSS/shards":>10s}'
    )
    for layout, methods in results.items():
        chunking = 'one chunk per array' if layout == 'single_chunk' else 'one layer shard a chunk'
        print(f'\n{layout}: {chunking}')
        print(header)
        print('-' * len(header))
        for method, per_process in methods.items():
            for pid, r in per_process.items():
                label = NAMES[method] if pid == '0' else ''
                print(
                    f'{label:34s} {pid:>4s} {r["wall_s_median"]:13.3f} {r["wall_s_best"]:6.3f} '
                    f'{r["peak_rss_over_baseline_max"] / mib:22.1f} '
                    f'{r["bytes_read_max"] / mib:9.1f} {r["shard_bytes"] / mib:10.1f} '
                    f'{r["bytes_read_max"] / r["shard_bytes"]:11.3f} '
                    f'{r["peak_rss_over_baseline_max"] / r["shard_bytes"]:10.3f}'
                )
    print('\nTargets for (c), per process (worst run for read and RSS):')
    checks = [
        ('read', f'bytes read / own shard bytes   <= {TARGETS["read"]}'),
        ('rss', f'peak RSS over base / shard bytes < {TARGETS["rss"]}'),
        ('wall', f'wall / wall of (a), medians     <= {TARGETS["wall"]}'),
        ('wall_best', f'wall / wall of (a), best runs   <= {TARGETS["wall"]}'),
    ]
    for name, text in checks:
        cells = [
            f'proc {pid}: {t[name]:6.3f} {"ok" if t["met"][name] else "MISSED"}'
            for pid, t in targets.items()
        ]
        print(f'  {text}   ' + '   '.join(cells))
    print('\nSingle chunk per array, (c) read amplification (bytes read / own shard bytes):')
    for pid, t in targets.items():
        print(
            f'  proc {pid}: measured {t["single_chunk_amplification"]:.3f}, '
            f'plan estimate {t["single_chunk_planned_amplification"]:.3f}'
        )
    how = {r['rss_measured_as'] for m in results['per_layer'].values() for r in m['0']['runs']}
    print(
        f'\nBytes read: TensorStore /tensorstore/kvstore/file/bytes_read (compressed; data is '
        f'random bits). Peak RSS: {", ".join(sorted(how))}. On CPU devices the restored arrays '
        "themselves count in RSS. (b)'s wall time includes compiling its slicing."
    )


if __name__ == '__main__':
    main()
