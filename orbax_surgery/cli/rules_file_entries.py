"""A rules file's entries: one rule, preset or LoRA merge each, every field checked."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from etils import epath

from orbax_surgery.errors import RuleError
from orbax_surgery.huggingface.presets import Preset, preset
from orbax_surgery.huggingface.pytorch_rules import from_pytorch, to_pytorch
from orbax_surgery.keys import PyTree, did_you_mean
from orbax_surgery.rules.arguments import parse_dtype
from orbax_surgery.rules.fused import Concatenate, Split
from orbax_surgery.rules.layers import Stack, Unstack
from orbax_surgery.rules.moves import Copy, Drop, Fallback, Rename
from orbax_surgery.rules.rule import Rule
from orbax_surgery.rules.values import Cast, Reshape, Slice, Transpose
from orbax_surgery.sources.source import ArraySource

_MODES = ('merge', 'unmerge')


class BadValue(Exception):
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
        from orbax_surgery.huggingface.peft_adapter import read_peft_adapter as read_peft
        from orbax_surgery.huggingface.peft_format import CONFIG_FILE
        from orbax_surgery.lora.handler import read_lora_layout
        from orbax_surgery.lora.restore_plan import merge_rules
        from orbax_surgery.sources.namespaced import Namespaced
        from orbax_surgery.sources.orbax_checkpoint import OrbaxCheckpoint

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
class ConfigPreset:
    """A `preset = 'auto'` entry: a model family's rules, from its `config.json`.

    Attributes:
        layers: 'unrolled' or 'stacked' layers in the Flax layout.
        config: The `config.json` (or its directory); by default the one beside
            the Hugging Face source.
        direction: 'import' (Hugging Face -> Flax; also gives the target when
            none is given) or 'export' (Flax -> Hugging Face).
        to: The layout: 'flax' (canonical) or 'maxtext' (MaxText's tree).
    """

    layers: str = 'unrolled'
    config: str | None = None
    direction: str = 'import'
    to: str = 'flax'

    def __post_init__(self):
        if self.direction not in ('import', 'export'):
            raise RuleError(f"direction is 'import' or 'export', not {self.direction!r}.")
        if self.to not in ('flax', 'maxtext'):
            raise RuleError(f"to is 'flax' or 'maxtext', not {self.to!r}.")

    def preset(self, source: Any) -> Preset:
        where = self.config or getattr(source, 'directory', None)
        if where is None:
            raise RuleError(
                f"preset = 'auto' reads the config.json beside a Hugging Face source, but "
                f'{source!r} has none; give it: config = "path/to/config.json".'
            )
        return preset(where, layers=self.layers, to=self.to)  # type: ignore[arg-type]

    def rules(self, source: Any) -> tuple[Rule, ...]:
        made = self.preset(source)
        return made.import_rules if self.direction == 'import' else made.export_rules

    def apply(self, tree: Any, target: Any) -> Any:
        raise RuleError(
            "preset = 'auto' becomes rules once its source is known: use RulesFile.compose."
        )


def read_entry(entry: Any, i: int, path: epath.Path) -> list[Rule] | LoraMerge:
    where = f'{path}: rules[{i}]'
    if not isinstance(entry, Mapping) or not entry:
        raise RuleError(
            f"{where} is {entry!r}; a rule is a table with one kind, e.g. {{drop = 'opt/.*'}}."
        )
    _check_no_top_level_keys(entry, where, path)
    if 'preset' in entry:
        return _preset(entry, where, path)
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
    except BadValue as e:
        raise RuleError(f'{where}: {e}') from None
    except RuleError as e:
        raise RuleError(f'{where}: {e}') from e
    return made if isinstance(made, LoraMerge) else [made]


def _check_no_top_level_keys(entry: Mapping[str, Any], where: str, path: epath.Path) -> None:
    """A top-level key (`target`) inside a rule: in TOML, written after a [[rules]] table."""
    for key in ('target', 'rules'):
        if key in entry:
            move = (
                f'keys after a [[rules]] table belong to it: move `{key} = ...` above the '
                'first [[rules]]'
                if path.suffix == '.toml'
                else f'write `{key}:` at the top level, not indented under a rule'
            )
            raise RuleError(
                f'{where} holds {key!r}, which is a top-level key of the file, not a rule '
                f'option; {move}.'
            )


def _preset(entry: Mapping[str, Any], where: str, path: epath.Path) -> list[Rule]:
    name = entry['preset']
    if name == 'auto':
        return [_config_preset(entry, f'{where} (preset {name!r})', path)]
    if name not in _PRESETS:
        raise RuleError(
            f'{where}: unknown preset {name!r}; the presets are auto, {", ".join(_PRESETS)}.'
            f'{did_you_mean(str(name), ["auto", *_PRESETS])}'
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
        except BadValue as e:
            raise RuleError(f'{where}: {option}: {e}') from None
    try:
        return fn(**options)
    except RuleError as e:
        raise RuleError(f'{where}: {e}') from e


def _config_preset(entry: Mapping[str, Any], where: str, path: epath.Path) -> Rule:
    options = {k: v for k, v in entry.items() if k != 'preset'}
    known = ('layers', 'config', 'direction', 'to')
    for option, value in options.items():
        if option not in known:
            raise RuleError(
                f'{where}: unknown option {option!r}; it takes {", ".join(known)}.'
                f'{did_you_mean(str(option), known)}'
            )
        if not isinstance(value, str):
            raise RuleError(f'{where}: {option} must be a string, not {value!r}.')
    if 'config' in options:
        config = epath.Path(options['config'])
        options['config'] = str(config if config.is_absolute() else path.parent / config)
    try:
        return ConfigPreset(**options)
    except RuleError as e:
        raise RuleError(f'{where}: {e}') from e


def _preset_option(option: str, value: Any, default: Any) -> Any:
    if option == 'layers' and value in (None, 'none'):
        return None
    if isinstance(default, tuple | list):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BadValue(f'must be a list of strings, not {value!r}.')
        return tuple(value)
    if value is None and default is None:
        return None
    return _string(value)


_ESCAPES = {'\b': 'backspace', '\t': 'tab', '\n': 'newline', '\f': 'form feed', '\r': 'return'}


def _string(value: Any) -> str:
    if not isinstance(value, str):
        quoted = f"'{value}'" if isinstance(value, int | float) else repr(str(value))
        raise BadValue(f'must be a string, not {value!r}: write it quoted, {quoted}.')
    for char, name in _ESCAPES.items():
        if char in value:
            raise BadValue(
                f'{value!r} holds a {name} character: double quotes read {char!r} as one. '
                "Write regexes in single quotes ('\\b', '\\d+'), which keep backslashes."
            )
    return value


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        fix = f': write {str(value).strip()} without quotes' if _is_int(value) else ''
        raise BadValue(f'must be an integer, not {value!r}{fix}.')
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lstrip('-').isdigit()


def read_ints(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        parts = value.strip('()[] ').split(',') if isinstance(value, str) else []
        fix = ''
        if parts and all(_is_int(p) for p in parts):
            fix = f': write a list, [{", ".join(p.strip() for p in parts)}]'
        elif isinstance(value, list) and all(_is_int(v) or isinstance(v, int) for v in value):
            fix = (
                f': write the numbers without quotes, [{", ".join(str(v).strip() for v in value)}]'
            )
        raise BadValue(f'must be a list of integers, not {value!r}{fix}.')
    return tuple(value)


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        raise BadValue(f"must be a list of strings, not {value!r}: write ['{value}'].")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadValue(f'must be a list of strings, not {value!r}.')
    return tuple(_string(v) for v in value)


def read_dtype(value: Any) -> Any:
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
            raise BadValue(f"{value!r} is not a range 'start:stop' or 'start:stop:step'.")
        start, stop, step = (numbers + [None])[:3]
        return tuple(range(start or 0, numbers[1], step or 1))
    return read_ints(value)


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
            raise BadValue(
                f'index {value!r}: {part.strip()!r} is not an integer or a slice '
                "('start:stop:step'); write e.g. '[:32000]' or '[3, ::2]'."
            )
        out.append(numbers[0] if len(numbers) == 1 else slice(*numbers))
    return out[0] if len(out) == 1 else tuple(out)


def _mode(value: Any) -> str:
    value = _string(value)
    if value not in _MODES:
        raise BadValue(f'mode must be one of {_MODES}, not {value!r}.')
    return value


_FIELDS: dict[str, Callable[[Any], Any]] = {
    'pattern': _string,
    'replacement': _string,
    'replacements': _strings,
    'parts': _strings,
    'sizes': read_ints,
    'dtype': read_dtype,
    'axes': read_ints,
    'shape': read_ints,
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
    'split': (Split, ('pattern', 'replacements'), ('axis', 'sizes')),
    'concatenate': (Concatenate, ('parts', 'replacement'), ('axis',)),
    'lora': (LoraMerge, ('adapters',), ('mode',)),
}
_SHORTHAND = {'drop': 'pattern', 'fallback': 'pattern', 'lora': 'adapters'}
_PRESETS: dict[str, Callable[..., list[Rule]]] = {
    'from_pytorch': from_pytorch,
    'to_pytorch': to_pytorch,
}
