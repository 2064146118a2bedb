"""Measuring restores in fresh worker processes: environment, peak RSS, bytes read, summaries."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any


def worker_env(blas_threads: int | None = None) -> dict[str, str]:
    """The environment of a worker: this repository importable, no XLA_FLAGS.

    Args:
        blas_threads: If set, the worker's OPENBLAS/OMP/MKL_NUM_THREADS.
    """
    env = {
        **os.environ,
        'PYTHONPATH': os.pathsep.join(
            [str(Path(__file__).resolve().parents[1]), os.environ.get('PYTHONPATH', '')]
        ),
    }
    env.pop('XLA_FLAGS', None)
    if blas_threads is not None:
        for name in ('OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
            env[name] = str(blas_threads)
    return env


class PeakRss:
    """Peak RSS from now on: VmHWM reset through clear_refs, else a sampling thread."""

    def __init__(self):
        self.baseline = _status('VmRSS')
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')
            self.how = 'VmHWM after clear_refs'
            self._thread = None
        except OSError:
            self.how = 'VmRSS sampled every 2 ms'
            self._peak = self.baseline
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(0.002):
            self._peak = max(self._peak, _status('VmRSS'))

    def stop(self) -> int:
        """Peak RSS over the baseline, in bytes."""
        if self._thread is None:
            return _status('VmHWM') - self.baseline
        self._done.set()
        self._thread.join()
        return max(self._peak, _status('VmRSS')) - self.baseline


def _status(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def io_counters() -> dict[str, int]:
    """This process's /proc/self/io counters so far, by name.

    `rchar` counts the bytes read() and pread() returned, from the page cache or
    not, but not pages touched through a memory map; `read_bytes` counts the bytes
    fetched from the block device for this process, memory-map faults and
    readahead included (zero when the page cache holds the file).
    """
    with open('/proc/self/io') as f:
        return {name: int(value) for name, value in (line.split(': ') for line in f)}


def shard_bytes(flat: dict) -> int:
    """Bytes this process's devices hold of `flat`'s leaves, each distinct region once.

    Args:
        flat: Leaves with `shape`, `dtype` and `sharding` (e.g. `jax.ShapeDtypeStruct`).
    """
    total = 0
    for leaf in flat.values():
        regions = {
            tuple((s.start, s.stop) for s in index)
            for index in leaf.sharding.addressable_devices_indices_map(leaf.shape).values()
        }
        for region in regions:
            n = leaf.dtype.itemsize
            for (start, stop), dim in zip(region, leaf.shape, strict=True):
                n *= (dim if stop is None else stop) - (start or 0)
            total += n
    return total


def tensorstore_bytes_read() -> int:
    """Bytes TensorStore has read from local files in this process so far."""
    import tensorstore as ts

    metrics = ts.experimental_collect_matching_metrics('/tensorstore/kvstore/file/bytes_read')
    return sum(v['value'] for m in metrics for v in m['values'])


def summarize(runs: list[dict], *, bytes_field: str) -> dict:
    """One method's runs: median and best wall time, worst peak RSS and bytes read.

    Args:
        runs: One worker's result per run, with `wall_s`, `peak_rss_over_baseline`,
            `bytes_read` and, where the worker timed it, `cpu_s`.
        bytes_field: The field holding the bytes a run restores, the same in every run;
            copied from the first.
    """
    summary = {
        'wall_s_median': round(statistics.median(r['wall_s'] for r in runs), 3),
        'wall_s_best': min(r['wall_s'] for r in runs),
    }
    if 'cpu_s' in runs[0]:
        summary['cpu_s_median'] = round(statistics.median(r['cpu_s'] for r in runs), 3)
    summary['peak_rss_over_baseline_max'] = max(r['peak_rss_over_baseline'] for r in runs)
    summary['bytes_read_max'] = max(r['bytes_read'] for r in runs)
    summary[bytes_field] = runs[0][bytes_field]
    summary['runs'] = runs
    return summary


def free_port() -> int:
    """A free TCP port on the loopback address, for a jax.distributed coordinator."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_processes(cmd: list[str], processes: int, label: str, timeout_s: float) -> list[dict]:
    """Runs `cmd --process-id i` for each process at once; each one's last JSON line."""
    procs = [
        subprocess.Popen(
            [*cmd, '--process-id', str(pid)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=worker_env(),
        )
        for pid in range(processes)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout_s)[0])
    finally:
        for p in procs:
            p.kill()
    for pid, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        if p.returncode:
            sys.exit(f'{label}: process {pid} failed:\n{out[-6000:]}')
    return [json.loads(out.strip().splitlines()[-1]) for out in outputs]


def join_job(port: int, process_id: int, processes: int, devices: int) -> Any:
    """Joins a `jax.distributed` job on loopback (gloo, `devices` CPU devices here).

    Returns a one-axis mesh ('x',) over every device of the job, process by process.
    """
    import jax
    import numpy as np
    from jax.sharding import Mesh

    jax.config.update('jax_num_cpu_devices', devices)
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=processes, process_id=process_id)
    ordered = sorted(jax.devices(), key=lambda dev: (dev.process_index, dev.id))
    return Mesh(np.array(ordered), ('x',))
