import re

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from orbax_surgery import keys
from orbax_surgery.errors import AmbiguousRuleError, RuleError


@flax.struct.dataclass
class State:
    params: dict
    step: int


@pytest.mark.parametrize(
    'tree',
    [
        {'a': 1, 'b': {'c': [2, 3], 'd': {'e': 4}}},
        State(params={'dense': {'kernel': 1}}, step=2),
        flax.core.freeze({'x': {'y': 1}}),
        [{'w': 1}, (2, 3)],
    ],
    ids=['nested-dict', 'struct-dataclass', 'frozen-dict', 'list-tuple'],
)
def test_flatten_names_keys_as_orbax_does(tree):
    flat, treedef = keys.flatten(tree)
    assert flat == ocp.tree.to_flat_dict(tree, sep='/')
    assert jax.tree_util.tree_structure(keys.unflatten(treedef, flat, flat)) == treedef


def test_flatten_rejects_keys_that_collide_once_joined():
    with pytest.raises(AmbiguousRuleError, match=re.escape("'a/b'")):
        keys.flatten({'a/b': 1, 'a': {'b': 2}})


def test_nest_rebuilds_dicts_and_rejects_leaf_prefixes():
    assert keys.nest({'a/b/c': 1, 'a/d': 2}) == {'a': {'b': {'c': 1}, 'd': 2}}
    with pytest.raises(AmbiguousRuleError, match="'a/b'"):
        keys.nest({'a': 1, 'a/b': 2})


def test_template_check_names_the_missing_group():
    pattern = re.compile(r'(?P<layer>\w+)_(\d)')
    keys.check_template(pattern, r'\g<layer>/\2', 'Rename')
    with pytest.raises(RuleError, match=r"template '\\\\3'.*\['layer'\]"):
        keys.check_template(pattern, r'\3', 'Rename')
    with pytest.raises(RuleError, match='nope'):
        keys.check_template(pattern, r'\g<nope>', 'Rename')


def test_bad_regex_names_the_owner():
    with pytest.raises(RuleError, match=r"Rename\(x\): '\(unclosed' is not a valid regex"):
        keys.compile_pattern('(unclosed', 'Rename(x)')


def test_close_matches_and_summaries_never_dump_everything():
    candidates = [f'layers_{i}/kernel' for i in range(100)]
    assert keys.close_matches('layer_3/kernel', candidates)[0] == 'layers_3/kernel'
    assert len(keys.close_matches('layer_3/kernel', candidates)) <= 5
    assert keys.summarize(candidates).endswith('and 95 more')
    assert keys.did_you_mean('zzz', candidates) == ''


def test_numpy_leaves_survive_a_round_trip():
    tree = {'w': np.ones(3), 'n': None, 'e': {}}
    flat, treedef = keys.flatten(tree)
    assert list(flat) == ['w']
    assert keys.unflatten(treedef, flat, flat)['n'] is None


def test_a_regex_too_large_for_re_is_a_rule_error():
    with pytest.raises(RuleError, match=re.escape("'a{99999999999}' is not a valid regex")):
        keys.KeyPattern('a{99999999999}', 'Drop(...)')


def test_a_catastrophic_regex_times_out_naming_pattern_and_key(monkeypatch):
    monkeypatch.setattr(keys, 'MATCH_TIMEOUT', 0.05)
    pattern = keys.KeyPattern(r'(a|aa)+$', 'Drop(...)')
    assert pattern.fullmatch('aaaa') is not None
    with pytest.raises(RuleError, match=re.escape("Drop(...): matching '(a|aa)+$' against")):
        pattern.fullmatch('a' * 64 + 'b')


def test_key_patterns_keep_re_syntax_and_groups():
    with pytest.raises(RuleError, match='not a valid regex'):
        keys.KeyPattern(r'(?<=a+)b', 'rule')  # `regex` accepts it; `re` (and Orbax) do not.
    m = keys.KeyPattern(r'(?P<i>\d+)/(a)?(.*)', 'rule').fullmatch('12/w')
    assert m['i'] == '12' and m.expand(r'\g<i>_\2_\3') == '12__w'


def test_dict_keys_that_do_not_sort_are_a_surgery_error():
    # JAX's own ValueError ('Comparator raised exception ...') escaped apply_rules.
    from orbax_surgery.errors import SurgeryError

    with pytest.raises(SurgeryError, match='Use str keys in every dict'):
        keys.flatten({1: np.ones(2), 'v': np.ones(2)})
