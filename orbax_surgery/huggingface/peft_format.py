"""PEFT's adapter directory: its config, its tensor names, and the modules they adapt."""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from etils import epath

from orbax_surgery.arrays import expr as ex
from orbax_surgery.arrays import ops
from orbax_surgery.errors import (
    CheckpointNotFoundError,
    LoraMismatchError,
    SourceReadError,
    SurgeryError,
    UnmatchedKeyError,
)
from orbax_surgery.keys import KeyPath, summarize
from orbax_surgery.rules.rule import Tree
from orbax_surgery.sources.safetensors import SafetensorsCheckpoint, key_to_name

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'
PREFIX = 'base_model/model/'
FACTORS = {  # key suffix -> (module kind, factor)
    'lora_A/weight': ('linear', 'A'),
    'lora_B/weight': ('linear', 'B'),
    'lora_embedding_A': ('embedding', 'A'),
    'lora_embedding_B': ('embedding', 'B'),
}
_MERGE_IT_IN_PEFT = (
    'Merge it with PEFT (`PeftModel.from_pretrained(...).merge_and_unload()`, then '
    '`save_pretrained`) and restore the merged model instead.'
)
_UNSUPPORTED = {  # config field -> what it is
    'use_dora': 'DoRA rescales every output column by lora_magnitude_vector, which is not '
    'a low-rank update',
    'lora_bias': 'lora_B carries a bias, which a low-rank update does not hold',
    'use_qalora': 'QALoRA pools the inputs of lora_A',
    'alora_invocation_tokens': 'activated LoRA applies the adapter only after its '
    'invocation tokens, which merged weights cannot do',
    'target_parameters': 'adapters on bare nn.Parameters (e.g. MoE experts) are not modules '
    'with a weight',
    'layer_replication': 'layer replication changes the base model',
    'trainable_token_indices': 'trainable tokens are not LoRA factors',
}


@dataclasses.dataclass(frozen=True)
class AdaptedModule:
    """One adapted torch module: its factors' keys in the adapter file, rank and alpha."""

    name: KeyPath  # The module path, '/'-joined, without 'base_model/model/'.
    kind: str  # 'linear', 'conv1d' (fan_in_fan_out, weight stored (in, out)) or 'embedding'.
    a: KeyPath
    b: KeyPath
    rank: int
    alpha: float

    @property
    def weight(self) -> KeyPath:
        return f'{self.name}/weight'

    def factors(self, lookup: Callable[[KeyPath], ex.Expr]) -> tuple[ex.Expr, ex.Expr]:
        """`(L, R)`: the stored weight's update is `scale * L @ R`."""
        a, b = lookup(self.a), lookup(self.b)
        if self.kind == 'linear':
            return b, a
        return ops.Transpose(a, (1, 0)), ops.Transpose(b, (1, 0))


