import jax

jax.config.update('jax_num_cpu_devices', 8)

import pytest  # noqa: E402


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
