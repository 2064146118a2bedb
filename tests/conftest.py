import jax

jax.config.update('jax_num_cpu_devices', 8)

import pytest  # noqa: E402


@pytest.fixture
def mesh8():
    return jax.make_mesh((8,), ('x',))


@pytest.fixture
def mesh2x4():
    return jax.make_mesh((2, 4), ('a', 'b'))