def read_config(directory: epath.Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.exists():
        if not directory.is_dir():
            raise CheckpointNotFoundError(f'No PEFT adapter at {directory}: it does not exist.')
        named = sorted(p.name for p in directory.iterdir() if (p / CONFIG_FILE).exists())
        hint = (
            f' It has adapters in sub-directories {named}: pass one, e.g. '
            f'{str(directory / named[0])!r}.'
            if named
            else ' Is it a PEFT adapter saved with save_pretrained?'
        )
        raise CheckpointNotFoundError(f'{directory} holds no {CONFIG_FILE}.{hint}')
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise SourceReadError(f'{path} is not JSON: {e}') from e
    if not isinstance(config, dict):
        raise SourceReadError(f'{path} holds a {type(config).__name__}, not a JSON object.')
    kind = config.get('peft_type', 'LORA')
    if str(kind).upper() != 'LORA':
        raise SurgeryError(f'{path} is a {kind} adapter; only LoRA adapters (LORA) are read.')
    for field, why in _UNSUPPORTED.items():
        if config.get(field):
            raise SurgeryError(f'{path} sets {field}={config[field]!r}: {why}. {_MERGE_IT_IN_PEFT}')
    return config


def weights_file(directory: epath.Path) -> epath.Path:
    path = directory / WEIGHTS_FILE
    if path.exists():
        return path
    if (directory / 'adapter_model.bin').exists():
        raise CheckpointNotFoundError(
            f'{directory} holds adapter_model.bin (a pickle) but no {WEIGHTS_FILE}. Convert it: '
            '`safetensors.torch.save_file(torch.load(bin, weights_only=True), '
            f"'{WEIGHTS_FILE}', metadata={{'format': 'pt'}})`."
        )
    raise CheckpointNotFoundError(f'{directory} has {CONFIG_FILE} but no {WEIGHTS_FILE}.')


def parse_tensors(
    source: SafetensorsCheckpoint, config: Mapping[str, Any], directory: epath.Path
) -> tuple[list[AdaptedModule], dict[KeyPath, KeyPath]]:
    """The adapted modules and the tensors saved whole, from the tensor names."""
    factors: dict[KeyPath, dict[str, KeyPath]] = collections.defaultdict(dict)
    kinds: dict[KeyPath, str] = {}
    whole: dict[KeyPath, KeyPath] = {}
    where = directory / WEIGHTS_FILE
    for key in source.arrays:
        name = key.removeprefix(PREFIX)
        suffix = next((s for s in FACTORS if name.endswith('/' + s)), None)
        if suffix is not None:
            module = name[: -len(suffix) - 1]
            kinds[module], part = FACTORS[suffix]
            factors[module][part] = key
        elif name.endswith('lora_magnitude_vector') or name.endswith('lora_B/bias'):
            field = 'use_dora' if 'magnitude' in name else 'lora_bias'
            raise SurgeryError(f'{where} holds {key!r}: {_UNSUPPORTED[field]}. {_MERGE_IT_IN_PEFT}')
        elif any(p.startswith(('lora_', 'trainable_tokens')) for p in name.split('/')):
            raise SurgeryError(
                f'{where} holds {key!r}, which is not a LoRA factor this reader knows '
                f'(the suffixes are {list(FACTORS)}). {_MERGE_IT_IN_PEFT}'
            )
        else:
            whole[name.replace('/base_layer/', '/')] = key
    modules = []
    for module, parts in sorted(factors.items()):
        modules.append(_module(module, kinds[module], parts, source, config, where))
    if not modules:
        raise UnmatchedKeyError(
            f'{where} holds no LoRA factors (lora_A/lora_B) among its {len(source.arrays)} '
            f'tensors ({summarize(source.arrays)}).'
        )
    return modules, whole


def _module(
    name: KeyPath,
    kind: str,
    parts: Mapping[str, KeyPath],
    source: SafetensorsCheckpoint,
    config: Mapping[str, Any],
    where: epath.Path,
) -> AdaptedModule:
    if len(parts) < 2:
        (have,) = parts.values()
        other = 'B' if 'A' in parts else 'A'
        raise LoraMismatchError(
            f'{where} holds {have!r} but not lora_{other}, the other factor of PEFT module '
            f'{key_to_name(name)!r}: the file is incomplete.'
        )
    a, b = source.arrays[parts['A']], source.arrays[parts['B']]
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise SurgeryError(
            f'PEFT module {key_to_name(name)!r} has factors of shapes {a.shape} and {b.shape}: '
            'convolution adapters are not read yet. ' + _MERGE_IT_IN_PEFT
        )
    rank = a.shape[0]
    if b.shape[1] != rank:
        raise LoraMismatchError(
            f'PEFT module {key_to_name(name)!r}: {a.key!r} {a.shape} has rank {rank} but '
            f'{b.key!r} {b.shape} has rank {b.shape[1]}.'
        )
    dotted = key_to_name(name)
    want, why = _pattern_value(config, 'rank_pattern', 'r', 8, dotted)
    if want != rank:
        raise LoraMismatchError(
            f'{CONFIG_FILE} gives PEFT module {dotted!r} rank {want} ({why}), but its tensors '
            f'have rank {rank} ({a.key!r} {a.shape}, {b.key!r} {b.shape}): the config does not '
            'belong to these weights.'
        )
    alpha, _ = _pattern_value(config, 'alpha_pattern', 'lora_alpha', 8, dotted)
    if kind == 'linear' and config.get('fan_in_fan_out'):
        kind = 'conv1d'
    return AdaptedModule(name, kind, a.key, b.key, rank, float(alpha))


def _pattern_value(
    config: Mapping[str, Any], patterns: str, field: str, default: float, module: str
) -> tuple[Any, str]:
    """A module's rank or alpha as PEFT finds it: the first pattern matching a suffix."""
    for pattern, value in (config.get(patterns) or {}).items():
        if re.match(rf'(.*\.)?({pattern})$', module):
            return value, f'{patterns}[{pattern!r}]'
    return config.get(field, default), field


def claimed(tree: Tree, owned: Any) -> dict[KeyPath, ex.Expr]:
    """Keys made from owned sources; each must be made from them alone."""
    out = {}
    for key, entry in tree.items():
        keys = source_keys(entry.expr)
        mine = keys & set(owned)
        if not mine:
            continue
        if keys - mine:
            raise LoraMismatchError(
                f'The base rules make {key!r} from PEFT adapter tensors ({summarize(mine)}) and '
                f'base weights ({summarize(keys - mine)}) together, e.g. by concatenating '
                'adapted and unadapted weights; such a weight cannot take the adapter. Adapt '
                'all of them, or keep them apart in the target.'
            )
        out[key] = entry.expr
    return out


def source_keys(expr: ex.Expr) -> set[KeyPath]:
    """The stored keys an expression reads."""
    return {s.key for s in expr.sources()}


def check_all_placed(
    modules: Sequence[AdaptedModule],
    placed: Mapping[KeyPath, tuple[str, ...]],
    directory: epath.Path,
) -> None:
    """Every adapted module's adapter lands on some key of the target."""
    done = {n for names in placed.values() for n in names}
    lost = [key_to_name(m.name) for m in modules if key_to_name(m.name) not in done]
    if lost:
        raise UnmatchedKeyError(
            f'The base rules leave the weights of PEFT modules {summarize(lost)} (adapted in '
            f'{directory}) out of the target, so their adapters have nowhere to go. Put those '
            'weights in the target, or drop the adapters from the PEFT model.'
        )
