import os
import tempfile

import jax

jax.config.update('jax_num_cpu_devices', 8)

import pytest  # noqa: E402


@pytest.fixture(scope='session', autouse=True)
def temporary_files_under_pytest(tmp_path_factory):
    """`tempfile.mkdtemp()` in doctests, README examples and worker processes lands under
    pytest's base directory, which pytest prunes (it keeps the last three runs), instead of
    piling up in /tmp run after run."""
    where = str(tmp_path_factory.mktemp('tempfile'))
    before = os.environ.get('TMPDIR')
    os.environ['TMPDIR'] = where  # For subprocesses.
    tempfile.tempdir = where  # For this process: gettempdir() has cached /tmp already.
    yield
    tempfile.tempdir = None
    if before is None:
        os.environ.pop('TMPDIR', None)
    else:
        os.environ['TMPDIR'] = before


@pytest.fixture
def mesh8():
    return jax.make_mesh((8,), ('x',))


@pytest.fixture
def mesh2x4():
    return jax.make_mesh((2, 4), ('a', 'b'))


@pytest.fixture(scope='session')
def s3():
    """moto's S3 server on 127.0.0.1 for the session; yields a fresh-bucket maker."""
    import object_stores

    with object_stores.s3_server():
        yield object_stores.BucketMaker('s3')


@pytest.fixture(scope='session')
def gcs():
    """fake-gcs-server on 127.0.0.1 for the session; yields a fresh-bucket maker."""
    import object_stores

    with object_stores.gcs_server():
        yield object_stores.BucketMaker('gs')
