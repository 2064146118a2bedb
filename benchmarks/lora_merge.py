"""Restore a ~1 GB base merged with LoRA adapters vs plain Orbax restoring the base alone.

The base checkpoint holds an embedding and L unrolled transformer layers:
attention query, key, value, out kernels (d, d), an MLP wi (d, 4d) and wo
(4d, d), and two norm scales (d,), as random float32 bits (incompressible).
It is written once by plain Orbax from one process with 8 CPU devices, each
kernel sharded over a (2, 4) mesh on both axes, so a chunk is one device's
slice. Rank-r adapters on every attention and MLP kernel are written beside it
by `LoraSave`, with seeded random A and B (B is not zero, so the merge changes
every weight).

Each method then runs in fresh processes with 8 fake CPU devices, restoring
into the same (2, 4)-sharded target:

  (a) plain Orbax `StandardRestore` of the base alone (the floor),
  (b) `LoraRestore(mode='merge')`: each shard of `W + scale * A @ B` read and merged in place,
  (c) plain Orbax restores of the base and the adapters, then a jitted `lora.merge`
      (what users do today).

Each process reports the wall time of the restore (for (c) including the merge
and its compilation), the CPU time it took, its peak RSS over its RSS just
before restoring, and the bytes TensorStore read from disk. The target: (b)
within 1.3x of (a)'s wall time. The last line of output is one JSON object
with all figures.

    python benchmarks/lora_merge.py                   # L=16, d=1024, vocab 32000 (~0.9 GiB), rank 8
    python benchmarks/lora_merge.py --layers 2 --d 256 --vocab 4000 --runs 1
    python benchmarks/lora_merge.py --blas-threads 1  # workers' OpenBLAS single-threaded
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from incompressible import random_float32
from measuring import PeakRss, summarize, tensorstore_bytes_read, worker_env

METHODS = ('orbax_base', 'lora_merge', 'orbax_then_merge')
MESH = (2, 4)
DEVICES = MESH[0] * MESH[1]
TIMEOUT_S = 1800
NAMES = {
    'orbax_base': '(a) Orbax, base alone (floor)',
    'lora_merge': "(b) LoraRestore(mode='merge')",
    'orbax_then_merge': '(c) Orbax base + adapters, jit merge',
}
TARGET_WALL = 1.3
ADAPTED = r'layers_\d+/(attn/(query|key|value|out)|mlp/(wi|wo))/kernel'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--layers', type=int, default=16, help='transformer layers L')
    parser.add_argument('--d', type=int, default=1024, help='model width (a multiple of 8)')
    parser.add_argument('--vocab', type=int, default=32000, help='embedding rows (even)')
    parser.add_argument('--rank', type=int, default=8, help='LoRA rank')
    parser.add_argument('--runs', type=int, default=3, help='fresh processes per method')
    parser.add_argument('--dir', default='/tmp/orbax-surgery-bench/lora_merge')
    parser.add_argument('--keep', action='store_true', help='keep (and reuse) the checkpoints')
    parser.add_argument('--only', choices=METHODS, help='run one method (for experiments)')
    parser.add_argument(
        '--blas-threads',
        type=int,
        help="the workers' OPENBLAS/OMP/MKL_NUM_THREADS (default: the environment's)",
    )
    parser.add_argument('--worker', choices=[*METHODS, 'save'], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.d % DEVICES or args.vocab % MESH[0]:
        parser.error(f'--d must be a multiple of {DEVICES} and --vocab of {MESH[0]}')
    params = _params(args.layers, args.d, args.vocab)
    if args.worker == 'save':
        print(json.dumps(_save(args.dir, params, args.rank)))
        return
    if args.worker:
        print(json.dumps(_restore(args.worker, args.dir, params, args.rank)))
        return

    root = Path(args.dir) / f'L{args.layers}_d{args.d}_v{args.vocab}_r{args.rank}'
    raw = sum(4 * math.prod(shape) for shape, _ in params.values())
    results = {}
    try:
        if not all((root / item / '_METADATA').exists() for item in ('base', 'adapters')):
            shutil.rmtree(root, ignore_errors=True)
            print(f'Writing {raw / 2**30:.2f} GiB base and adapters to {root} ...', flush=True)
            _run_worker(args, 'save', str(root))
        stored = {
            item: sum(f.stat().st_size for f in (root / item).rglob('*') if f.is_file())
            for item in ('base', 'adapters')
        }
        for method in METHODS:
            if args.only and method != args.only:
                continue
            print(f'{method} x {args.runs} ...', flush=True)
            runs = [_run_worker(args, method, str(root)) for _ in range(args.runs)]
            results[method] = summarize(runs, bytes_field='restored_bytes')
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.only:  # An experiment: the raw figures of one method, no comparison.
        print(json.dumps(results))
        return
    ratios = _ratios(results)
    _print_table(args, raw, stored, results, ratios)
    print(
        json.dumps(
            {
                'benchmark': 'lora_merge',
                'layers': args.layers,
                'd': args.d,
                'vocab': args.vocab,
                'rank': args.rank,
                'checkpoint_bytes': raw,
                'stored_bytes': stored,
                'adapters': sum(re.fullmatch(ADAPTED, key) is not None for key in params),
                'devices': DEVICES,
                'mesh': list(MESH),
                'runs': args.runs,
                'blas_threads': args.blas_threads,
                'target_wall': TARGET_WALL,
                'ratios': ratios,
                'results': results,
            }
        )
    )


def _params(layers: int, d: int, vocab: int) -> dict[str, tuple[tuple[int, ...], tuple]]:
    """Key -> (shape, PartitionSpec over the ('x', 'y') mesh); kernels sharded on both axes."""
    kernel = ('x', 'y')
    vector = (('x', 'y'),)
    layer = {
        'attn/query/kernel': ((d, d), kernel),
        'attn/key/kernel': ((d, d), kernel),
        'attn/value/kernel': ((d, d), kernel),
        'attn/out/kernel': ((d, d), kernel),
        'attn_norm/scale': ((d,), vector),
        'mlp/wi/kernel': ((d, 4 * d), kernel),
        'mlp/wo/kernel': ((4 * d, d), kernel),
        'mlp_norm/scale': ((d,), vector),
    }
    params = {'embed/embedding': ((vocab, d), kernel)}
    for i in range(layers):
        for key, value in layer.items():
            params[f'layers_{i}/{key}'] = value
    params['final_norm/scale'] = ((d,), vector)
    return params


def _adapter_value(index: int, which: str, shape: tuple[int, ...]):
    """Seeded normals: A ~ N(0, 0.01²) as `lora.init` draws it, B ~ N(0, 1) (not zero)."""
    import numpy as np

    rng = np.random.default_rng([1, index, 0 if which == 'a' else 1])
    scale = 0.01 if which == 'a' else 1.0
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _spec(rank: int):
    import orbax_surgery as osurg

    return osurg.LoraSpec(targets=[ADAPTED], rank=rank, alpha=2 * rank)


def _run_worker(args: argparse.Namespace, worker: str, directory: str) -> dict:
    cmd = [sys.executable, __file__, '--worker', worker, '--dir', directory]
    cmd += ['--layers', str(args.layers), '--d', str(args.d), '--vocab', str(args.vocab)]
    cmd += ['--rank', str(args.rank)]
    env = worker_env(args.blas_threads)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    if out.returncode:
        sys.exit(f'{worker} failed:\n{(out.stdout + out.stderr)[-6000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mesh():
    import jax

    return jax.make_mesh(MESH, ('x', 'y'))


def _target(params: dict) -> dict:
    """The flat abstract target, every leaf sharded over the (2, 4) mesh as `params` says."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = _mesh()
    return {
        key: jax.ShapeDtypeStruct(shape, np.float32, sharding=NamedSharding(mesh, P(*spec)))
        for key, (shape, spec) in params.items()
    }


