"""Import a ~1 GB sharded Hugging Face safetensors checkpoint into Flax, in 2 processes.

The checkpoint is Llama-shaped: `model.embed_tokens.weight`, L layers of
`self_attn.{q,k,v,o}_proj.weight` (d, d), `mlp.{gate,up}_proj.weight` (ffn, d),
`mlp.down_proj.weight` (d, ffn), two RMSNorm weights (d,), `model.norm.weight`
and an untied `lm_head.weight`, as random float32 bits (incompressible). It is
written once with `safetensors.numpy.save_file`, split into files of at most
--shard-mib in tensor order, with a `model.safetensors.index.json` (weight_map,
metadata.total_size) as transformers writes it.

The target is the Flax model's tree, `osurg.from_pytorch(drop_prefix='model',
layers='unrolled')` names: `embed_tokens/embedding`, `layers_N/.../kernel`
(in, out), `.../scale`, `norm/scale`, `lm_head/kernel`. Every leaf is sharded
over all 8 devices of 2 processes x 4 fake CPU devices, in one of two layouts:

  contiguous: every kernel on its output axis, P(None, 'x'): a device's shard is
              a block of whole torch rows, one contiguous byte range;
  mixed:      as Megatron shards a layer: q, k, v, gate, up and lm_head on the
              output axis, o_proj and down_proj (row-parallel) on the input axis,
              P('x', None): a device's shard is a column block of the torch
              weight, one short run per torch row.

The embedding is sharded on its rows, the norm scales on their one axis.

Each method runs in 2 fresh processes joined by `jax.distributed` (gloo on
loopback), in the same run:

  (floor) `cat <files> > /dev/null` in one process: every byte of the files, read once,
  (floor) contiguous only: each process preads each tensor's rows its devices hold into
      fresh memory, and places nothing (the cost of the bytes alone, page faults included),
  (a) `osurg.restore(SafetensorsCheckpoint(dir), target, from_pytorch(...))`,
  (b) Orbax's own loader (`orbax.checkpoint.v1.load` with the SAFETENSORS layout):
      the same bytes per device, but torch names and layouts (no transpose, no rename),
  (c) `safetensors.numpy.load_file` of each file, transpose, `jax.device_put` with
      the target sharding (what users do today); (c') the same with
      `jax.make_array_from_callback` in place of `device_put` (mixed layout only).

Each process reports its wall time, CPU time, peak RSS over its RSS just
before restoring, the bytes its method says it read (`SafetensorsCheckpoint.
bytes_read`; Orbax's `/jax/orbax/read/safetensors/bytes_read`; for (c) the bytes
of every tensor it loaded), its /proc/self/io `rchar` and `read_bytes` deltas,
and the bytes its own shards hold; for (a) also the CPU seconds of its reads.
Targets for (a), per process: bytes read within 1.1x its shard bytes, wall
time within 1.5x the cat floor. By default the page cache is warm (one
untimed `cat` first); --cold evicts the checkpoint's files from it before
every timed run (posix_fadvise DONTNEED: libraries stay cached, no root needed).
The last line of output is one JSON object with all figures.

    python benchmarks/hf_import.py                   # L=16, d=1024, ffn 2816, vocab 32000 (~1 GiB)
    python benchmarks/hf_import.py --layers 2 --d 256 --ffn 704 --vocab 4000 --shard-mib 2 --runs 1
    python benchmarks/hf_import.py --cold            # files evicted from the page cache each run
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from incompressible import INDEX, write_sharded_safetensors
from measuring import (
    PeakRss,
    free_port,
    io_counters,
    join_job,
    run_processes,
    shard_bytes,
    summarize,
)

METHODS = ('pread', 'surgery', 'orbax', 'numpy_put', 'numpy_callback')
LAYOUTS = {
    'contiguous': ('pread', 'surgery', 'orbax'),
    'mixed': ('surgery', 'orbax', 'numpy_put', 'numpy_callback'),
}
PROCESSES, DEVICES = 2, 4
TIMEOUT_S = 1800
NAMES = {
    'surgery': '(a) osurg.restore + from_pytorch',
    'orbax': '(b) Orbax v1 safetensors load',
    'pread': '(floor) own rows, pread only',
    'numpy_put': '(c) load_file + device_put',
    'numpy_callback': "(c') load_file + from_callback",
}
TARGETS = {'read': 1.1, 'wall': 1.5}
ROW_PARALLEL = r'.*/(o_proj|down_proj)/kernel'
CHECKED = ('embed_tokens/embedding', 'norm/scale', 'lm_head/kernel')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--layers', type=int, default=16, help='decoder layers L')
    parser.add_argument('--d', type=int, default=1024, help='hidden size (a multiple of 8)')
    parser.add_argument('--ffn', type=int, default=2816, help='MLP size (a multiple of 8)')
    parser.add_argument('--vocab', type=int, default=32000, help='vocabulary (a multiple of 8)')
    parser.add_argument('--shard-mib', type=float, default=250, help='max MiB per file')
    parser.add_argument('--runs', type=int, default=3, help='fresh process pairs per method')
    parser.add_argument('--cold', action='store_true', help='evict the files from the page cache')
    parser.add_argument('--dir', default='/tmp/orbax-surgery-bench/hf_import')
    parser.add_argument('--keep', action='store_true', help='keep (and reuse) the checkpoint')
    parser.add_argument(
        '--max-inflight-mib', type=int, default=None, help="osurg.restore's in-flight budget"
    )
    parser.add_argument('--only', choices=METHODS, help='run one method (for experiments)')
    parser.add_argument('--worker', choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument('--layout', choices=list(LAYOUTS), help=argparse.SUPPRESS)
    parser.add_argument('--port', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--process-id', type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.d % 8 or args.ffn % 8 or args.vocab % 8:
        parser.error('--d, --ffn and --vocab must be multiples of the 8 devices')
    tensors = _tensors(args.layers, args.d, args.ffn, args.vocab)
    if args.worker:
        result = _restore(
            args.worker,
            args.layout,
            args.dir,
            tensors,
            args.port,
            args.process_id,
            args.max_inflight_mib,
        )
        print(json.dumps(result))
        return

    root = Path(args.dir) / f'L{args.layers}_d{args.d}_f{args.ffn}_v{args.vocab}_s{args.shard_mib}'
    raw = sum(4 * math.prod(shape) for shape in tensors.values())
    results: dict[str, dict] = {}
    try:
        if not (root / INDEX).exists():
            shutil.rmtree(root, ignore_errors=True)
            print(f'Writing {raw / 2**30:.2f} GiB of safetensors to {root} ...', flush=True)
            write_sharded_safetensors(root, tensors, int(args.shard_mib * 2**20))
        files = sorted(root.glob('*.safetensors'))
        stored = {f.name: f.stat().st_size for f in files}
        if not args.cold:
            _cat(files)  # Untimed: every method then reads from a warm page cache.
        print(f'floor: cat x {args.runs} ...', flush=True)
        floor = _floor(files, args.runs, args.cold)
        for layout, methods in LAYOUTS.items():
            results[layout] = {}
            for method in methods:
                if args.only and method != args.only:
                    continue
                print(f'{layout}: {method} x {args.runs} ...', flush=True)
                pairs = [_run_pair(args, method, layout, str(root)) for _ in range(args.runs)]
                results[layout][method] = {
                    str(pid): summarize([pair[pid] for pair in pairs], bytes_field='shard_bytes')
                    for pid in range(PROCESSES)
                }
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.only:  # An experiment: the raw figures of one method, no comparison.
        print(json.dumps({'floor': floor, 'results': results}))
        return
    targets = _targets(results, floor)
    _print_tables(args, raw, stored, floor, results, targets)
    print(
        json.dumps(
            {
                'benchmark': 'hf_import',
                'layers': args.layers,
                'd': args.d,
                'ffn': args.ffn,
                'vocab': args.vocab,
                'checkpoint_bytes': raw,
                'stored_bytes': stored,
                'page_cache': 'cold' if args.cold else 'warm',
                'processes': PROCESSES,
                'devices_per_process': DEVICES,
                'runs': args.runs,
                'targets': targets,
                'floor': floor,
                'results': results,
            }
        )
    )


def _tensors(layers: int, d: int, ffn: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> torch shape, in the order transformers saves a Llama."""
    out = {'model.embed_tokens.weight': (vocab, d)}
    for i in range(layers):
        at = f'model.layers.{i}.'
        for proj in ('q', 'k', 'v', 'o'):
            out[f'{at}self_attn.{proj}_proj.weight'] = (d, d)
        out[f'{at}mlp.gate_proj.weight'] = (ffn, d)
        out[f'{at}mlp.up_proj.weight'] = (ffn, d)
        out[f'{at}mlp.down_proj.weight'] = (d, ffn)
        out[f'{at}input_layernorm.weight'] = (d,)
        out[f'{at}post_attention_layernorm.weight'] = (d,)
    out['model.norm.weight'] = (d,)
    out['lm_head.weight'] = (vocab, d)
    return out


