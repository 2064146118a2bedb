import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
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
    with pytest.raises(osurg.SurgeryError, match=r"Target leaf 'name' is a set; use a jax"):
        read_target({'name': {'llama'}})


def test_strings_metadata_and_dont_care_leaves():
    meta = ocp.metadata.ArrayMetadata(
        name='w', directory=None, shape=(2, 3), sharding=None, dtype=np.dtype(np.float16)
    )
    leaves, _ = read_target(
        {'name': 'llama', 'any': object(), 'placeholder': ocp.PLACEHOLDER, 'w': meta}
    )
    assert (leaves['name'].dtype, leaves['name'].kind, leaves['name'].value) == (
        np.dtype(object),
        'scalar',
        'llama',
    )
    assert leaves['any'].inferred and leaves['placeholder'].inferred
    assert (leaves['w'].shape, leaves['w'].dtype, leaves['w'].kind) == (
        (2, 3),
        np.float16,
        'np.ndarray',
    )


def test_empty_nodes_are_kept_as_they_are():
    from flax import traverse_util

    target = {'w': ..., 'opt': traverse_util.empty_node, 'none': None, 'empty': ()}
    out = osurg.apply_rules({'w': np.ones(2)}, target)
    assert isinstance(out['opt'], type(traverse_util.empty_node))
    assert out['none'] is None and out['empty'] == ()


def test_a_prng_key_target_is_its_key_data_with_its_implementation():
    leaves, _ = read_target({'rng': jax.eval_shape(lambda: jax.random.key(0, impl='rbg'))})
    assert (leaves['rng'].shape, leaves['rng'].dtype, leaves['rng'].key_impl) == (
        (4,),
        np.uint32,
        'rbg',
    )
    concrete, _ = read_target({'rng': jax.random.key(3)})
    np.testing.assert_array_equal(concrete['rng'].value, jax.random.key_data(jax.random.key(3)))


def test_a_sharding_that_does_not_divide_the_shape_names_the_key(mesh2x4):
    bad = jax.ShapeDtypeStruct((64, 10), np.float32, sharding=NamedSharding(mesh2x4, P('a', 'b')))
    with pytest.raises(osurg.ShapeMismatchError, match=r"'head/kernel' of shape .*axis 1"):
        read_target({'head': {'kernel': bad}})