def _adapter_values(lora) -> dict:
    """Adapter key -> its seeded value, in the layout's order."""
    out = {}
    for index, adapter in enumerate(lora.adapters):
        out[adapter.a_key] = _adapter_value(index, 'a', adapter.a_shape)
        out[adapter.b_key] = _adapter_value(index, 'b', adapter.b_shape)
    return out


def _save(directory: str, params: dict, rank: int) -> dict:
    import jax

    jax.config.update('jax_num_cpu_devices', DEVICES)
    import orbax.checkpoint as ocp

    import orbax_surgery as osurg
    from orbax_surgery.keys import flatten, nest

    target = _target(params)
    tree = {}
    for index, (key, (shape, _)) in enumerate(params.items()):
        value = random_float32(index, shape)
        tree[key] = jax.make_array_from_callback(
            shape, target[key].sharding, lambda i, v=value: v[i]
        )
        del value
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(Path(directory) / 'base', nest(tree))
    ckptr.wait_until_finished()
    del tree

    # Adapters sharded as `abstract_trainable` places them (A like W's rows, B like its
    # columns), so each adapter chunk is one device's slice too.
    lora = _spec(rank).bind(nest(target))
    abstract = flatten(lora.abstract_trainable(nest(target)))[0]
    values = _adapter_values(lora)
    trainable = {
        key: jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda i, v=values[key]: v[i])
        for key, leaf in abstract.items()
    }
    ocp.Checkpointer(osurg.LoraCheckpointHandler()).save(
        Path(directory) / 'adapters', args=osurg.LoraSave(item=nest(trainable), lora=lora)
    )
    return {'saved': len(params), 'adapters': len(lora.adapters)}