def _flax(name: str, shape: tuple[int, ...], layout: str) -> tuple[str, tuple[int, ...], tuple]:
    """A torch tensor's Flax key, shape and PartitionSpec over ('x',) in `layout`."""
    key = re.sub(r'layers\.(\d+)\.', r'layers_\1.', name.removeprefix('model.'))
    module = key.removesuffix('.weight').replace('.', '/')
    if module == 'embed_tokens':
        return f'{module}/embedding', shape, ('x', None)
    if len(shape) == 1:
        return f'{module}/scale', shape, ('x',)
    key = f'{module}/kernel'
    row_parallel = layout == 'mixed' and re.fullmatch(ROW_PARALLEL, key)
    return key, shape[::-1], ('x', None) if row_parallel else (None, 'x')


def _evict(files: list[Path]) -> None:
    """Drops the files' pages from the page cache (clean pages: they were written long ago)."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _cat(files: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run(['cat', *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def _floor(files: list[Path], runs: int, cold: bool) -> dict:
    """`cat` of every file to /dev/null, `runs` times."""
    walls = []
    for _ in range(runs):
        if cold:
            _evict(files)
        walls.append(round(_cat(files), 3))
    return {
        'wall_s_median': round(statistics.median(walls), 3),
        'wall_s_best': min(walls),
        'bytes': sum(f.stat().st_size for f in files),
        'walls': walls,
    }


def _run_pair(args: argparse.Namespace, method: str, layout: str, directory: str) -> list[dict]:
    """Runs `method` in PROCESSES fresh processes of one jax.distributed job."""
    port = free_port()
    cmd = [sys.executable, __file__, '--worker', method, '--layout', layout, '--dir', directory]
    cmd += ['--layers', str(args.layers), '--d', str(args.d), '--ffn', str(args.ffn)]
    cmd += ['--vocab', str(args.vocab), '--port', str(port)]
    if args.max_inflight_mib is not None:
        cmd += ['--max-inflight-mib', str(args.max_inflight_mib)]
    if args.cold:
        _evict(sorted(Path(directory).glob('*.safetensors')))
    return run_processes(cmd, PROCESSES, f'{layout} {method}', TIMEOUT_S)


def _restore(
    method: str,
    layout: str,
    directory: str,
    tensors: dict,
    port: int,
    pid: int,
    max_inflight_mib: int | None,
) -> dict:
    import jax

    mesh = join_job(port, pid, PROCESSES, DEVICES)

    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import orbax_surgery as osurg
    from orbax_surgery.keys import flatten, nest

    flax, torch, key_of = {}, {}, {}
    for name, shape in tensors.items():
        key, flax_shape, spec = _flax(name, shape, layout)
        key_of[name] = key
        flax[key] = jax.ShapeDtypeStruct(
            flax_shape, np.float32, sharding=NamedSharding(mesh, P(*spec))
        )
        # Orbax restores torch layouts: the same per-device bytes, the spec transposed.
        torch_spec = spec[::-1] if key.endswith('/kernel') else spec
        torch[name] = jax.ShapeDtypeStruct(
            shape, np.float32, sharding=NamedSharding(mesh, P(*torch_spec))
        )
    own = shard_bytes(flax)
    assert own == shard_bytes(torch), 'the methods must place the same bytes'

    rules = osurg.from_pytorch(drop_prefix='model', layers='unrolled')
    budget = {} if max_inflight_mib is None else {'max_inflight_bytes': max_inflight_mib << 20}
    planned = None
    if method == 'surgery':
        plan = osurg.plan_restore(directory, nest(flax), rules)
        assert not plan.errors and not plan.unused, (plan.errors, plan.unused)
        planned = {'needed': plan.reads[pid].needed}
    orbax_read: list[float] = []
    if method == 'orbax':
        from orbax.checkpoint import v1 as ocp

        def listen(event: str, value: float, **kwargs) -> None:
            if event == '/jax/orbax/read/safetensors/bytes_read':
                orbax_read.append(value)

        jax.monitoring.register_scalar_listener(listen)
        context = ocp.Context(checkpoint_layout=ocp.options.CheckpointLayout.SAFETENSORS)
    files = sorted(Path(directory).glob('*.safetensors'))
    rows = {name: _own_rows(leaf) for name, leaf in torch.items()} if method == 'pread' else {}

    multihost_utils.sync_global_devices('restore')
    gc.collect()
    load = os.getloadavg()[0]
    peak = PeakRss()
    io = io_counters()
    cpu = time.process_time()
    start = time.perf_counter()
    loaded = 0
    if method == 'surgery':
        source = _timed_source_class(osurg.SafetensorsCheckpoint)(directory)
        out = flatten(osurg.restore(source, nest(flax), rules, **budget))[0]
    elif method == 'orbax':
        with context:
            out = ocp.load(directory, abstract_state=torch)
    elif method == 'pread':
        out = _pread_rows(files, rows)
        loaded = sum(v.nbytes for v in out.values())
    else:
        from safetensors.numpy import load_file

        out = {}
        for file in files:
            values = load_file(file)
            for name, value in values.items():
                loaded += value.nbytes
                key = key_of[name]
                value = value.T if key.endswith('/kernel') else value
                sharding = flax[key].sharding
                if method == 'numpy_put':
                    out[key] = jax.device_put(value, sharding)
                else:
                    out[key] = jax.make_array_from_callback(
                        value.shape, sharding, lambda i, v=value: v[i]
                    )
            del values, value
    jax.block_until_ready(out)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu
    over = peak.stop()
    after = io_counters()
    rchar, disk = after['rchar'] - io['rchar'], after['read_bytes'] - io['read_bytes']
    read = {'surgery': lambda: source.bytes_read, 'orbax': lambda: int(sum(orbax_read))}.get(
        method, lambda: loaded
    )()

    checked = 0
    if method != 'pread':
        expected = torch if method == 'orbax' else flax
        assert set(out) == set(expected), sorted(set(out) ^ set(expected))
        for key, leaf in out.items():
            assert leaf.sharding == expected[key].sharding, (key, leaf.sharding)
        checked = _check(method, directory, out, key_of)
    multihost_utils.sync_global_devices('checked')
    return {
        'process': pid,
        'method': method,
        'layout': layout,
        'wall_s': round(wall, 3),
        'cpu_s': round(cpu, 3),
        'read_thread_s': round(source.read_s, 3) if method == 'surgery' else None,
        'peak_rss_over_baseline': over,
        'baseline_rss': peak.baseline,
        'rss_measured_as': peak.how,
        'load_average_1m': round(load, 2),
        'bytes_read': read,
        'rchar': rchar,
        'disk_read_bytes': disk,
        'shard_bytes': own,
        'shards_checked': checked,
        'planned': planned,
    }


def _timed_source_class(base: type) -> type:
    """`base` (SafetensorsCheckpoint) also summing the CPU seconds its reads take."""
    import threading

    class TimedSource(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.read_s = 0.0
            self._lock = threading.Lock()

        def read_now(self, source, region):
            start = time.thread_time()
            try:
                return super().read_now(source, region)
            finally:
                with self._lock:
                    self.read_s += time.thread_time() - start

    return TimedSource


def _own_rows(leaf) -> tuple[int, int]:
    """The rows of a torch tensor this process's devices hold, which must be contiguous."""
    starts, stops = set(), set()
    for index in leaf.sharding.addressable_devices_indices_map(leaf.shape).values():
        first = index[0]
        starts.add(first.start or 0)
        stops.add(leaf.shape[0] if first.stop is None else first.stop)
        assert all(s == slice(None) for s in index[1:]), f'{leaf}: not whole rows'
    assert sorted(starts)[1:] == sorted(stops)[:-1], f'{leaf}: rows not contiguous'
    return min(starts), max(stops)


