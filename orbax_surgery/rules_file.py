r"""Rules files: a conversion's rules and target tree, written in TOML, YAML or Python.

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
import inspect
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from etils import epath

from orbax_surgery.errors import RuleError
from orbax_surgery.keys import SEP, PyTree, did_you_mean, nest
from orbax_surgery.python_rules import load_python_rules, load_target
from orbax_surgery.pytorch import from_pytorch, to_pytorch
from orbax_surgery.rules import (
    Cast,
    Copy,
    Drop,
    Fallback,
    Rename,
    Reshape,
    Rule,
    Slice,
    Transpose,
    parse_dtype,
)
from orbax_surgery.sources import ArraySource
from orbax_surgery.stacking import Stack, Unstack

SUFFIXES = ('.toml', '.yaml', '.yml', '.py')
_TOP_LEVEL = ('rules', 'target')
_MODES = ('merge', 'unmerge')


class _Bad(Exception):
    """A field's value is wrong; the caller says where."""


@dataclasses.dataclass(frozen=True)
class LoraMerge:
    """A `lora` entry: adapters merged onto the checkpoint after the rules before it.

    Attributes:
        adapters: A `LoraSave` checkpoint item, or a PEFT adapter directory
            (one holding `adapter_config.json`).
        mode: 'merge' adds `scale * A @ B` to each adapted weight; 'unmerge'
            subtracts it (the checkpoint holds merged weights).
    """

    adapters: epath.Path
    mode: str = 'merge'

    def __post_init__(self):
        if self.mode not in _MODES:
            raise RuleError(f'LoraMerge: mode must be one of {_MODES}, not {self.mode!r}.')

    def compose(
        self,
        source: ArraySource,
        target: PyTree,
        before: Sequence[Rule],
        after: Sequence[Rule],
    ) -> tuple[ArraySource, tuple[Rule, ...]]:
        """The base and the adapters as one source, and the rules that merge them."""
        # The same composition as `LoraRestore`'s (lora.checkpoint.plan_adapters), with
        # rules after the merge too, so that a merged model can be exported.
        from orbax_surgery.lora.checkpoint import merge_rules, read_lora_layout
        from orbax_surgery.lora.peft import CONFIG_FILE
        from orbax_surgery.lora.peft import read_peft_adapter as read_peft
        from orbax_surgery.sources import Namespaced, OrbaxCheckpoint

        adapters: ArraySource
        adapter_rules: list[Rule] = []
        if (self.adapters / CONFIG_FILE).exists():
            peft = read_peft(self.adapters, base=source, target=target, base_rules=before)
            adapters = peft.source
            adapter_rules = peft.tensor_rules()
            layout = peft.layout
        else:
            adapters = OrbaxCheckpoint(self.adapters)
            layout = read_lora_layout(self.adapters)
        both = Namespaced({'base': source, 'adapters': adapters})
        sign = 1 if self.mode == 'merge' else -1
        rules = [
            *merge_rules(layout, base_rules=before, adapter_rules=adapter_rules, sign=sign),
            *after,
        ]
        return both, tuple(rules)


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
        """The source to read and the rules to apply, the LoRA merge included."""
        if self.merge is None:
            return source, self.rules
        return self.merge.compose(source, target, self.rules, self.after)


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
            raise RuleError(f'{path} is not valid TOML: {e}.') from e
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
        parsed = _entry(entry, i, path)
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


def _entry(entry: Any, i: int, path: epath.Path) -> list[Rule] | LoraMerge:
    where = f'{path}: rules[{i}]'
    if not isinstance(entry, Mapping) or not entry:
        raise RuleError(
            f"{where} is {entry!r}; a rule is a table with one kind, e.g. {{drop = 'opt/.*'}}."
        )
    if 'preset' in entry:
        return _preset(entry, where)
    if len(entry) > 1:
        raise RuleError(
            f'{where} has the keys {sorted(entry)}; an entry holds one rule (or a preset '
            'with its options). Split it into one entry per rule.'
        )
    ((kind, value),) = entry.items()
    if kind not in _KINDS:
        raise RuleError(
            f'{where}: unknown rule kind {kind!r}; the kinds are {", ".join(_KINDS)} and '
            f'preset.{did_you_mean(str(kind), [*_KINDS, "preset"])}'
        )
    make, required, optional = _KINDS[kind]
    where = f'{where} ({kind})'
    if not isinstance(value, Mapping):
        if kind not in _SHORTHAND:
            table = ', '.join(f'{f} = ...' for f in required)
            raise RuleError(f'{where} is {value!r}; write its fields as a table: {{{table}}}.')
        value = {_SHORTHAND[kind]: value}
    for field in value:
        if field not in (*required, *optional):
            raise RuleError(
                f'{where}: unknown field {field!r}; {kind} takes {", ".join(required + optional)}.'
                f'{did_you_mean(str(field), required + optional)}'
            )
    missing = [f for f in required if f not in value]
    if missing:
        raise RuleError(f'{where}: missing {", ".join(map(repr, missing))}.')
    try:
        fields = {f: _FIELDS[f](v) for f, v in value.items()}
        if kind == 'lora':
            adapters = epath.Path(fields['adapters'])
            fields['adapters'] = adapters if adapters.is_absolute() else path.parent / adapters
        made = make(**fields)
    except _Bad as e:
        raise RuleError(f'{where}: {e}') from None
    except RuleError as e:
        raise RuleError(f'{where}: {e}') from e
    return made if isinstance(made, LoraMerge) else [made]


