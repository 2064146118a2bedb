"""Rules files: each rule kind, presets, targets, LoRA entries and Python files; every error."""

import json
import pathlib
import re
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from fixtures import random_array, save

import orbax_surgery as osurg
from orbax_surgery import RuleError
from orbax_surgery.cli.python_rules import load_target
from orbax_surgery.cli.rules_file import load_rules_file
from orbax_surgery.cli.rules_file_entries import LoraMerge
from orbax_surgery.huggingface.peft_format import CONFIG_FILE, WEIGHTS_FILE
from orbax_surgery.huggingface.safetensors_file import write_file
from orbax_surgery.plan.resolve import resolve
from orbax_surgery.read.materialize import materialize
from orbax_surgery.sources.open import open_source


def write(tmp_path, text, name='rules.toml'):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def rules_of(tmp_path, text, name='rules.toml'):
    return load_rules_file(write(tmp_path, text, name)).rules


KINDS = [
    (
        "rename = { pattern = 'params/(.*)', replacement = '\\1' }",
        osurg.Rename('params/(.*)', r'\1'),
    ),
    ("copy = { pattern = 'embed', replacement = 'head' }", osurg.Copy('embed', 'head')),
    ("drop = 'opt_state/.*'", osurg.Drop('opt_state/.*')),
    ("drop = { pattern = 'step' }", osurg.Drop('step')),
    ("fallback = 'head/.*'", osurg.Fallback('head/.*')),
    ("cast = { pattern = '.*/kernel', dtype = 'bfloat16' }", osurg.Cast('.*/kernel', 'bfloat16')),
    ("transpose = { pattern = 'w', axes = [1, 0] }", osurg.Transpose('w', (1, 0))),
    ("reshape = { pattern = 'q', shape = [64, 4, -1] }", osurg.Reshape('q', (64, 4, -1))),
    ("slice = { pattern = 'e', index = '[:32000]' }", osurg.Slice('e', np.s_[:32000])),
    ("slice = { pattern = 'e', index = '3, 1::2' }", osurg.Slice('e', np.s_[3, 1::2])),
    ("slice = { pattern = 'e', index = 3 }", osurg.Slice('e', 3)),
    (
        "unstack = { pattern = 'layers/(.*)', replacement = 'layers_{i}/\\1' }",
        osurg.Unstack('layers/(.*)', r'layers_{i}/\1'),
    ),
    (
        "unstack = { pattern = 'l/(.*)', replacement = 'l_{i}/\\1', axis = 1, layers = [2, 0] }",
        osurg.Unstack('l/(.*)', r'l_{i}/\1', axis=1, layers=[2, 0]),
    ),
    (
        "stack = { pattern = 'l_{i}/(.*)', replacement = 'l/\\1', layers = '0:8:2' }",
        osurg.Stack('l_{i}/(.*)', r'l/\1', layers=[0, 2, 4, 6]),
    ),
    (
        "split = { pattern = '(.*)/qkv', replacements = ['\\1/q', '\\1/k', '\\1/v'] }",
        osurg.Split('(.*)/qkv', (r'\1/q', r'\1/k', r'\1/v')),
    ),
    (
        "split = { pattern = 'gu', replacements = ['g', 'u'], axis = 1, sizes = [8, -1] }",
        osurg.Split('gu', ('g', 'u'), axis=1, sizes=(8, -1)),
    ),
    (
        "concatenate = { parts = ['(.*)/q', '\\1/k'], replacement = '\\1/qk', axis = -1 }",
        osurg.Concatenate(('(.*)/q', r'\1/k'), r'\1/qk', axis=-1),
    ),
]


@pytest.mark.parametrize(('toml', 'want'), KINDS, ids=[k[0].split()[0] for k in KINDS])
def test_each_rule_kind_in_toml(tmp_path, toml, want):
    assert rules_of(tmp_path, f'[[rules]]\n{toml}\n') == (want,)


