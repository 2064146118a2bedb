"""Convert a ~2 GB Llama safetensors checkpoint into a scanned MaxText checkpoint, in 2 processes.

The source is Llama-shaped, as transformers saves it: `model.embed_tokens.weight`,
L layers of `self_attn.{q,k,v,o}_proj.weight` (grouped-query: k and v have
--kv-heads heads), `mlp.{gate,up,down}_proj.weight`, two RMSNorm weights,
`model.norm.weight` and an untied `lm_head.weight`, as random float32 bits
(incompressible), in --files safetensors files with a `model.safetensors.index.json`
and a Llama `config.json`. The parent writes it once into --dir and reuses it
in later invocations with the same sizes.

The destination is MaxText 0.2.5's scanned layout (see README, "MaxText's
layout"): `params/params/token_embedder/embedding`, `decoder/decoder_norm/scale`,
`decoder/logits_dense/kernel` (E, V), and `decoder/layers/...` with the layer
axis second: query (E, L, H, D) with the 1/sqrt(D) attention scale folded in,
key and value (E, L, K, D), out (H, L, D, E), wi_0, wi_1 (E, L, F), wo (F, L, E),
two norm scales (E, L), saved as step 0, item 'items', as MaxText's own scripts
write it (`CheckpointManager(dst, item_names=('items',))`, `Composite(items=...)`).
Every parameter is sharded over all 8 devices along its largest axis that 8 divides
(replicated where none does).

Each method runs in 2 fresh processes joined by `jax.distributed` (gloo on
loopback), 4 fake CPU devices each, in the same run:

  (a) orbax-surgery: `huggingface.preset(hf_dir, to='maxtext', layers='stacked')` and
      `SurgerySave(item=SafetensorsCheckpoint(hf_dir), rules=preset.import_rules,
      target=<preset.target, sharded>)`: lazy, each process reads only what its
      shards need, a few blocks at a time,
  (b) the usual path, as MaxText's conversion scripts take it: each process loads the
      whole state dict (`safetensors.numpy.load_file` of every file), builds the full
      MaxText tree on the host with NumPy (transpose, reshape to heads, query times
      1/sqrt(D) in float32, layers stacked on axis 1), places it with
      `jax.make_array_from_callback` and saves it with `ocp.args.StandardSave`.

Each process reports its wall time of the conversion (load, transform and save,
until the save has finished; writing the source is not timed), its peak RSS over
its RSS just before converting, the bytes its method read (`SafetensorsCheckpoint.
bytes_read`; for (b) every tensor `load_file` returned), its /proc/self/io `rchar`
and `read_bytes` deltas, and the bytes its own shards hold. After the runs a
fresh process restores both last checkpoints with plain Orbax, leaf by leaf, and
checks that they hold the same keys, shapes and bits. The page cache is warm (one
untimed `cat` of the source first). The last line of output is one JSON object
with all figures.

    python benchmarks/maxtext_convert.py   # L=8, d=2048, ffn 5632, V 32000, 16/8 heads (1.9 GiB)
    python benchmarks/maxtext_convert.py --layers 2 --d 256 --ffn 512 --vocab 1024 \\
        --heads 4 --kv-heads 2 --runs 1
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
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
    worker_env,
)

METHODS = ('surgery', 'numpy')
PROCESSES, DEVICES = 2, 4
TIMEOUT_S = 3600
ITEM = 'items'
NAMES = {
    'surgery': '(a) preset + SurgerySave (lazy)',
    'numpy': '(b) load_file + NumPy + StandardSave',
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--layers', type=int, default=8, help='decoder layers L')
    parser.add_argument('--d', type=int, default=2048, help='hidden size E')
    parser.add_argument('--ffn', type=int, default=5632, help='MLP size F')
    parser.add_argument('--vocab', type=int, default=32000, help='vocabulary V')
    parser.add_argument('--heads', type=int, default=16, help='attention heads H')
    parser.add_argument('--kv-heads', type=int, default=8, help='key/value heads K')
    parser.add_argument('--files', type=int, default=4, help='safetensors files (about)')
    parser.add_argument('--runs', type=int, default=3, help='fresh process pairs per method')
    parser.add_argument('--dir', default='/tmp/orbax-surgery-bench/maxtext_convert')
    parser.add_argument('--keep', action='store_true', help='keep the converted checkpoints')
    parser.add_argument(
        '--max-inflight-mib', type=int, default=None, help="SurgerySave's in-flight budget"
    )
    parser.add_argument('--only', choices=METHODS, help='run one method (for experiments)')
    parser.add_argument('--worker', choices=[*METHODS, 'check'], help=argparse.SUPPRESS)
    parser.add_argument('--src', help=argparse.SUPPRESS)
    parser.add_argument('--dst', help=argparse.SUPPRESS)
    parser.add_argument('--port', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--process-id', type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.d % args.heads or args.heads % args.kv_heads:
        parser.error('--heads must divide --d, and --kv-heads must divide --heads')
    if args.worker == 'check':
        print(json.dumps(_check(args.dst.split(os.pathsep))))
        return
    if args.worker:
        result = _convert(
            args.worker, args.src, args.dst, args.port, args.process_id, args.max_inflight_mib
        )
        print(json.dumps(result))
        return

    tensors = _tensors(args)
    raw = sum(4 * math.prod(shape) for shape in tensors.values())
    name = f'L{args.layers}_d{args.d}_f{args.ffn}_v{args.vocab}_h{args.heads}_k{args.kv_heads}'
    src = Path(args.dir) / f'hf_{name}'
    out = Path(args.dir) / f'out_{name}'
    if not (src / INDEX).exists():
        shutil.rmtree(src, ignore_errors=True)
        print(f'Writing {raw / 2**30:.3f} GiB of safetensors to {src} ...', flush=True)
        _write(src, tensors, args)
    else:
        print(f'Reusing {src}', flush=True)
    files = sorted(src.glob('*.safetensors'))
    stored = {f.name: f.stat().st_size for f in files}
    subprocess.run(['cat', *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    results: dict[str, dict] = {}
    check, stored_out = None, {}
    try:
        for method in METHODS:
            if args.only and method != args.only:
                continue
            print(f'{method} x {args.runs} ...', flush=True)
            pairs = [_run_pair(args, method, src, out / method) for _ in range(args.runs)]
            results[method] = {
                str(pid): summarize([pair[pid] for pair in pairs], bytes_field='shard_bytes')
                for pid in range(PROCESSES)
            }
        if not args.only:
            print('checking (a) against (b) ...', flush=True)
            check = _run_check([out / m for m in METHODS])
            stored_out = {m: _tree_bytes(out / m) for m in METHODS}
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    if args.only:  # An experiment: the raw figures of one method, no comparison.
        print(json.dumps(results))
        return
    ratios = _ratios(results)
    _print_table(args, raw, stored, stored_out, check, results, ratios)
    print(
        json.dumps(
            {
                'benchmark': 'maxtext_convert',
                'layers': args.layers,
                'd': args.d,
                'ffn': args.ffn,
                'vocab': args.vocab,
                'heads': args.heads,
                'kv_heads': args.kv_heads,
                'checkpoint_bytes': raw,
                'source_files': stored,
                'converted_bytes': stored_out,
                'page_cache': 'warm',
                'processes': PROCESSES,
                'devices_per_process': DEVICES,
                'runs': args.runs,
                'check': check,
                'ratios': ratios,
                'results': results,
            }
        )
    )


def _tensors(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    """Tensor name -> torch shape, in the order transformers saves a Llama."""
    d, ffn, head_dim = args.d, args.ffn, args.d // args.heads
    q, kv = args.heads * head_dim, args.kv_heads * head_dim
    out = {'model.embed_tokens.weight': (args.vocab, d)}
    for i in range(args.layers):
        at = f'model.layers.{i}.'
        out[f'{at}self_attn.q_proj.weight'] = (q, d)
        out[f'{at}self_attn.k_proj.weight'] = (kv, d)
        out[f'{at}self_attn.v_proj.weight'] = (kv, d)
        out[f'{at}self_attn.o_proj.weight'] = (d, q)
        out[f'{at}mlp.gate_proj.weight'] = (ffn, d)
        out[f'{at}mlp.up_proj.weight'] = (ffn, d)
        out[f'{at}mlp.down_proj.weight'] = (d, ffn)
        out[f'{at}input_layernorm.weight'] = (d,)
        out[f'{at}post_attention_layernorm.weight'] = (d,)
    out['model.norm.weight'] = (d,)
    out['lm_head.weight'] = (args.vocab, d)
    return out


def _write(root: Path, tensors: dict, args: argparse.Namespace) -> None:
    """The safetensors files in tensor order, about `args.files` of them, config.json, the index."""
    root.mkdir(parents=True, exist_ok=True)
    config = {
        'architectures': ['LlamaForCausalLM'],
        'model_type': 'llama',
        'vocab_size': args.vocab,
        'hidden_size': args.d,
        'intermediate_size': args.ffn,
        'num_hidden_layers': args.layers,
        'num_attention_heads': args.heads,
        'num_key_value_heads': args.kv_heads,
        'head_dim': args.d // args.heads,
        'hidden_act': 'silu',
        'max_position_embeddings': 4096,
        'rope_theta': 10000.0,
        'rms_norm_eps': 1e-5,
        'tie_word_embeddings': False,
        'torch_dtype': 'float32',
    }
    (root / 'config.json').write_text(json.dumps(config, indent=2))
    total = sum(4 * math.prod(shape) for shape in tensors.values())
    write_sharded_safetensors(root, tensors, math.ceil(total / args.files))  # The index last.


def _run_pair(args: argparse.Namespace, method: str, src: Path, dst: Path) -> list[dict]:
    """Runs `method` in PROCESSES fresh processes of one jax.distributed job, into a fresh `dst`."""
    shutil.rmtree(dst, ignore_errors=True)
    port = free_port()
    cmd = [sys.executable, __file__, '--worker', method, '--src', str(src), '--dst', str(dst)]
    cmd += ['--port', str(port)]
    if args.max_inflight_mib is not None:
        cmd += ['--max-inflight-mib', str(args.max_inflight_mib)]
    return run_processes(cmd, PROCESSES, method, TIMEOUT_S)


def _run_check(dsts: list[Path]) -> dict:
    cmd = [sys.executable, __file__, '--worker', 'check', '--dst', os.pathsep.join(map(str, dsts))]
    out = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(), timeout=TIMEOUT_S)
    if out.returncode:
        sys.exit(f'checking failed:\n{(out.stdout + out.stderr)[-6000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob('*') if f.is_file())


def _flat(tree: dict, prefix: str = '') -> dict[str, object]:
    """A nested dict's leaves by '/'-joined key."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f'{prefix}{key}/'))
        else:
            out[prefix + key] = value
    return out


