"""Joins a worker process to the multi-process JAX job that the `launch` fixture started."""

import dataclasses
import sys

import jax


@dataclasses.dataclass(frozen=True)
class Job:
    """This process's place in the job, and the arguments after the launcher's five."""

    process: int
    count: int
    workdir: str
    args: tuple[str, ...]


def join(**initialize: object) -> Job:
    """Reads `PORT COUNT PROCESS DEVICES WORKDIR [ARGS...]` and joins the job on 127.0.0.1.

    Call it before any JAX computation: it sets the CPU device count and gloo
    collectives, then runs `jax.distributed.initialize` (with `initialize`'s options).
    """
    port, count, process, devices, workdir, *args = sys.argv[1:]
    jax.config.update('jax_num_cpu_devices', int(devices))
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
        f'127.0.0.1:{port}', num_processes=int(count), process_id=int(process), **initialize
    )
    return Job(int(process), int(count), workdir, tuple(args))


def file_bytes_read() -> int:
    """Bytes TensorStore has read from local files in this process so far."""
    import tensorstore as ts

    metrics = ts.experimental_collect_matching_metrics('/tensorstore/kvstore/file/bytes_read')
    return sum(v['value'] for m in metrics for v in m['values'])
