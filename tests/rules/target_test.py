import flax
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orbax_surgery as osurg
from orbax_surgery.rules.target import read_target


@flax.struct.dataclass
class State:
    params: dict
    step: int


def test_each_kind_of_target_leaf(mesh8):
    sharding = NamedSharding(mesh8, P('x'))
    tree = State(
        params={
            'abstract': jax.ShapeDtypeStruct((8, 2), np.float32, sharding=sharding),
            'concrete': jax.device_put(np.ones((8,), np.float32), sharding),
            'host': np.zeros(3, np.int32),
            'inferred': ...,
        },
        step=3,
    )
    leaves, treedef = read_target(tree)
    assert list(leaves) == [
        'params/abstract',
        'params/concrete',
        'params/host',
        'params/inferred',
        'step',
    ]
    abstract, concrete, host, inferred, step = leaves.values()
    assert (abstract.shape, abstract.sharding, abstract.kind, abstract.has_value) == (
        (8, 2),
        sharding,
        'jax.Array',
        False,
    )
    assert concrete.has_value and concrete.sharding == sharding
    assert (host.kind, host.dtype, host.sharding) == ('np.ndarray', np.int32, None)
    assert inferred.inferred and inferred.kind is None
    assert (step.kind, step.dtype, step.value) == ('scalar', np.int64, 3)
    assert jax.tree_util.tree_structure(tree) == treedef


def test_unsupported_leaves_are_named():
    with pytest.raises(osurg.SurgeryError, match=r"Target leaf 'name' is a str"):
        read_target({'name': 'llama'})


def test_a_prng_key_target_is_a_clear_error():
    with pytest.raises(osurg.SurgeryError, match=r"'rng' is a PRNG key array \(key<fry>\)"):
        read_target({'rng': jax.eval_shape(lambda: jax.random.key(0))})


def test_a_sharding_that_does_not_divide_the_shape_names_the_key(mesh2x4):
    bad = jax.ShapeDtypeStruct((64, 10), np.float32, sharding=NamedSharding(mesh2x4, P('a', 'b')))
    with pytest.raises(osurg.ShapeMismatchError, match=r"'head/kernel' of shape .*axis 1"):
        read_target({'head': {'kernel': bad}})