def _restore(method: str, directory: str, params: dict, rank: int) -> dict:
    import jax

    jax.config.update('jax_num_cpu_devices', DEVICES)
    import orbax.checkpoint as ocp

    import orbax_surgery as osurg
    from orbax_surgery.keys import flatten, nest

    base_dir, adapter_dir = Path(directory) / 'base', Path(directory) / 'adapters'
    target = _target(params)
    lora = _spec(rank).bind(nest(target))
    planned = None
    if method == 'lora_merge':
        ckptr = ocp.Checkpointer(osurg.LoraCheckpointHandler())
        args = osurg.LoraRestore(base=base_dir, target=nest(target), lora=lora)
        reads = osurg.plan_lora_restore(adapter_dir, args).reads[0]
        planned = {
            'needed': reads.needed,
            'chunked': reads.chunked,
            'amplification': round(reads.amplification, 4),
        }
    else:
        ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        args = ocp.args.StandardRestore(nest(target))
        adapter_args = ocp.args.StandardRestore(lora.abstract_trainable(nest(target)))
        shardings = jax.tree.map(lambda leaf: leaf.sharding, nest(target))
        merge = jax.jit(lora.merge, out_shardings=shardings)
    gc.collect()
    load = os.getloadavg()[0]
    peak = PeakRss()
    before = tensorstore_bytes_read()
    cpu = time.process_time()
    start = time.perf_counter()
    if method == 'lora_merge':
        out = ckptr.restore(adapter_dir, args=args)
    else:
        out = ckptr.restore(base_dir, args=args)
        if method == 'orbax_then_merge':
            adapters = ckptr.restore(adapter_dir, args=adapter_args)
            out = merge(out, adapters)
            del adapters
    jax.block_until_ready(out)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu
    over = peak.stop()
    read = tensorstore_bytes_read() - before

    restored = flatten(out)[0]
    assert set(restored) == set(target), sorted(set(restored) ^ set(target))
    for key, leaf in restored.items():
        assert leaf.sharding == target[key].sharding, (key, leaf.sharding)
    checked = _check(method, restored, params, lora)
    return {
        'method': method,
        'wall_s': round(wall, 3),
        'cpu_s': round(cpu, 3),
        'peak_rss_over_baseline': over,
        'baseline_rss': peak.baseline,
        'rss_measured_as': peak.how,
        'load_average_1m': round(load, 2),
        'bytes_read': read,
        'restored_bytes': sum(4 * math.prod(leaf.shape) for leaf in target.values()),
        'shards_checked': checked,
        'planned': planned,
    }


def _check(method: str, restored: dict, params: dict, lora) -> int:
    """Compares every shard of a few leaves with numpy: W, or W + scale * A @ B."""
    import numpy as np

    index = {key: i for i, key in enumerate(params)}
    adapters = {a.key: (i, a) for i, a in enumerate(lora.adapters)}
    last = len([k for k in params if k.endswith('attn/query/kernel')]) - 1
    keys = ['embed/embedding', 'layers_0/attn/query/kernel', f'layers_{last}/mlp/wo/kernel']
    checked = 0
    for key in keys:
        w = random_float32(index[key], params[key][0])
        merged = method != 'orbax_base' and key in adapters
        if merged:
            i, adapter = adapters[key]
            a = _adapter_value(i, 'a', adapter.a_shape)
            b = _adapter_value(i, 'b', adapter.b_shape)
        for shard in restored[key].addressable_shards:
            got = np.asarray(shard.data)
            rows, cols = shard.index
            if merged:
                want = w[rows, cols] + np.float32(adapter.scale) * (a[rows] @ b[:, cols])
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=key)
                assert not np.array_equal(got, w[rows, cols]), f'{key}: merge changed nothing'
            else:
                np.testing.assert_array_equal(got.view(np.uint32), w[rows, cols].view(np.uint32))
            checked += 1
    return checked


