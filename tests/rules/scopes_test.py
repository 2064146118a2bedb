import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import orbax_surgery as osurg


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.proj = nnx.Linear(4, 4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)


class Renamed(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(4, 4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)


def test_rules_without_the_value_suffix_restore_an_nnx_state_with_its_rng_keys(tmp_path):
    model = Block(nnx.Rngs(0, dropout=7))
    with ocp.CheckpointManager(tmp_path / 'run') as manager:
        manager.save(1, args=ocp.args.StandardSave(nnx.state(model)))
        manager.wait_until_finished()
    abstract = nnx.state(nnx.eval_shape(lambda: Renamed(nnx.Rngs(0, dropout=1))))
    rules = osurg.Unsuffixed([osurg.Rename(r'proj/(.*)', r'dense/\1')])
    with ocp.CheckpointManager(tmp_path / 'run') as manager:
        state = manager.restore(1, args=osurg.SurgeryRestore(target=abstract, rules=rules))
    np.testing.assert_array_equal(
        state['dense']['kernel'].get_value(), model.proj.kernel.get_value()
    )
    key = state['drop']['rngs']['key'].get_value()
    assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(
        jax.random.key_data(key), jax.random.key_data(model.drop.rngs.key.get_value())
    )
    restored = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Renamed(nnx.Rngs(0)))), state)
    np.testing.assert_allclose(restored.dense(np.ones((1, 4))), model.proj(np.ones((1, 4))))


def test_without_a_target_the_suffix_comes_back_where_the_checkpoint_had_it():
    tree = {'a': {'value': np.ones(2)}, 'count': np.int32(1)}
    out = osurg.apply_rules(tree, None, [osurg.Unsuffixed([osurg.Rename('a', 'b')])])
    assert set(out) == {'b', 'count'} and set(out['b']) == {'value'}


def test_keys_that_meet_without_the_suffix_are_ambiguous():
    tree = {'a': {'value': np.ones(2)}, 'a_': np.ones(1)}
    rule = osurg.Unsuffixed([osurg.Rename('a_', 'a')])
    with pytest.raises(osurg.AmbiguousRuleError):
        osurg.apply_rules(tree, None, [rule])
    with pytest.raises(osurg.AmbiguousRuleError, match=r"both 'x' and 'x/value'"):
        osurg.apply_rules({'x': np.ones(1), 'x/value': np.ones(1)}, None, [osurg.Unsuffixed([])])


def test_a_typed_key_in_a_live_tree_is_read_as_key_data():
    tree = {'rng': jax.random.key(5, impl='rbg'), 'w': np.ones(2)}
    out = osurg.apply_rules(tree, None, [osurg.Rename('rng', 'key')])
    assert jax.random.key_impl(out['key']) == jax.random.key_impl(tree['rng'])
    np.testing.assert_array_equal(jax.random.key_data(out['key']), jax.random.key_data(tree['rng']))
