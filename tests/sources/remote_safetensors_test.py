"""Safetensors over s3://, gs:// and http(s)://: ranged reads of just each shard's bytes."""

import contextlib
import http.server
import threading

import jax
import numpy as np
import object_stores
import pytest
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orbax_surgery as osurg
from orbax_surgery.huggingface.safetensors_file import write_file

W = np.arange(64 * 48, dtype=np.float32).reshape(64, 48)
B = np.arange(5, dtype=np.float32)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """A sharded checkpoint (two files and an index) and a single file, on local disk."""
    root = tmp_path_factory.mktemp('hf')
    (root / 'sharded').mkdir()
    osurg.save_safetensors({'w': W, 'b': B}, root / 'sharded' / 'out', max_shard_size=W.nbytes)
    write_file(root / 'single.safetensors', {'w': W, 'b': B})
    return root


def _upload(bucket, root):
    for file in root.rglob('*'):
        if file.is_file():
            (epath.Path(bucket) / str(file.relative_to(root))).write_bytes(file.read_bytes())


@pytest.fixture(params=['s3', 'gcs', 'http'])
def served(request, files):
    """Base URL under which `files` are served, and the TensorStore driver reading them."""
    if request.param == 'http':
        with object_stores.range_server(files) as url:
            yield url, 'http'
        return
    bucket = request.getfixturevalue(request.param)()
    _upload(bucket, files)
    yield bucket, request.param


@pytest.mark.parametrize(
    'where', ['sharded/out', 'sharded/out/model.safetensors.index.json', 'single.safetensors']
)
def test_restores_every_layout_with_exactly_each_shards_bytes(served, where, mesh8):
    base, driver = served
    target = {
        'w': jax.ShapeDtypeStruct(W.shape, W.dtype, sharding=NamedSharding(mesh8, P('x'))),
        'b': jax.ShapeDtypeStruct(B.shape, B.dtype),
    }
    source = osurg.SafetensorsCheckpoint(f'{base}/{where}')
    before = object_stores.bytes_requested(driver)[0]
    out = osurg.restore(source, target)
    requested = object_stores.bytes_requested(driver)[0] - before
    np.testing.assert_array_equal(out['w'], W)
    np.testing.assert_array_equal(out['b'], B)
    assert source.bytes_read == W.nbytes + B.nbytes
    assert requested == W.nbytes + B.nbytes  # Each byte once, none around it.


def test_a_column_slice_reads_its_runs_not_the_file(served):
    base, driver = served
    source = osurg.SafetensorsCheckpoint(f'{base}/single.safetensors')  # Reads the header.
    before = object_stores.bytes_requested(driver)
    out = osurg.restore(source, None, [osurg.Slice('w', np.s_[8:16, 4:12]), osurg.Drop('b')])
    after = object_stores.bytes_requested(driver)
    np.testing.assert_array_equal(out['w'], W[8:16, 4:12])
    assert after[0] - before[0] == 8 * 8 * 4  # 8 runs of 8 floats, nothing between them


def test_plan_and_inspect_read_headers_only(served):
    base, driver = served
    before = object_stores.bytes_requested(driver)[0]
    plan = osurg.plan_restore(f'{base}/sharded/out')
    assert plan.errors == () and {s.key for s in plan.steps} == {'w', 'b'}
    assert object_stores.bytes_requested(driver)[0] - before < 2048  # index and headers


def test_http_redirects_are_followed_and_errors_name_the_url(files):
    with object_stores.range_server(files) as url:
        out = osurg.restore(f'{url}/redirect/single.safetensors')
        np.testing.assert_array_equal(out['w'], W)
        with pytest.raises(
            osurg.SourceReadError, match=r'forbidden/single.safetensors refused access \(HTTP 403\)'
        ):
            osurg.restore(f'{url}/forbidden/single.safetensors')
        with pytest.raises(osurg.CheckpointNotFoundError, match=r'/nowhere: it holds neither'):
            osurg.restore(f'{url}/nowhere')


def test_a_url_with_credentials_never_shows_them(files):
    with object_stores.range_server(files) as url:
        for secret in (f'{url}/nowhere?token=s3cret', url.replace('//', '//user:s3cret@')):
            with pytest.raises(osurg.SurgeryError) as e:
                osurg.restore(secret)
            assert 's3cret' not in str(e.value), e.value


def test_a_truncated_remote_file_is_named(served, files, tmp_path):
    base, _ = served
    data = (files / 'single.safetensors').read_bytes()
    if base.startswith('http'):
        (files / 'cut.safetensors').write_bytes(data[:-100])
    else:
        scheme, name = base.split('://')
        (tmp_path / 'cut.safetensors').write_bytes(data[:-100])
        _upload(base, tmp_path)
    with pytest.raises(osurg.SourceReadError, match=r'cut.safetensors is truncated'):
        osurg.SafetensorsCheckpoint(f'{base}/cut.safetensors')


class _Refusing(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that refuses every request, as S3 does bad credentials."""

    def log_message(self, *args):
        return None

    def _refuse(self):
        body = b'<Error><Code>InvalidAccessKeyId</Code><Message>no such key</Message></Error>'
        self.send_response(403)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = _refuse


@contextlib.contextmanager
def refusing_s3():
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f'http://127.0.0.1:{server.server_address[1]}'
        with object_stores.environment(**object_stores.S3_ENV, AWS_ENDPOINT_URL=endpoint):
            yield
    finally:
        server.shutdown()
        server.server_close()


def test_bad_credentials_are_a_clear_error_naming_the_url():
    with refusing_s3(), pytest.raises(osurg.SourceReadError) as e:
        osurg.SafetensorsCheckpoint('s3://models/llama/model.safetensors')
    assert 's3://models/llama/model.safetensors' in str(e.value)
    assert 'refused' in str(e.value) and 'credentials' in str(e.value)
    assert 'testing' not in str(e.value)  # No part of a key in the message.
    with (
        refusing_s3(),
        pytest.raises(
            osurg.SourceReadError, match=r'Access to s3://ckpts/run/1/default was refused'
        ),
    ):
        osurg.restore('s3://ckpts/run/1/default')  # An Orbax item, or a safetensors directory
