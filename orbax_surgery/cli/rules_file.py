"""Rules files: a conversion's rules and target tree, written in TOML, YAML or Python.

TOML and YAML files hold a list `rules`, applied in order, and optionally a
`target`. Each rule is a table with one key naming its kind, whose value holds
the rule's fields (`rename = {pattern = 'params/(.*)', replacement = '\1'}`),
or a preset (`preset = 'from_pytorch'` beside its options). A `lora` entry
merges LoRA adapters (a `LoraSave` item or a PEFT directory) onto the
checkpoint after the rules before it. A Python file defines `rules` (a list of
rule objects) and optionally `target` (a tree, or a function returning one).
The format is documented in docs/rules-files.md.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from typing import Any

from etils import epath

from orbax_surgery.cli.python_rules import load_python_rules, load_target
from orbax_surgery.cli.rules_file_entries import (
    BadValue,
    ConfigPreset,
    LoraMerge,
    read_dtype,
    read_entry,
    read_ints,
)
from orbax_surgery.errors import RuleError
from orbax_surgery.keys import SEP, PyTree, did_you_mean, nest
from orbax_surgery.rules.rule import Rule
from orbax_surgery.sources.source import ArraySource

SUFFIXES = ('.toml', '.yaml', '.yml', '.py')
_TOP_LEVEL = ('rules', 'target')
_QUOTING = (
    ' In {lang}, double quotes read backslashes as escapes: write regexes in single quotes, '
    "'layers_(\\d+)/(.*)' and '\\1', which keep them as they are (or double each backslash)."
)


@dataclasses.dataclass(frozen=True)
class RulesFile:
    """What a rules file says: rules, an optional LoRA merge, and the target.

    Attributes:
        path: The file.
        rules: The rules (before the `lora` entry, if there is one).
        merge: The `lora` entry, or None.
        after: Rules after the `lora` entry; they see the merged weights.
        target: The target tree, or None to take keys, shapes and dtypes from
            the rules.
    """

    path: epath.Path
    rules: tuple[Rule, ...] = ()
    merge: LoraMerge | None = None
    after: tuple[Rule, ...] = ()
    target: PyTree = None

    def compose(self, source: ArraySource, target: PyTree) -> tuple[ArraySource, tuple[Rule, ...]]:
        """The source to read and the rules to apply, the LoRA merge and presets included."""
        rules, after = _expanded(self.rules, source), _expanded(self.after, source)
        if self.merge is None:
            return source, rules
        return self.merge.compose(source, target, rules, after)

    def target_for(self, source: ArraySource) -> PyTree:
        """The file's target, else that of its `preset = 'auto'` import, else None."""
        if self.target is not None:
            return self.target
        for rule in (*self.rules, *self.after):
            if isinstance(rule, ConfigPreset) and rule.direction == 'import':
                return rule.preset(source).target
        return None

    def export_config(self, source: ArraySource) -> dict[str, Any] | None:
        """The config of a `preset = 'auto'` export, to write as `config.json`; else None."""
        for rule in (*self.rules, *self.after):
            if isinstance(rule, ConfigPreset) and rule.direction == 'export':
                return dict(rule.preset(source).config)
        return None


def _expanded(rules: tuple[Rule, ...], source: ArraySource) -> tuple[Rule, ...]:
    """The rules with each `preset = 'auto'` entry replaced by its family's rules."""
    out: list[Rule] = []
    for rule in rules:
        out.extend(rule.rules(source) if isinstance(rule, ConfigPreset) else (rule,))
    return tuple(out)


def load_rules_file(path: epath.PathLike) -> RulesFile:
    r"""Reads a rules file: TOML (`.toml`), YAML (`.yaml`, `.yml`) or Python (`.py`).

    Relative paths inside it (LoRA adapters, `file.py:function` targets) are
    relative to the file's directory.

    Raises:
        FileNotFoundError: there is no such file.
        RuleError: the file is malformed, names an unknown rule kind or field
            (with the rule's index and the closest names), or a rule is invalid.

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / 'rules.toml'
        >>> _ = path.write_text('''
        ... [[rules]]
        ... rename = { pattern = 'params/(.*)', replacement = '\\1' }
        ... [[rules]]
        ... drop = 'opt_state/.*'
        ... ''')
        >>> load_rules_file(path).rules
        (Rename(pattern='params/(.*)', replacement='\\1'), Drop(pattern='opt_state/.*'))
    """
    path = epath.Path(os.path.abspath(path))
    if not path.is_file():
        siblings = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
        near = did_you_mean(path.name, siblings)
        what = 'a directory, not a file' if path.is_dir() else 'missing'
        raise FileNotFoundError(f'Rules file {path} is {what}.{near}')
    suffix = path.suffix.lower()
    if suffix == '.py':
        return _load_python(path)
    if suffix == '.toml':
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            hint = _QUOTING.format(lang='TOML') if "Unescaped '\\'" in str(e) else ''
            raise RuleError(f'{path} is not valid TOML: {e}.{hint}') from e
    elif suffix in ('.yaml', '.yml'):
        data = _load_yaml(path)
    else:
        raise RuleError(
            f'{path}: a rules file ends in .toml, .yaml, .yml or .py, not {path.suffix!r}.'
        )
    return parse_rules(data, path)