def test_yaml_gives_the_same_rules_as_toml(tmp_path):
    toml = rules_of(
        tmp_path,
        """
        [[rules]]
        rename = { pattern = 'params/(.*)', replacement = '\\1' }
        [[rules]]
        unstack = { pattern = 'layers/(.*)', replacement = 'layers_{i}/\\1', axis = 0 }
        [[rules]]
        drop = 'opt/.*'
        """,
    )
    yaml = rules_of(
        tmp_path,
        """
        rules:
          - rename: {pattern: 'params/(.*)', replacement: '\\1'}
          - unstack: {pattern: 'layers/(.*)', replacement: 'layers_{i}/\\1', axis: 0}
          - drop: opt/.*
        """,
        'rules.yaml',
    )
    assert yaml == toml and len(toml) == 3


def test_split_and_concatenate_in_yaml(tmp_path):
    yaml = rules_of(
        tmp_path,
        """
        rules:
          - split:
              {pattern: '(.*)/qkv', replacements: ['\\1/q', '\\1/k', '\\1/v'], sizes: [4, 2, 2]}
          - concatenate: {parts: ['(.*)/k', '\\1/v'], replacement: '\\1/kv', axis: 0}
        """,
        'rules.yaml',
    )
    want = (
        osurg.Split('(.*)/qkv', (r'\1/q', r'\1/k', r'\1/v'), sizes=(4, 2, 2)),
        osurg.Concatenate(('(.*)/k', r'\1/v'), r'\1/kv'),
    )
    assert yaml == want


def test_presets_take_their_functions_options(tmp_path):
    rules = rules_of(
        tmp_path,
        """
        [[rules]]
        drop = 'x'
        [[rules]]
        preset = 'from_pytorch'
        drop_prefix = 'model'
        layers = 'stacked'
        drop = ['.*/rotary_emb/.*']
        """,
    )
    want = osurg.from_pytorch(drop_prefix='model', layers='stacked', drop=['.*/rotary_emb/.*'])
    assert rules == (osurg.Drop('x'), *want)
    yaml = rules_of(tmp_path, 'rules: [{preset: to_pytorch, layers: null}]', 'r.yml')
    assert yaml == tuple(osurg.to_pytorch(layers=None))
    toml = rules_of(tmp_path, "[[rules]]\npreset = 'to_pytorch'\nlayers = 'none'\n")
    assert toml == yaml


def test_target_table_flat_or_nested(tmp_path):
    loaded = load_rules_file(
        write(
            tmp_path,
            """
            [target]
            'params/dense/kernel' = { shape = [4, 8], dtype = 'float32' }
            'params/step' = '...'
            [target.params.head]
            bias = { shape = [8], dtype = 'bfloat16' }
            """,
        )
    )
    assert loaded.rules == () and loaded.merge is None
    assert loaded.target == {
        'params': {
            'dense': {'kernel': jax.ShapeDtypeStruct((4, 8), np.float32)},
            'step': ...,
            'head': {'bias': jax.ShapeDtypeStruct((8,), jax.numpy.bfloat16)},
        }
    }


def test_empty_file_has_no_rules_and_no_target(tmp_path):
    loaded = load_rules_file(write(tmp_path, '', 'rules.yaml'))
    assert loaded.rules == () and loaded.target is None