def _nest(flat: dict[str, object]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split('/')
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _spec(shape: tuple[int, ...]) -> tuple:
    """Shards the largest axis that the job's devices divide (the first of equals); else none."""
    n = PROCESSES * DEVICES
    axes = [a for a, size in enumerate(shape) if size % n == 0]
    if not axes:
        return ()
    axis = max(axes, key=lambda a: (shape[a], -a))
    return tuple('x' if a == axis else None for a in range(len(shape)))


def _maxtext_tree(state: dict, config: dict) -> dict:
    """MaxText's scanned parameter tree from a Llama state dict, in NumPy on the host.

    As MaxText's conversion scripts do it: torch (out, in) weights transposed to
    (in, out) kernels, attention kernels reshaped to heads, the query scaled by
    1/sqrt(D) in float32, each layer's leaves stacked on axis 1.
    """
    import numpy as np

    e, h, k = config['hidden_size'], config['num_attention_heads'], config['num_key_value_heads']
    hd = config.get('head_dim') or e // h
    scale = np.float32(1 / math.sqrt(hd))

    def stacked(name: str, convert) -> np.ndarray:
        per_layer = [
            convert(state[f'model.layers.{i}.{name}.weight'])
            for i in range(config['num_hidden_layers'])
        ]
        return np.stack(per_layer, axis=1)

    layers = {
        'pre_self_attention_layer_norm': {'scale': stacked('input_layernorm', lambda w: w)},
        'post_self_attention_layer_norm': {
            'scale': stacked('post_attention_layernorm', lambda w: w)
        },
        'self_attention': {
            'query': {
                'kernel': stacked('self_attn.q_proj', lambda w: w.T.reshape(e, h, hd) * scale)
            },
            'key': {'kernel': stacked('self_attn.k_proj', lambda w: w.T.reshape(e, k, hd))},
            'value': {'kernel': stacked('self_attn.v_proj', lambda w: w.T.reshape(e, k, hd))},
            'out': {'kernel': stacked('self_attn.o_proj', lambda w: w.T.reshape(h, hd, e))},
        },
        'mlp': {
            'wi_0': {'kernel': stacked('mlp.gate_proj', lambda w: w.T)},
            'wi_1': {'kernel': stacked('mlp.up_proj', lambda w: w.T)},
            'wo': {'kernel': stacked('mlp.down_proj', lambda w: w.T)},
        },
    }
    decoder = {
        'decoder_norm': {'scale': state['model.norm.weight']},
        'logits_dense': {'kernel': state['lm_head.weight'].T},
        'layers': layers,
    }
    embedder = {'embedding': state['model.embed_tokens.weight']}
    return {'params': {'params': {'token_embedder': embedder, 'decoder': decoder}}}


def _convert(
    method: str, src: str, dst: str, port: int, pid: int, max_inflight_mib: int | None
) -> dict:
    import jax

    mesh = join_job(port, pid, PROCESSES, DEVICES)

    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from safetensors.numpy import load_file

    import orbax_surgery as osurg

    def sharding(shape: tuple[int, ...]) -> NamedSharding:
        return NamedSharding(mesh, P(*_spec(shape)))

    def placed(leaf: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding(leaf.shape))

    multihost_utils.sync_global_devices('convert')
    gc.collect()
    peak = PeakRss()
    io = io_counters()
    cpu = time.process_time()
    start = time.perf_counter()
    if method == 'surgery':
        preset = osurg.huggingface.preset(src, to='maxtext', layers='stacked')
        target = jax.tree.map(placed, preset.target)
        source = osurg.SafetensorsCheckpoint(src)
        budget = {} if max_inflight_mib is None else {'max_inflight_bytes': max_inflight_mib << 20}
        item = osurg.SurgerySave(item=source, rules=preset.import_rules, target=target, **budget)
    else:
        config = json.loads((Path(src) / 'config.json').read_text())
        weight_map = json.loads((Path(src) / INDEX).read_text())['weight_map']
        state = {}
        for file in sorted(set(weight_map.values())):
            state.update(load_file(Path(src) / file))
        loaded = sum(v.nbytes for v in state.values())
        tree = _flat(_maxtext_tree(state, config))
        del state
        arrays = {
            key: jax.make_array_from_callback(
                value.shape, sharding(value.shape), lambda i, v=value: v[i]
            )
            for key, value in tree.items()
        }
        del tree
        target = _nest(arrays)
        item = ocp.args.StandardSave(target)
    manager = ocp.CheckpointManager(dst, item_names=(ITEM,))
    manager.save(0, args=ocp.args.Composite(**{ITEM: item}))
    manager.wait_until_finished()
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu
    over = peak.stop()
    after = io_counters()
    manager.close()
    read = source.bytes_read if method == 'surgery' else loaded
    own = shard_bytes(_flat(target))
    multihost_utils.sync_global_devices('converted')
    return {
        'process': pid,
        'method': method,
        'wall_s': round(wall, 3),
        'cpu_s': round(cpu, 3),
        'peak_rss_over_baseline': over,
        'baseline_rss': peak.baseline,
        'rss_measured_as': peak.how,
        'load_average_1m': round(os.getloadavg()[0], 2),
        'bytes_read': read,
        'rchar': after['rchar'] - io['rchar'],
        'disk_read_bytes': after['read_bytes'] - io['read_bytes'],
        'wchar': after['wchar'] - io['wchar'],
        'shard_bytes': own,
    }


def _check(dsts: list[str]) -> dict:
    """Restores every leaf of both checkpoints with plain Orbax, one at a time; same keys, bits."""
    import numpy as np
    import orbax.checkpoint as ocp

    def tree_of(dst: str) -> dict:
        meta = ocp.PyTreeCheckpointer().metadata(Path(dst) / '0' / ITEM)
        tree = getattr(meta, 'item_metadata', meta)
        tree = getattr(tree, 'tree', tree)
        return {k: (tuple(v.shape), str(v.dtype)) for k, v in _flat(dict(tree)).items()}

    def leaf(dst: str, key: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        item = _nest({key: np.zeros((), dtype)})  # Structure only: restore_args say what.
        restore_args = _nest({key: ocp.RestoreArgs(restore_type=np.ndarray)})
        with ocp.PyTreeCheckpointer() as ckptr:
            out = ckptr.restore(
                Path(dst) / '0' / ITEM,
                args=ocp.args.PyTreeRestore(
                    item=item, restore_args=restore_args, partial_restore=True
                ),
            )
        assert list(_flat(out)) == [key], list(_flat(out))  # Only this leaf was read.
        value = _flat(out)[key]
        assert value.shape == shape and str(value.dtype) == dtype, (key, value.shape, value.dtype)
        return value

    surgery, numpy_ = dsts
    keys = tree_of(surgery)
    assert keys == tree_of(numpy_), (keys, tree_of(numpy_))
    tiny = np.finfo(np.float32).tiny
    checked, flushed = {}, {}
    for key, (shape, dtype) in keys.items():
        a = leaf(surgery, key, shape, dtype)
        b = leaf(numpy_, key, shape, dtype)
        assert a.dtype == np.float32, (key, a.dtype)
        a_bits, b_bits = a.view(np.uint32), b.view(np.uint32)
        differ = a_bits != b_bits
        # The one difference allowed: (b) keeps a subnormal that (a) flushed to zero, sign kept.
        subnormal = (b != 0) & (np.abs(b) < tiny)
        sign = b_bits & np.uint32(1 << 31)
        allowed = subnormal & (a_bits == sign)
        np.testing.assert_array_equal(differ & ~allowed, False, err_msg=key)
        checked[key] = list(shape)
        if differ.any():
            flushed[key] = int(differ.sum())
        del a, b, a_bits, b_bits, differ, subnormal, sign, allowed
    return {
        'leaves': len(checked),
        'values': sum(math.prod(s) for s in checked.values()),
        'subnormals_flushed_by_a': flushed,
        'shapes': checked,
    }


def _ratios(results: dict) -> dict:
    """Per process: each method's read and RSS over its shard bytes, wall over (b)'s."""
    out = {}
    for pid in map(str, range(PROCESSES)):
        usual = results['numpy'][pid]
        out[pid] = {}
        for method, per_process in results.items():
            r = per_process[pid]
            out[pid][method] = {
                'read': round(r['bytes_read_max'] / r['shard_bytes'], 3),
                'rchar': round(max(x['rchar'] for x in r['runs']) / r['shard_bytes'], 3),
                'rss': round(r['peak_rss_over_baseline_max'] / r['shard_bytes'], 3),
                'wall_over_b': round(r['wall_s_median'] / usual['wall_s_median'], 3),
                'wall_best_over_b': round(r['wall_s_best'] / usual['wall_s_best'], 3),
            }
    return out


def _print_table(
    args: argparse.Namespace,
    raw: int,
    stored: dict,
    stored_out: dict,
    check: dict,
    results: dict,
    ratios: dict,
) -> None:
    mib = 2**20
    print(
        f'\nLlama-shaped checkpoint: {args.layers} layers, d={args.d}, ffn {args.ffn}, vocab '
        f'{args.vocab}, {args.heads} heads, {args.kv_heads} kv heads, {raw / 2**30:.3f} GiB '
        f'float32 in {len(stored)} safetensors files '
        f'({", ".join(f"{b / mib:.0f}" for b in stored.values())} MiB), page cache warm. '
        f'Converted to scanned MaxText by {PROCESSES} processes x {DEVICES} CPU devices, each '
        f'parameter sharded over all {PROCESSES * DEVICES} on its largest divisible axis; '
        f'{args.runs} fresh process pairs per method. Written: '
        + ', '.join(f'{NAMES[m][:3]} {b / mib:.1f} MiB' for m, b in stored_out.items())
        + '.'
    )
    header = (
        f'{"method":38s} {"proc":>4s} {"wall s median":>13s} {"best":>7s} {"CPU s":>6s} '
        f'{"peak RSS over base MiB":>22s} {"read MiB":>9s} {"rchar MiB":>9s} {"disk MiB":>8s} '
        f'{"shards MiB":>10s} {"read/shards":>11s} {"RSS/shards":>10s}'
    )
    print()
    print(header)
    print('-' * len(header))
    for method, per_process in results.items():
        for pid, r in per_process.items():
            label = NAMES[method] if pid == '0' else ''
            rchar = max(x['rchar'] for x in r['runs'])
            disk = max(x['disk_read_bytes'] for x in r['runs'])
            print(
                f'{label:38s} {pid:>4s} {r["wall_s_median"]:13.3f} {r["wall_s_best"]:7.3f} '
                f'{r["cpu_s_median"]:6.2f} {r["peak_rss_over_baseline_max"] / mib:22.1f} '
                f'{r["bytes_read_max"] / mib:9.1f} {rchar / mib:9.1f} {disk / mib:8.1f} '
                f'{r["shard_bytes"] / mib:10.1f} '
                f'{r["bytes_read_max"] / r["shard_bytes"]:11.3f} '
                f'{r["peak_rss_over_baseline_max"] / r["shard_bytes"]:10.3f}'
            )
    print('\nWall time of (a) over (b), per process (medians; best runs):')
    cells = [
        f'proc {pid}: {t["surgery"]["wall_over_b"]:6.3f}; {t["surgery"]["wall_best_over_b"]:6.3f}'
        for pid, t in ratios.items()
    ]
    print('  ' + '   '.join(cells))
    flushed = check['subnormals_flushed_by_a']
    print(
        f'\nCheck: (a) and (b), restored with plain Orbax leaf by leaf, hold the same '
        f'{check["leaves"]} keys and shapes, and the same float32 bits in all '
        f'{check["values"]} values'
        + (
            '.'
            if not flushed
            else ' but '
            + ', '.join(f'{n} of {k.split("/decoder/")[-1]}' for k, n in flushed.items())
            + ", which (b) holds as subnormals and (a) as zeros of the same sign (SurgerySave's "
            "query scale gets a jax.Array, so XLA's CPU flush-to-zero applies; NumPy keeps "
            'subnormals; random bits hold many, trained weights few).'
        )
    )
    runs = [r for m in results.values() for p in m.values() for r in p['runs']]
    how = {r['rss_measured_as'] for r in runs}
    load = max(r['load_average_1m'] for r in runs)
    print(
        "\nread MiB: the method's own count ((a) SafetensorsCheckpoint.bytes_read, the bytes of "
        'the regions its shards need; (b) every tensor load_file returned). rchar: bytes '
        'read()/pread() returned (load_file reads through a memory map, which rchar does not '
        'see). disk MiB: /proc/self/io read_bytes, fetched from the device (0 with a warm '
        'cache). Peak RSS over the RSS before converting: '
        f'{", ".join(sorted(how))}; on CPU devices the placed arrays themselves count. Wall '
        'time: from the start of the conversion until the save has finished (both write the '
        'same bytes). Highest 1-minute load average after a conversion: '
        f'{load:.2f} on {os.cpu_count()} CPUs (other work on the machine skews the times).'
    )


if __name__ == '__main__':
    main()
