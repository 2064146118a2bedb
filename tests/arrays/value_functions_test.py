import jax
import jax.numpy as jnp
import numpy as np
import pytest

import orbax_surgery as osurg
from orbax_surgery.arrays import value_functions
from orbax_surgery.arrays.expr import Source


@pytest.mark.parametrize(
    'kind, block, want_type',
    [
        ('jax.Array', np.ones(3, np.float32), jax.Array),
        ('np.ndarray', np.ones(3), np.ndarray),
        ('scalar', np.asarray(5), int),
        ('scalar', np.ones(2), np.ndarray),
    ],
    ids=['jax', 'numpy', 'scalar', 'scalar-shaped'],
)
def test_inputs_arrive_as_a_plain_orbax_restore_returns_them(kind, block, want_type):
    value = value_functions.as_input(block, kind)
    assert isinstance(value, want_type)
    if isinstance(value, jax.Array):
        assert value.devices() == {jax.local_devices(backend='cpu')[0]}


def test_predict_keeps_64_bit_numpy_dtypes():
    wide = jax.ShapeDtypeStruct((3,), np.float64)
    assert value_functions.predict(lambda x: x * 2, wide).dtype == np.float64
    assert (
        value_functions.predict(lambda x: x.sum(), jax.ShapeDtypeStruct((3,), np.int64)).dtype
        == np.int64
    )
    assert value_functions.predict(
        jnp.tanh, jax.ShapeDtypeStruct((2, 2), np.float32)
    ) == jax.ShapeDtypeStruct((2, 2), np.float32)


def test_predict_raises_what_tracing_raised_for_untraceable_functions():
    with pytest.raises(jax.errors.TracerArrayConversionError):
        value_functions.predict(lambda x: np.asarray(x), jax.ShapeDtypeStruct((2,), np.float32))
    with pytest.raises(TypeError, match='not one array'):
        value_functions.predict(lambda x: (x, x), jax.ShapeDtypeStruct((2,), np.float32))


def test_elementwise_node_applies_per_block_and_checks_shape():
    src = Source('w', (4,), np.dtype(np.float64), stored_kind='np.ndarray')
    node = value_functions.Elementwise(lambda x: x + 1, (src,), np.dtype(np.float64), 'plus_one')
    np.testing.assert_array_equal(node.eager({'w': np.arange(4.0)}), np.arange(1.0, 5.0))
    assert node.lazy and node.kind == 'np.ndarray' and node.describe() == 'plus_one(w)'


@pytest.mark.parametrize('elementwise', [False, True], ids=['whole', 'elementwise'])
def test_a_failing_value_function_is_a_rule_error_naming_function_key_and_target(elementwise):
    def broken(x):
        raise ZeroDivisionError('no')

    out = jax.ShapeDtypeStruct((0, 4), np.int8)  # Even an empty block runs the function.
    rule = osurg.MapValue('w', broken, elementwise=elementwise, out=out)
    with pytest.raises(
        osurg.RuleError, match=r"broken raised ZeroDivisionError: no \(computing 'broken\(w\)'\)"
    ) as info:
        osurg.apply_rules({'w': np.zeros((0, 4), np.int8)}, {'w': ...}, [rule])
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert "while computing target 'w'" in info.value.__notes__