ERRORS = [
    (
        "[[rules]]\nrenam = { pattern = 'a', replacement = 'b' }",
        r"rules[0]: unknown rule kind 'renam'.*Did you mean 'rename'",
    ),
    (
        "[[rules]]\ndrop = 'x'\n[[rules]]\nrename = { patern = 'a', replacement = 'b' }",
        r"rules[1] (rename): unknown field 'patern'.*Did you mean 'pattern'",
    ),
    ("[[rules]]\nrename = { pattern = 'a' }", r"rules[0] (rename): missing 'replacement'"),
    ("[[rules]]\nrename = 'a'", r'rules[0] (rename) is .*write its fields as a table'),
    (
        "[[rules]]\ntranspose = { pattern = 'w', axes = '1, 0' }",
        r'rules[0] (transpose): must be a list of integers',
    ),
    (
        "[[rules]]\nunstack = { pattern = 'l/(.*)', replacement = 'l_{i}/\\1', axis = 'x' }",
        r'must be an integer',
    ),
    ("[[rules]]\ndrop = 'a'\nfallback = 'b'", r"rules[0] has the keys ['drop', 'fallback']"),
    (
        "[[rules]]\ncast = { pattern = 'w', dtype = 'flaot32' }",
        r"rules[0] (cast): dtype: 'flaot32' is not a dtype. Did you mean 'float32'",
    ),
    ("[[rules]]\ndrop = '(unclosed'", r'rules[0] (drop): .*not a valid regex'),
    (
        "[[rules]]\nunstack = { pattern = 'l/(.*)', replacement = 'l/\\1' }",
        r'rules[0] (unstack): .*needs {i}',
    ),
    ("[[rules]]\nslice = { pattern = 'e', index = '[:x]' }", r"rules[0] (slice): index '[:x]'"),
    (
        "[[rules]]\nstack = { pattern = 'l_{i}', replacement = 'l', layers = '4' }",
        r"'4' is not a range",
    ),
    (
        "[[rules]]\npreset = 'from_torch'",
        r"unknown preset 'from_torch'.*Did you mean 'from_pytorch'",
    ),
    (
        "[[rules]]\npreset = 'from_pytorch'\ndrop_prefx = 'model'",
        r"(preset 'from_pytorch'): unknown option 'drop_prefx'.*Did you mean 'drop_prefix'",
    ),
    (
        "[[rules]]\npreset = 'to_pytorch'\nlayers = 'scanned'",
        r"(preset 'to_pytorch'): layers='scanned' is none of",
    ),
    ("[[rules]]\npreset = 'to_pytorch'\ndrop = 'x'", r'drop: must be a list of strings'),
    ("[[rules]]\nlora = 'a'\n[[rules]]\nlora = 'b'", r'rules[1] is a second `lora` entry'),
    (
        "[[rules]]\nlora = { adapters = 'a', mode = 'attach' }",
        r"mode must be one of ('merge', 'unmerge')",
    ),
    ("[[rule]]\ndrop = 'x'", r"unknown top-level key 'rule'.*Did you mean 'rules'"),
    ("rules = 'drop'", r'`rules` is a str; it is a list of rules'),
    ('rules = [3]', r'rules[0] is 3; a rule is a table'),
    ('[target]\nw = { shape = [2] }', r"target 'w' is .*a leaf is"),
    ("[target]\nw = { shape = [2], dtype = 'f32' }", r"target 'w': dtype: 'f32' is not a dtype"),
    ('[target]\nw = 3', r"target 'w' is 3"),
    ('target = 3', r'target is 3'),
    ("[[rules]\ndrop = 'x'", r'is not valid TOML: .*line 1'),
    # Quoting, misplaced top-level keys, and each option's type, with the fix.
    (
        '[[rules]]\nrename = { pattern = "layers_(\\d+)", replacement = "l_\\1" }',
        r"Unescaped '\' in a string.*write regexes in single quotes, 'layers_(\d+)/(.*)'",
    ),
    (
        '[[rules]]\ndrop = "\\bopt"',
        r"rules[0] (drop): '\x08opt' holds a backspace character: double quotes read '\x08' "
        'as one',
    ),
    (
        "[[rules]]\ndrop = 'opt/.*'\ntarget = 'model:params'",
        r"rules[0] holds 'target', which is a top-level key of the file, not a rule option; keys "
        r'after a [[rules]] table belong to it: move `target = ...` above the first [[rules]].',
    ),
    (
        "[[rules]]\npreset = 'from_pytorch'\ntarget = 'model:params'",
        r"rules[0] holds 'target', which is a top-level key",
    ),
    (
        "[[rules]]\nunstack = { pattern = 'l/(.*)', replacement = 'l_{i}/\\1', axis = '1' }",
        r"must be an integer, not '1': write 1 without quotes.",
    ),
    (
        "[[rules]]\ntranspose = { pattern = 'w', axes = '(1, 0)' }",
        r"must be a list of integers, not '(1, 0)': write a list, [1, 0].",
    ),
    (
        "[[rules]]\nreshape = { pattern = 'w', shape = ['4', '8'] }",
        r"must be a list of integers, not ['4', '8']: write the numbers without quotes, [4, 8].",
    ),
    (
        '[[rules]]\ndrop = { pattern = 3 }',
        r"rules[0] (drop): must be a string, not 3: write it quoted, '3'.",
    ),
    (
        "[[rules]]\nsplit = { pattern = 'qkv', replacements = 'q' }",
        r"must be a list of strings, not 'q': write ['q'].",
    ),
]