def _pread_rows(files: list[Path], rows: dict[str, tuple[int, int]]) -> dict:
    """Each tensor's own rows, one pread each into fresh memory: the bytes, nothing else."""
    import numpy as np

    out = {}
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            (n,) = np.frombuffer(os.pread(fd, 8, 0), '<u8')
            header = json.loads(os.pread(fd, int(n), 8))
            header.pop('__metadata__', None)
            for name, info in header.items():
                lo, hi = rows[name]
                row = 4 * math.prod(info['shape'][1:])
                buf = np.empty((hi - lo, *info['shape'][1:]), np.float32)
                view = buf.reshape(-1).view(np.uint8).data
                at, got = 8 + int(n) + info['data_offsets'][0] + lo * row, 0
                while got < len(view):
                    got += os.preadv(fd, [view[got:]], at + got)
                out[name] = buf
        finally:
            os.close(fd)
    return out


def _check(method: str, directory: str, out: dict, key_of: dict) -> int:
    """Compares every local shard of a few tensors with safetensors' own `safe_open`."""
    import numpy as np
    from safetensors import safe_open

    weight_map = json.loads((Path(directory) / INDEX).read_text())['weight_map']
    last = sum(k.endswith('/q_proj/kernel') for k in key_of.values()) - 1
    names = [n for n, k in key_of.items() if k in CHECKED]
    names += ['model.layers.0.self_attn.q_proj.weight', f'model.layers.{last}.mlp.up_proj.weight']
    names += [f'model.layers.{last}.self_attn.o_proj.weight']
    names += [f'model.layers.{last}.mlp.down_proj.weight']
    checked = 0
    for name in names:
        with safe_open(str(Path(directory) / weight_map[name]), framework='np') as f:
            want = f.get_tensor(name)
        key = name if method == 'orbax' else key_of[name]
        if method != 'orbax' and key.endswith('/kernel'):
            want = want.T
        for shard in out[key].addressable_shards:
            got = np.asarray(shard.data).view(np.uint32)
            np.testing.assert_array_equal(got, want[shard.index].view(np.uint32), err_msg=key)
            checked += 1
    return checked