def _preset(entry: Mapping[str, Any], where: str) -> list[Rule]:
    name = entry['preset']
    if name not in _PRESETS:
        raise RuleError(
            f'{where}: unknown preset {name!r}; the presets are {", ".join(_PRESETS)}.'
            f'{did_you_mean(str(name), _PRESETS)}'
        )
    fn = _PRESETS[name]
    where = f'{where} (preset {name!r})'
    params = inspect.signature(fn).parameters
    options = {}
    for option, value in entry.items():
        if option == 'preset':
            continue
        if option not in params:
            raise RuleError(
                f'{where}: unknown option {option!r}; it takes {", ".join(params)}.'
                f'{did_you_mean(str(option), params)}'
            )
        try:
            options[option] = _preset_option(option, value, params[option].default)
        except _Bad as e:
            raise RuleError(f'{where}: {option}: {e}') from None
    try:
        return fn(**options)
    except RuleError as e:
        raise RuleError(f'{where}: {e}') from e


def _preset_option(option: str, value: Any, default: Any) -> Any:
    if option == 'layers' and value in (None, 'none'):
        return None
    if isinstance(default, tuple | list):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _Bad(f'must be a list of strings, not {value!r}.')
        return tuple(value)
    if value is None and default is None:
        return None
    return _string(value)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad(f'must be a string, not {value!r}.')
    return value


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Bad(f'must be an integer, not {value!r}.')
    return value


def _ints(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise _Bad(f'must be a list of integers, not {value!r}.')
    return tuple(value)


def _dtype(value: Any) -> Any:
    return parse_dtype(_string(value), 'dtype')


def _layers(value: Any) -> tuple[int, ...]:
    """A list of layer numbers, or 'start:stop[:step]' for a range."""
    if isinstance(value, str):
        parts = value.split(':')
        try:
            numbers = [int(p) if p.strip() else None for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) not in (2, 3) or numbers[1] is None:
            raise _Bad(f"{value!r} is not a range 'start:stop' or 'start:stop:step'.")
        start, stop, step = (numbers + [None])[:3]
        return tuple(range(start or 0, numbers[1], step or 1))
    return _ints(value)


def _index(value: Any) -> Any:
    """NumPy basic indexing written as a string, e.g. '[:32000]' or '3, ::2', or an int."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = _string(value).strip()
    if text.startswith('[') and text.endswith(']'):
        text = text[1:-1]
    out: list[Any] = []
    for part in text.split(','):
        bounds = part.split(':')
        try:
            numbers = [int(b) if b.strip() else None for b in bounds]
        except ValueError:
            numbers = []
        if not numbers or len(numbers) > 3 or (len(numbers) == 1 and numbers[0] is None):
            raise _Bad(
                f'index {value!r}: {part.strip()!r} is not an integer or a slice '
                "('start:stop:step'); write e.g. '[:32000]' or '[3, ::2]'."
            )
        out.append(numbers[0] if len(numbers) == 1 else slice(*numbers))
    return out[0] if len(out) == 1 else tuple(out)


def _mode(value: Any) -> str:
    value = _string(value)
    if value not in _MODES:
        raise _Bad(f'mode must be one of {_MODES}, not {value!r}.')
    return value


_FIELDS: dict[str, Callable[[Any], Any]] = {
    'pattern': _string,
    'replacement': _string,
    'dtype': _dtype,
    'axes': _ints,
    'shape': _ints,
    'axis': _int,
    'layers': _layers,
    'index': _index,
    'adapters': _string,
    'mode': _mode,
}
_KINDS: dict[str, tuple[Callable[..., Any], tuple[str, ...], tuple[str, ...]]] = {
    'rename': (Rename, ('pattern', 'replacement'), ()),
    'copy': (Copy, ('pattern', 'replacement'), ()),
    'drop': (Drop, ('pattern',), ()),
    'fallback': (Fallback, ('pattern',), ()),
    'cast': (Cast, ('pattern', 'dtype'), ()),
    'transpose': (Transpose, ('pattern', 'axes'), ()),
    'reshape': (Reshape, ('pattern', 'shape'), ()),
    'slice': (Slice, ('pattern', 'index'), ()),
    'unstack': (Unstack, ('pattern', 'replacement'), ('axis', 'layers')),
    'stack': (Stack, ('pattern', 'replacement'), ('axis', 'layers')),
    'lora': (LoraMerge, ('adapters',), ('mode',)),
}
_SHORTHAND = {'drop': 'pattern', 'fallback': 'pattern', 'lora': 'adapters'}
_PRESETS: dict[str, Callable[..., list[Rule]]] = {
    'from_pytorch': from_pytorch,
    'to_pytorch': to_pytorch,
}


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
                shape = _ints(value['shape'])
                dtype = _dtype(value['dtype'])
            except _Bad as e:
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
        raise RuleError(f'{path} is not valid YAML: {problem}{where}.') from e


def _load_python(path: epath.Path) -> RulesFile:
    rules, target = load_python_rules(path)
    return RulesFile(path, rules, target=target)
