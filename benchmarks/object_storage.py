"""Restore a scanned ~1 GB transformer checkpoint from S3 (a local emulator), in 2 processes.

The checkpoint holds an embedding and L stacked (scanned) layers: attention
q, k, v, o kernels (L, d, d), an MLP wi (L, d, 4d) and wo (L, 4d, d), and two
norm scales (L, d), as random float32 bits (incompressible), one layer's
per-device slice per chunk (`SaveArgs(shard_axes=(0,))`). It is written once
by plain Orbax from one process with 8 CPU devices, both to a local directory
and to `s3://<bucket>/scanned` on moto's S3 server, started on loopback for the
run (it keeps the objects itself, so it is slower than real S3 or a disk).

Each method then runs in 2 fresh processes joined by `jax.distributed` (gloo on
loopback), 4 fake CPU devices each, every layer sharded over all 8 devices:

  (a) plain Orbax restores the scanned layout from S3 (the floor for object storage),
  (b) `SurgeryRestore` with `Unstack` restores the layers, unrolled, from S3,
      reading exactly the chunks each process needs (the default),
  (b') the same, letting one request read through up to 1 MB between needed
      chunks as Orbax does (`read_gap_bytes`): more bytes, fewer requests,
  (c) the same as (b) from the local directory (the local-disk figures, same run).

Each process reports its own wall time of the restore, its peak RSS over its
RSS just before restoring, the bytes TensorStore requested from S3 and its S3
read requests, the bytes it read from local files, and the bytes its own
shards hold. The last line of output is one JSON object with all figures.

    python benchmarks/object_storage.py                  # L=16, d=1024, vocab 32000 (~1 GB)
    python benchmarks/object_storage.py --layers 4 --d 256 --vocab 4000 --runs 1
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from incompressible import random_float32
from measuring import (
    PeakRss,
    free_port,
    join_job,
    run_processes,
    shard_bytes,
    summarize,
    worker_env,
)

METHODS = ('orbax_scanned_s3', 'surgery_s3', 'surgery_s3_gaps', 'surgery_local')
PROCESSES, DEVICES = 2, 4
TIMEOUT_S = 3600
BUCKET = 'orbax-surgery-bench'
S3_PREFIX = 'scanned'
S3_ENV = {
    'AWS_ACCESS_KEY_ID': 'testing',
    'AWS_SECRET_ACCESS_KEY': 'testing',
    'AWS_REGION': 'us-east-1',
    'AWS_DEFAULT_REGION': 'us-east-1',
    # No profile files to look for: the AWS C library behind TensorStore logs each miss.
    'AWS_CONFIG_FILE': os.devnull,
    'AWS_SHARED_CREDENTIALS_FILE': os.devnull,
}
NAMES = {
    'orbax_scanned_s3': '(a) Orbax, scanned, S3 (floor)',
    'surgery_s3': '(b) SurgeryRestore + Unstack, S3',
    'surgery_s3_gaps': "(b') same, read_gap_bytes=1MB",
    'surgery_local': '(c) SurgeryRestore + Unstack, disk',
}
COUNTERS = {
    's3_bytes_read': '/tensorstore/kvstore/s3/bytes_read',
    's3_reads': '/tensorstore/kvstore/s3/read',
    'file_bytes_read': '/tensorstore/kvstore/file/bytes_read',
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--layers', type=int, default=16, help='stacked layers L')
    parser.add_argument('--d', type=int, default=1024, help='model width (a multiple of 8)')
    parser.add_argument('--vocab', type=int, default=32000, help='embedding rows (multiple of 8)')
    parser.add_argument('--runs', type=int, default=3, help='fresh process pairs per method')
    parser.add_argument('--dir', default='/tmp/orbax-surgery-bench/object_storage')
    parser.add_argument(
        '--max-inflight-mib', type=int, default=None, help="SurgeryRestore's in-flight budget"
    )
    parser.add_argument('--only', choices=METHODS, help='run one method (for experiments)')
    parser.add_argument('--worker', choices=[*METHODS, 'save'], help=argparse.SUPPRESS)
    parser.add_argument('--s3', help=argparse.SUPPRESS)
    parser.add_argument('--port', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--process-id', type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.d % 8 or args.vocab % 8:
        parser.error('--d and --vocab must be multiples of the 8 devices')
    params = _params(args.layers, args.d, args.vocab)
    if args.worker == 'save':
        print(json.dumps(_save([args.dir, args.s3], params)))
        return
    if args.worker:
        directory = args.dir if args.worker == 'surgery_local' else args.s3
        result = _restore(
            args.worker,
            directory,
            args.layers,
            params,
            args.port,
            args.process_id,
            args.max_inflight_mib,
        )
        print(json.dumps(result))
        return

    local = Path(args.dir) / f'L{args.layers}_d{args.d}_v{args.vocab}'
    remote = f's3://{BUCKET}/{S3_PREFIX}'
    raw = sum(4 * math.prod(shape) for shape, _ in params.values())
    results = {}
    shutil.rmtree(local, ignore_errors=True)
    try:
        with _s3_server() as endpoint:
            print(f'moto S3 server at {endpoint}, bucket {BUCKET}', flush=True)
            print(f'Writing {raw / 2**30:.2f} GiB to {local} and to {remote} ...', flush=True)
            start = time.perf_counter()
            _run_save(args, str(local), remote)
            save_s = time.perf_counter() - start
            files = [f.stat().st_size for f in local.rglob('*') if f.is_file()]
            stored = {'local': (sum(files), len(files)), 's3': _s3_bytes(S3_PREFIX)}
            chunks = _chunk_shapes(local / '1' / 'default')
            for method in METHODS:
                if args.only and method != args.only:
                    continue
                print(f'{method} x {args.runs} ...', flush=True)
                pairs = [_run_pair(args, method, str(local), remote) for _ in range(args.runs)]
                results[method] = {
                    str(pid): _summary([pair[pid] for pair in pairs]) for pid in range(PROCESSES)
                }
    finally:
        shutil.rmtree(local, ignore_errors=True)
    if args.only:  # An experiment: the raw figures of one method, no comparison.
        print(json.dumps(results))
        return
    ratios = _ratios(results)
    _print_table(args, params, raw, stored, save_s, chunks, results, ratios)
    print(
        json.dumps(
            {
                'benchmark': 'object_storage',
                'layers': args.layers,
                'd': args.d,
                'vocab': args.vocab,
                'checkpoint_bytes': raw,
                'stored_bytes': {k: v[0] for k, v in stored.items()},
                'stored_files': {k: v[1] for k, v in stored.items()},
                'save_s': round(save_s, 3),
                'processes': PROCESSES,
                'devices_per_process': DEVICES,
                'runs': args.runs,
                'chunk_shapes': chunks,
                'ratios': ratios,
                'results': results,
            }
        )
    )


@contextlib.contextmanager
def _s3_server() -> Iterator[str]:
    """moto's S3 server on a free loopback port, with a bucket; the AWS variables set for it.

    Workers inherit the variables through `worker_env`. The server is killed, by its
    process id, on the way out.
    """
    port = free_port()
    endpoint = f'http://127.0.0.1:{port}'
    process = subprocess.Popen(
        [sys.executable, '-m', 'moto.server', '-H', '127.0.0.1', '-p', str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    old = {k: os.environ.get(k) for k in [*S3_ENV, 'AWS_ENDPOINT_URL']}
    try:
        _wait_for(endpoint, process)
        os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
        import boto3

        boto3.client('s3').create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        process.kill()
        process.wait()
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _wait_for(url: str, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f'the S3 server at {url} exited with {process.returncode}')
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # It answers.
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f'no S3 server answered at {url} within {seconds} s')


def _s3_bytes(prefix: str) -> tuple[int, int]:
    """The bytes and the number of the objects under `prefix` in the bucket."""
    import boto3

    paginator = boto3.client('s3').get_paginator('list_objects_v2')
    pages = paginator.paginate(Bucket=BUCKET, Prefix=prefix + '/')
    sizes = [o['Size'] for page in pages for o in page.get('Contents', ())]
    return sum(sizes), len(sizes)


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


def _common_args(args: argparse.Namespace, local: str, remote: str) -> list[str]:
    common = ['--layers', str(args.layers), '--d', str(args.d), '--vocab', str(args.vocab)]
    common += ['--dir', local, '--s3', remote]
    if args.max_inflight_mib is not None:
        common += ['--max-inflight-mib', str(args.max_inflight_mib)]
    return common


def _run_save(args: argparse.Namespace, local: str, remote: str) -> None:
    cmd = [sys.executable, __file__, '--worker', 'save', *_common_args(args, local, remote)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(), timeout=TIMEOUT_S)
    if out.returncode:
        sys.exit(f'saving failed:\n{(out.stdout + out.stderr)[-6000:]}')


def _run_pair(args: argparse.Namespace, method: str, local: str, remote: str) -> list[dict]:
    """Runs `method` in PROCESSES fresh processes of one jax.distributed job."""
    port = free_port()
    cmd = [sys.executable, __file__, '--worker', method, *_common_args(args, local, remote)]
    cmd += ['--port', str(port)]
    return run_processes(cmd, PROCESSES, method, TIMEOUT_S)


def _chunk_shapes(item: Path) -> dict[str, list[int] | None]:
    import orbax_surgery as osurg

    arrays = osurg.OrbaxCheckpoint(item).arrays
    return {k: list(a.chunk_shape) if a.chunk_shape else None for k, a in arrays.items()}


def _save(directories: list[str], params: dict) -> dict:
    import jax

    jax.config.update('jax_num_cpu_devices', PROCESSES * DEVICES)
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import orbax_surgery  # noqa: F401  Lets Orbax write s3:// (patched at import).
    from orbax_surgery.keys import nest

    mesh = jax.make_mesh((PROCESSES * DEVICES,), ('x',))
    tree, save_args = {}, {}
    for index, (key, (shape, spec)) in enumerate(params.items()):
        value = random_float32(index, shape)
        # The restore's per-device slice of one layer per chunk: split axis 0 fully.
        sharding = NamedSharding(mesh, P(*spec))
        tree[key] = jax.make_array_from_callback(shape, sharding, lambda i, v=value: v[i])
        stacked = key.startswith('layers/')
        save_args[key] = ocp.SaveArgs(shard_axes=(0,) if stacked else ())
        del value
    seconds = {}
    for directory in directories:
        start = time.perf_counter()
        with ocp.CheckpointManager(directory) as manager:
            manager.save(1, args=ocp.args.StandardSave(nest(tree), save_args=nest(save_args)))
            manager.wait_until_finished()
        seconds[directory] = round(time.perf_counter() - start, 3)
    return {'saved': len(tree), 'save_s': seconds}


def _counters() -> dict[str, int]:
    """TensorStore's S3 bytes and read requests, and local file bytes, in this process so far."""
    import tensorstore as ts

    totals = {}
    for name, metric in COUNTERS.items():
        metrics = ts.experimental_collect_matching_metrics(metric)
        totals[name] = sum(v.get('value', 0) for m in metrics for v in m['values'])
    return totals


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

    import orbax_surgery as osurg  # Also lets Orbax read s3:// (patched at import).
    from orbax_surgery.keys import flatten, nest

    scanned, unrolled = {}, {}
    for key, (shape, spec) in params.items():
        scanned[key] = jax.ShapeDtypeStruct(
            shape, np.float32, sharding=NamedSharding(mesh, P(*spec))
        )
        if key.startswith('layers/'):
            name = key.removeprefix('layers/')
            sharding = NamedSharding(mesh, P(*spec[1:]))
            for i in range(layers):
                unrolled[f'layers_{i}/{name}'] = jax.ShapeDtypeStruct(
                    shape[1:], np.float32, sharding=sharding
                )
        else:
            unrolled[key] = scanned[key]
    own_bytes = shard_bytes(scanned)
    assert own_bytes == shard_bytes(unrolled), 'the methods must place the same bytes'

    rules = [osurg.Unstack(r'layers/(.*)', r'layers_{i}/\1')]
    planned = None
    if method == 'orbax_scanned_s3':
        args = ocp.args.StandardRestore(nest(scanned))
    else:
        reads = osurg.plan_restore(f'{directory}/1/default', nest(unrolled), rules).reads[pid]
        planned = {
            'needed': reads.needed,
            'chunked': reads.chunked,
            'amplification': round(reads.amplification, 4),
        }
        budget = {} if max_inflight_mib is None else {'max_inflight_bytes': max_inflight_mib << 20}
        args = osurg.SurgeryRestore(target=nest(unrolled), rules=rules, **budget)
    handler = None
    if method == 'surgery_s3_gaps':  # Reads through gaps between needed chunks, as Orbax does.
        gaps = osurg.sources.orbax_checkpoint.ORBAX_READ_GAP_BYTES
        handler = osurg.SurgeryCheckpointHandler(read_gap_bytes=gaps)
    manager = ocp.CheckpointManager(directory, item_handlers=handler)
    multihost_utils.sync_global_devices('restore')
    gc.collect()
    peak = PeakRss()
    before = _counters()
    start = time.perf_counter()
    out = manager.restore(1, args=args)
    jax.block_until_ready(out)
    wall = time.perf_counter() - start
    over = peak.stop()
    counted = {name: value - before[name] for name, value in _counters().items()}

    restored = flatten(out)[0]
    expected = unrolled if method != 'orbax_scanned_s3' else scanned
    assert set(restored) == set(expected), sorted(set(restored) ^ set(expected))
    checked = 0
    for index, (key, (shape, _)) in enumerate(params.items()):
        value = random_float32(index, shape).view(np.uint32)
        names = [(key, ())]
        if key.startswith('layers/') and method != 'orbax_scanned_s3':
            names = [(f'layers_{i}/{key.removeprefix("layers/")}', (i,)) for i in range(layers)]
        for name, layer in names:
            got = restored[name]
            assert got.sharding == expected[name].sharding, (name, got.sharding)
            for shard in got.addressable_shards:
                data = np.asarray(shard.data).view(np.uint32)
                np.testing.assert_array_equal(data, value[layer + tuple(shard.index)])
                checked += 1
    multihost_utils.sync_global_devices('checked')
    manager.close()
    return {
        'process': pid,
        'method': method,
        'wall_s': round(wall, 3),
        'peak_rss_over_baseline': over,
        'baseline_rss': peak.baseline,
        'rss_measured_as': peak.how,
        'bytes_read': counted['s3_bytes_read'] + counted['file_bytes_read'],
        **counted,
        'shard_bytes': own_bytes,
        'shards_checked': checked,
        'planned': planned,
    }