def _targets(results: dict, floor: dict) -> dict:
    """(a)'s ratios per layout and process: read over shard bytes, wall over the floors'."""
    pread = results.get('contiguous', {}).get('pread', {})
    out = {}
    for layout, methods in results.items():
        if 'surgery' not in methods:
            continue
        out[layout] = {}
        for pid, r in methods['surgery'].items():
            ratios = {
                'read': r['bytes_read_max'] / r['shard_bytes'],
                'rchar': max(x['rchar'] for x in r['runs']) / r['shard_bytes'],
                'wall': r['wall_s_median'] / floor['wall_s_median'],
                'wall_best': r['wall_s_best'] / floor['wall_s_best'],
            }
            if pid in pread:
                ratios['wall_over_pread'] = r['wall_s_median'] / pread[pid]['wall_s_median']
            out[layout][pid] = {
                **{k: round(v, 3) for k, v in ratios.items()},
                'met': {
                    'read': ratios['read'] <= TARGETS['read'],
                    'wall': ratios['wall'] <= TARGETS['wall'],
                    'wall_best': ratios['wall_best'] <= TARGETS['wall'],
                },
            }
    return out


def _print_tables(
    args: argparse.Namespace,
    raw: int,
    stored: dict,
    floor: dict,
    results: dict,
    targets: dict,
) -> None:
    mib = 2**20
    cache = 'cold (files evicted before each run)' if args.cold else 'warm (one untimed cat first)'
    print(
        f'\nLlama-shaped checkpoint: {args.layers} layers, d={args.d}, ffn {args.ffn}, vocab '
        f'{args.vocab}, {raw / 2**30:.3f} GiB float32 in {len(stored)} safetensors files '
        f'({", ".join(f"{b / mib:.0f}" for b in stored.values())} MiB). Restored by '
        f'{PROCESSES} processes x {DEVICES} CPU devices, each leaf sharded over all '
        f'{PROCESSES * DEVICES}; {args.runs} fresh process pairs per method; page cache {cache}.'
    )
    rate = floor['bytes'] / floor['wall_s_median'] / 2**30
    print(
        f'\nFloor: cat of all {len(stored)} files > /dev/null, one process: median '
        f'{floor["wall_s_median"]:.3f} s, best {floor["wall_s_best"]:.3f} s '
        f'({floor["bytes"] / mib:.1f} MiB, {rate:.2f} GiB/s)'
    )
    header = (
        f'{"method":34s} {"proc":>4s} {"wall s med":>10s} {"best":>6s} {"CPU s":>6s} '
        f'{"RSS+ MiB":>8s} {"read MiB":>8s} {"rchar MiB":>9s} {"disk MiB":>8s} '
        f'{"shards MiB":>10s} {"read/shards":>11s} {"wall/floor":>10s}'
    )
    for layout, methods in results.items():
        what = {
            'mixed': 'o_proj, down_proj kernels sharded on their input axis (torch columns)',
            'contiguous': 'every kernel sharded on its output axis (torch rows)',
        }[layout]
        print(f'\n{layout}: {what}')
        print(header)
        print('-' * len(header))
        for method, per_process in methods.items():
            for pid, r in per_process.items():
                label = NAMES[method] if pid == '0' else ''
                rchar = max(x['rchar'] for x in r['runs'])
                disk = max(x['disk_read_bytes'] for x in r['runs'])
                print(
                    f'{label:34s} {pid:>4s} {r["wall_s_median"]:10.3f} {r["wall_s_best"]:6.3f} '
                    f'{r["cpu_s_median"]:6.2f} {r["peak_rss_over_baseline_max"] / mib:8.1f} '
                    f'{r["bytes_read_max"] / mib:8.1f} {rchar / mib:9.1f} {disk / mib:8.1f} '
                    f'{r["shard_bytes"] / mib:10.1f} '
                    f'{r["bytes_read_max"] / r["shard_bytes"]:11.3f} '
                    f'{r["wall_s_median"] / floor["wall_s_median"]:10.2f}'
                )
    if args.cold:
        print(
            f'\nDisk reads of both processes together, per run (MiB; the files hold '
            f'{floor["bytes"] / mib:.1f}): each byte is fetched once, by whichever process asks '
            'first, readahead included, so one process may fetch what the other reads:'
        )
        for layout, methods in results.items():
            for method, per_process in methods.items():
                runs = zip(*(r['runs'] for r in per_process.values()), strict=True)
                pair = [sum(x['disk_read_bytes'] for x in run) / mib for run in runs]
                cells = ', '.join(f'{x:.1f}' for x in pair)
                print(f'  {layout:10s} {NAMES[method]:34s} {cells}')
    print('\nTargets for (a), per process (worst run for bytes, medians and best runs for wall):')
    for layout, per_process in targets.items():
        checks = [
            ('read', f'bytes read / own shard bytes <= {TARGETS["read"]}'),
            ('wall', f'wall / cat floor, medians    <= {TARGETS["wall"]}'),
            ('wall_best', f'wall / cat floor, best runs  <= {TARGETS["wall"]}'),
        ]
        for name, text in checks:
            cells = [
                f'proc {pid}: {t[name]:6.3f} {"ok" if t["met"][name] else "MISSED"}'
                for pid, t in per_process.items()
            ]
            print(f'  {layout:10s} {text}   ' + '   '.join(cells))
        if all('wall_over_pread' in t for t in per_process.values()):
            cells = [f'proc {pid}: {t["wall_over_pread"]:6.3f}' for pid, t in per_process.items()]
            print(f'  {layout:10s} wall / pread floor, medians  (no target) ' + '   '.join(cells))
    print("\nWhere (a)'s time goes, per process (medians):")
    for layout, methods in results.items():
        for pid, r in methods.get('surgery', {}).items():
            reads = statistics.median(x['read_thread_s'] for x in r['runs'])
            print(
                f'  {layout:10s} proc {pid}: wall {r["wall_s_median"]:.3f} s, CPU '
                f'{r["cpu_s_median"]:.3f} s, of which reading {reads:.3f} s (CPU of its reader '
                'threads); the rest transposes, places blocks on devices, plans'
            )
    runs = [r for m in results.values() for p in m.values() for q in p.values() for r in q['runs']]
    how = {r['rss_measured_as'] for r in runs}
    load = max(r['load_average_1m'] for r in runs)
    print(
        "\nread MiB: the method's own count ((a) SafetensorsCheckpoint.bytes_read, the bytes "
        "of the regions read; (b) Orbax's /jax/orbax/read/safetensors/bytes_read, coalesced "
        "blocks; (c), (c') every tensor's bytes, load_file reads them through a memory map; "
        'the pread floor, its buffers). rchar: bytes read()/pread() returned (a region '
        'gathered through a memory map is not in it). disk MiB: /proc/self/io read_bytes, '
        'fetched from the device (0 with a warm cache). RSS+: peak RSS over the RSS before '
        f'restoring ({", ".join(sorted(how))}); on CPU devices the restored arrays themselves '
        'count. (b) returns torch names and layouts (no transpose). (c) device_put of a host '
        'array to a sharding over both processes first checks it is equal on both (an '
        "all-gather); (c') make_array_from_callback does not. The pread floor reads each "
        "tensor's own rows into fresh memory and places nothing. Highest 1-minute load "
        f'average before a restore: {load:.2f} on {os.cpu_count()} CPUs (other work on the '
        'machine skews the times).'
    )


if __name__ == '__main__':
    main()