@pytest.mark.parametrize(('text', 'message'), ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_errors_name_the_rule_and_the_closest_names(tmp_path, text, message):
    with pytest.raises(RuleError, match=re.escape(message).replace(r'\.\*', '.*')):
        load_rules_file(write(tmp_path, text + '\n'))


def test_yaml_quoting_and_misplaced_top_level_keys(tmp_path):
    with pytest.raises(RuleError, match=r"unknown escape character 'd'.*In YAML, double quotes"):
        load_rules_file(write(tmp_path, 'rules:\n  - drop: "layers_(\\d+)"\n', 'q.yaml'))
    misplaced = "rules:\n  - drop: 'opt/.*'\n    target: 'model:params'\n"
    with pytest.raises(RuleError, match=r'write `target:` at the top level, not indented'):
        load_rules_file(write(tmp_path, misplaced, 'm.yaml'))
    single = "rules:\n  - rename: {pattern: 'layers_(\\d+)/(.*)', replacement: 'l\\1/\\2'}\n"
    (rename,) = load_rules_file(write(tmp_path, single, 's.yaml')).rules
    assert rename.pattern == r'layers_(\d+)/(.*)' and rename.replacement == r'l\1/\2'


def test_file_errors(tmp_path):
    with pytest.raises(RuleError, match=r'is not valid YAML: .* at line 3, column 1'):
        load_rules_file(write(tmp_path, 'rules:\n  - drop: [x\n', 'bad.yaml'))
    with pytest.raises(RuleError, match=r"ends in .toml, .yaml, .yml or .py, not '.json'"):
        load_rules_file(write(tmp_path, '{}', 'rules.json'))
    with pytest.raises(FileNotFoundError, match=r"rule.toml is missing. Did you mean 'rules.json'"):
        load_rules_file(tmp_path / 'rule.toml')


def test_python_rules_file_with_a_target_function(tmp_path):
    path = write(
        tmp_path,
        """
        import jax, numpy as np
        import orbax_surgery as osurg

        rules = [osurg.Rename('w', 'W')]

        def target():
            return {'W': jax.ShapeDtypeStruct((2,), np.float32)}
        """,
        'rules.py',
    )
    loaded = load_rules_file(path)
    assert loaded.rules == (osurg.Rename('w', 'W'),)
    assert loaded.target == {'W': jax.ShapeDtypeStruct((2,), np.float32)}


@pytest.mark.parametrize(
    ('text', 'message'),
    [
        ('rule = []', r"defines no `rules` .* Did you mean 'rule'"),
        ('rules = [1]', r'rules[0] is a int, not a rule'),
        (
            'rules = []\ndef target():\n    return 1 / 0',
            r'ZeroDivisionError while calling .*, line 3): division by zero',
        ),
        ('rules = [\n', r', line 1: SyntaxError: '),
        (
            'import no_such_module_here',
            r"ModuleNotFoundError while running (.*rules.py, line 1): No module named 'no_such",
        ),
    ],
    ids=['no_rules', 'not_a_rule', 'target_fails', 'syntax', 'import'],
)
def test_python_rules_file_errors_name_the_file_and_line(tmp_path, text, message):
    with pytest.raises(RuleError, match=re.escape(message).replace(r'\.\*', '.*')):
        load_rules_file(write(tmp_path, text + '\n', 'rules.py'))


def test_load_target_from_a_file_or_a_module(tmp_path, monkeypatch):
    (tmp_path / 'my_model.py').write_text('TARGET = {"w": ...}\ndef make():\n    return TARGET\n')
    assert load_target('my_model.py:make', relative_to=tmp_path) == {'w': ...}
    monkeypatch.chdir(tmp_path)
    assert load_target('my_model:TARGET') == {'w': ...}
    with pytest.raises(RuleError, match=r"my_model defines no 'mak'. Did you mean 'make'"):
        load_target('my_model:mak')
    with pytest.raises(RuleError, match=r"no module named 'nope'"):
        load_target('nope:make')
    with pytest.raises(RuleError, match=r"is not 'module:function' or 'file.py:function'"):
        load_target('my_model')


BASE = {'dense': {'kernel': random_array((4, 6), seed=1)}, 'head': random_array((3,), seed=2)}


def test_lora_entry_merges_saved_adapters_before_the_rules_after_it(tmp_path):
    save(tmp_path / 'base', BASE)
    lora = osurg.LoraSpec(['dense/kernel'], rank=2, alpha=4).bind(BASE)
    a, b = random_array((4, 2), seed=3), random_array((2, 6), seed=4)
    trainable = {'dense': {'kernel_lora_a': a, 'kernel_lora_b': b}}
    with ocp.Checkpointer(osurg.LoraCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / 'run' / 'adapters', args=osurg.LoraSave(item=trainable, lora=lora))
    loaded = load_rules_file(
        write(
            tmp_path / 'run',
            """
            rules:
              - drop: head
              - lora: adapters
              - rename: {pattern: 'dense/kernel', replacement: 'out/weight'}
              - transpose: {pattern: 'out/weight', axes: [1, 0]}
            """,
            'merge.yaml',
        )
    )
    assert loaded.merge == LoraMerge(tmp_path / 'run' / 'adapters')
    assert loaded.rules == (osurg.Drop('head'),) and len(loaded.after) == 2
    source, rules = loaded.compose(open_source(tmp_path / 'base'), None)
    out = materialize(resolve(source.arrays, None, rules), source)
    np.testing.assert_allclose(out['out']['weight'], (BASE['dense']['kernel'] + 2 * a @ b).T)


def test_lora_entry_reads_a_peft_directory(tmp_path):
    weight = random_array((8, 6), seed=5)  # torch (out, in)
    lora_a, lora_b = random_array((2, 6), seed=6), random_array((8, 2), seed=7)
    (tmp_path / 'base').mkdir()
    write_file(tmp_path / 'base' / 'model.safetensors', {'model.q.weight': weight})
    (tmp_path / 'peft').mkdir()
    write_file(
        tmp_path / 'peft' / WEIGHTS_FILE,
        {
            'base_model.model.model.q.lora_A.weight': lora_a,
            'base_model.model.model.q.lora_B.weight': lora_b,
        },
    )
    (tmp_path / 'peft' / CONFIG_FILE).write_text(json.dumps({'r': 2, 'lora_alpha': 3}))
    loaded = load_rules_file(
        write(
            tmp_path,
            """
            [[rules]]
            preset = 'from_pytorch'
            drop_prefix = 'model'
            [[rules]]
            lora = { adapters = 'peft' }
            [target]
            'q/kernel' = { shape = [6, 8], dtype = 'float32' }
            """,
        )
    )
    source, rules = loaded.compose(open_source(tmp_path / 'base'), loaded.target)
    out = materialize(resolve(source.arrays, loaded.target, rules), source)
    np.testing.assert_allclose(out['q']['kernel'], (weight + 1.5 * lora_b @ lora_a).T, rtol=1e-6)


def test_the_examples_in_the_docs_load(tmp_path):
    doc = (pathlib.Path(__file__).parents[2] / 'docs' / 'rules-files.md').read_text()
    blocks = re.findall(r'```(toml|yaml|python)\n(.*?)```', doc, re.DOTALL)
    assert [kind for kind, _ in blocks].count('toml') >= 4
    loaded = []
    for i, (kind, text) in enumerate(blocks):
        if kind != 'python':  # The Python example imports the user's model.
            loaded.append(load_rules_file(write(tmp_path, text, f'example{i}.{kind}')))
            assert loaded[-1].rules or loaded[-1].merge or loaded[-1].target, text
    assert loaded[0].rules == loaded[1].rules and len(loaded[0].rules) == 4  # TOML, then YAML