def _summary(runs: list[dict]) -> dict:
    """`summarize`'s figures, plus the worst run's S3 bytes, S3 requests and file bytes."""
    summary = summarize(runs, bytes_field='shard_bytes')
    for name in COUNTERS:
        summary[f'{name}_max'] = max(r[name] for r in runs)
    return summary


def _ratios(results: dict) -> dict:
    """Per process: each method's read and RSS over its shard bytes, wall over (a)'s."""
    out = {}
    for pid in map(str, range(PROCESSES)):
        floor = results['orbax_scanned_s3'][pid]
        out[pid] = {}
        for method, per_process in results.items():
            r = per_process[pid]
            out[pid][method] = {
                'read': round(r['bytes_read_max'] / r['shard_bytes'], 3),
                'rss': round(r['peak_rss_over_baseline_max'] / r['shard_bytes'], 3),
                'wall_over_a': round(r['wall_s_median'] / floor['wall_s_median'], 3),
                'wall_best_over_a': round(r['wall_s_best'] / floor['wall_s_best'], 3),
            }
    return out


def _print_table(
    args: argparse.Namespace,
    params: dict,
    raw: int,
    stored: dict,
    save_s: float,
    chunks: dict,
    results: dict,
    ratios: dict,
) -> None:
    mib = 2**20
    print(
        f'\nScanned checkpoint: {args.layers} layers, d={args.d}, vocab {args.vocab}, '
        f'{raw / 2**30:.3f} GiB float32 (on disk {stored["local"][0] / 2**30:.3f} GiB; on S3 '
        f'{stored["s3"][0] / 2**30:.3f} GiB in {stored["s3"][1]} objects; both saved in '
        f'{save_s:.1f} s). Restored by {PROCESSES} processes x {DEVICES} CPU devices, each '
        f'layer sharded over all {PROCESSES * DEVICES}; {args.runs} fresh process pairs per '
        'method.'
    )
    print('\nChunk shapes (one layer shard a chunk):')
    for key, shape in chunks.items():
        print(f'  {key:22s} {str(tuple(params[key][0])):22s} chunk {tuple(shape or ())}')
    header = (
        f'{"method":36s} {"proc":>4s} {"wall s median":>13s} {"best":>7s} '
        f'{"peak RSS over base MiB":>22s} {"read MiB":>9s} {"requests":>8s} '
        f'{"shards MiB":>10s} {"read/shards":>11s} {"RSS/shards":>10s}'
    )
    print()
    print(header)
    print('-' * len(header))
    for method, per_process in results.items():
        for pid, r in per_process.items():
            label = NAMES[method] if pid == '0' else ''
            print(
                f'{label:36s} {pid:>4s} {r["wall_s_median"]:13.3f} {r["wall_s_best"]:7.3f} '
                f'{r["peak_rss_over_baseline_max"] / mib:22.1f} '
                f'{r["bytes_read_max"] / mib:9.1f} {r["s3_reads_max"]:8d} '
                f'{r["shard_bytes"] / mib:10.1f} '
                f'{r["bytes_read_max"] / r["shard_bytes"]:11.3f} '
                f'{r["peak_rss_over_baseline_max"] / r["shard_bytes"]:10.3f}'
            )
    print('\nWall time over (a), per process (medians; best runs):')
    for method in results:
        cells = [
            f'proc {pid}: {t[method]["wall_over_a"]:6.3f}; {t[method]["wall_best_over_a"]:6.3f}'
            for pid, t in ratios.items()
        ]
        print(f'  {NAMES[method]:36s} ' + '   '.join(cells))
    how = {r['rss_measured_as'] for m in results.values() for r in m['0']['runs']}
    print(
        '\nRead MiB: TensorStore /tensorstore/kvstore/s3/bytes_read plus '
        '/tensorstore/kvstore/file/bytes_read (worst run; data is random bits, so compressed '
        'bytes are stored bytes); requests: /tensorstore/kvstore/s3/read. Metadata files read '
        f'through etils/s3fs are not counted. Peak RSS: {", ".join(sorted(how))}. On CPU '
        'devices the restored arrays themselves count in RSS. S3 is moto on loopback, which '
        'reads a whole object to answer each ranged GET: its times are not those of real S3.'
    )


if __name__ == '__main__':
    main()