def parse_rules(data: Any, path: epath.Path) -> RulesFile:
    """A rules file from its parsed TOML or YAML data (a mapping)."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise RuleError(f'{path}: the file holds a {type(data).__name__}, not a table of rules.')
    for key in data:
        if key not in _TOP_LEVEL:
            raise RuleError(
                f'{path}: unknown top-level key {key!r}; a rules file holds {_TOP_LEVEL}.'
                f'{did_you_mean(str(key), _TOP_LEVEL)}'
            )
    entries = data.get('rules', [])
    if not isinstance(entries, list):
        raise RuleError(
            f'{path}: `rules` is a {type(entries).__name__}; it is a list of rules '
            '([[rules]] tables in TOML, a list in YAML).'
        )
    parts: list[list[Rule]] = [[]]
    merge = None
    for i, entry in enumerate(entries):
        parsed = read_entry(entry, i, path)
        if isinstance(parsed, LoraMerge):
            if merge is not None:
                raise RuleError(
                    f'{path}: rules[{i}] is a second `lora` entry; merge one at a time.'
                )
            merge = parsed
            parts.append([])
        else:
            parts[-1].extend(parsed)
    target = _target(data['target'], path) if 'target' in data else None
    after = tuple(parts[1]) if merge is not None else ()
    return RulesFile(path, tuple(parts[0]), merge, after, target)


def _target(value: Any, path: epath.Path) -> PyTree:
    """A rules file's `target`: 'module:function', or a table of leaves."""
    if isinstance(value, str):
        return load_target(value, relative_to=path.parent)
    if not isinstance(value, Mapping):
        raise RuleError(
            f"{path}: target is {value!r}; it is 'module:function', 'file.py:function' or a "
            "table of leaves {'key/path' = {shape = [..], dtype = 'float32'}}."
        )
    flat: dict[str, Any] = {}
    _target_leaves(value, '', flat, path)
    return nest(flat)


def _target_leaves(node: Mapping[str, Any], prefix: str, out: dict[str, Any], path: epath.Path):
    import jax

    for name, value in node.items():
        key = f'{prefix}{name}'
        if value == '...':
            out[key] = ...
        elif isinstance(value, Mapping) and ('shape' in value or 'dtype' in value):
            extra = sorted(set(value) - {'shape', 'dtype'})
            if extra or 'shape' not in value or 'dtype' not in value:
                raise RuleError(
                    f'{path}: target {key!r} is {dict(value)!r}; a leaf is '
                    "{shape = [..], dtype = '...'} (both, nothing else), or '...' to take "
                    'both from the rules.'
                )
            try:
                shape = read_ints(value['shape'])
                dtype = read_dtype(value['dtype'])
            except BadValue as e:
                raise RuleError(f'{path}: target {key!r}: {e}') from None
            except RuleError as e:
                raise RuleError(f'{path}: target {key!r}: {e}') from e
            out[key] = jax.ShapeDtypeStruct(shape, dtype)
        elif isinstance(value, Mapping):
            _target_leaves(value, key + SEP, out, path)
        else:
            raise RuleError(
                f"{path}: target {key!r} is {value!r}; a leaf is {{shape = [..], dtype = '...'}} "
                "or '...'."
            )


def _load_yaml(path: epath.Path) -> Any:
    import yaml  # Only YAML rules files need PyYAML.

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark else ''
        problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
        hint = _QUOTING.format(lang='YAML') if 'escape' in problem else ''
        raise RuleError(f'{path} is not valid YAML: {problem}{where}.{hint}') from e


def _load_python(path: epath.Path) -> RulesFile:
    rules, target = load_python_rules(path)
    return RulesFile(path, rules, target=target)