def _ratios(results: dict) -> dict:
    """Wall of (b) and (c) over (a)'s, medians and best runs; (b)'s against the target."""
    floor = results['orbax_base']
    out = {}
    for method in ('lora_merge', 'orbax_then_merge'):
        if method not in results:
            continue
        r = results[method]
        out[method] = {
            'wall': round(r['wall_s_median'] / floor['wall_s_median'], 3),
            'wall_best': round(r['wall_s_best'] / floor['wall_s_best'], 3),
            'rss': round(r['peak_rss_over_baseline_max'] / floor['peak_rss_over_baseline_max'], 3),
            'read': round(r['bytes_read_max'] / floor['bytes_read_max'], 4),
        }
    ours = out['lora_merge']
    ours['met'] = {
        'wall': ours['wall'] <= TARGET_WALL,
        'wall_best': ours['wall_best'] <= TARGET_WALL,
    }
    return out


def _print_table(
    args: argparse.Namespace, raw: int, stored: dict, results: dict, ratios: dict
) -> None:
    mib = 2**20
    print(
        f'\nBase: {args.layers} layers, d={args.d}, vocab {args.vocab}, {raw / 2**30:.3f} GiB '
        f'float32 (on disk {stored["base"] / 2**30:.3f} GiB); rank-{args.rank} adapters on the '
        f'attention and MLP kernels ({stored["adapters"] / mib:.1f} MiB on disk). Restored by 1 '
        f'process with {DEVICES} CPU devices, kernels sharded over a {MESH[0]}x{MESH[1]} mesh '
        f'on both axes; {args.runs} fresh processes per method; BLAS threads: '
        f'{args.blas_threads or "as the environment sets"}.\n'
    )
    header = (
        f'{"method":38s} {"wall s median":>13s} {"best":>6s} {"CPU s":>6s} '
        f'{"peak RSS over base MiB":>22s} {"read MiB":>9s} {"restored MiB":>12s} '
        f'{"read/restored":>13s} {"RSS/restored":>12s}'
    )
    print(header)
    print('-' * len(header))
    for method, r in results.items():
        print(
            f'{NAMES[method]:38s} {r["wall_s_median"]:13.3f} {r["wall_s_best"]:6.3f} '
            f'{r["cpu_s_median"]:6.2f} '
            f'{r["peak_rss_over_baseline_max"] / mib:22.1f} {r["bytes_read_max"] / mib:9.1f} '
            f'{r["restored_bytes"] / mib:12.1f} '
            f'{r["bytes_read_max"] / r["restored_bytes"]:13.3f} '
            f'{r["peak_rss_over_baseline_max"] / r["restored_bytes"]:12.3f}'
        )
    print('\nAgainst (a), plain Orbax restoring the base alone:')
    for method, q in ratios.items():
        print(
            f'  {NAMES[method]:38s} wall {q["wall"]:.2f}x (best runs {q["wall_best"]:.2f}x), '
            f'peak RSS {q["rss"]:.2f}x, bytes read {q["read"]:.3f}x'
        )
    ours = ratios['lora_merge']
    verdict = 'PASS' if ours['met']['wall'] else 'MISS'
    print(
        f'\nCheck: (b) wall / (a) wall, medians = {ours["wall"]:.3f} <= {TARGET_WALL} '
        f'{verdict} (best runs {ours["wall_best"]:.3f} '
        f'{"PASS" if ours["met"]["wall_best"] else "MISS"})'
    )
    planned = results['lora_merge']['runs'][0]['planned']
    how = {r['rss_measured_as'] for m in results.values() for r in m['runs']}
    load = max(r['load_average_1m'] for m in results.values() for r in m['runs'])
    print(
        f'\nBytes read: TensorStore /tensorstore/kvstore/file/bytes_read (compressed; data is '
        f"random bits). (b)'s plan: {planned['needed'] / mib:.1f} MiB needed, "
        f'{planned["chunked"] / mib:.1f} MiB in the chunks it touches. Peak RSS: '
        f'{", ".join(sorted(how))}; on CPU devices the restored arrays themselves count in RSS. '
        "(c)'s wall time includes compiling its merge. CPU s: the process's user + system time "
        f'during the restore (median). Highest 1-minute load average before a restore: '
        f'{load:.2f} on {os.cpu_count()} CPUs (other work on the machine skews the times).'
    )


if __name__ == '__main__':
    main()
