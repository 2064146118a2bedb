"""Launches several JAX processes on this machine, joined by jax.distributed."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT_S = 300

# Worker scripts run in their own processes; importing them here would start one.
collect_ignore_glob = ['*_worker.py']


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture
def launch(tmp_path):
    """Runs `script` in `n` processes; returns each one's last JSON line."""

    def run(script: Path, n: int = 2, devices: int = 4, *args: str) -> list[dict]:
        port = free_port()
        env = {
            **os.environ,
            'PYTHONPATH': os.pathsep.join(
                [str(Path(__file__).parents[2]), os.environ.get('PYTHONPATH', '')]
            ),
        }
        env.pop('XLA_FLAGS', None)
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(script),
                    str(port),
                    str(n),
                    str(i),
                    str(devices),
                    str(tmp_path),
                    *args,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )
            for i in range(n)
        ]
        outputs = []
        try:
            for p in procs:
                out, _ = p.communicate(timeout=TIMEOUT_S)
                outputs.append(out)
        finally:
            for p in procs:
                p.kill()
        for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
            assert p.returncode == 0, f'process {i} failed:\n{out[-6000:]}'
        return [json.loads(out.strip().splitlines()[-1]) for out in outputs]

    return run
