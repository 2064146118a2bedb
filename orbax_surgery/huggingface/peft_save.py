"""Writing this package's LoRA adapters as a PEFT adapter directory.

`save_peft_adapter` writes `adapter_config.json` and `adapter_model.safetensors`
so that `PeftModel.from_pretrained` loads them; `orbax_surgery.lora.peft` reads
such directories back.
"""

from __future__ import annotations

import collections
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from orbax_surgery.errors import SurgeryError
from orbax_surgery.huggingface.peft_format import CONFIG_FILE, WEIGHTS_FILE
from orbax_surgery.huggingface.safetensors_file import write_file
from orbax_surgery.keys import KeyPath, KeyPattern, PyTree, flatten
from orbax_surgery.lora.adapter import Adapter, canonical
from orbax_surgery.lora.handler import trainable_of
from orbax_surgery.lora.layout import LoraLayout
from orbax_surgery.plan.resolve import Rules, checked_rules, resolve
from orbax_surgery.rules.rule import Rule
from orbax_surgery.sources.safetensors import key_to_name


def save_peft_adapter(
    trainable: PyTree,
    layout: LoraLayout,
    directory: epath.PathLike,
    *,
    rules: Rules = (),
    embeddings: str | None = r'(.*/)?embedding',
    fan_in_fan_out: bool = False,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> None:
    """Writes adapters as a PEFT LoRA adapter directory, for `PeftModel.from_pretrained`.

    Each adapted weight goes through `rules` to its Hugging Face name and
    layout (`to_pytorch(...)` for a Flax model; none when the layout's keys
    are Hugging Face names already), and so do its factors: the factor holding
    the weight's output rows becomes `lora_B.weight` `(out, r)`, the other
    `lora_A.weight` `(r, in)`. Ranks and alphas differing between modules are
    written as `rank_pattern`/`alpha_pattern`; parameters trained in full are
    written whole and listed in `modules_to_save`.

    Args:
        trainable: The adapters and fully trained params (a trainable, joined
            or `nnx.state` tree); fully addressable arrays.
        layout: Their layout.
        directory: Where to write `adapter_config.json` and
            `adapter_model.safetensors` (created if missing).
        rules: Rules from the layout's keys to Hugging Face names.
        embeddings: Regex of layout weight keys that are embeddings (PEFT
            names their factors `lora_embedding_A/B`).
        fan_in_fan_out: The Hugging Face weights are stored `(in, out)`
            (GPT-2's Conv1D), as `to_pytorch(fan_in_fan_out=...)` writes them.
        base_model_name_or_path: Recorded in the config.
        task_type: Recorded in the config, e.g. 'CAUSAL_LM'.

    Example:
        >>> import tempfile, numpy as np
        >>> from orbax_surgery import LoraSpec, SafetensorsCheckpoint, to_pytorch
        >>> params = {'proj': {'kernel': np.zeros((4, 3), np.float32)}}
        >>> lora = LoraSpec(['proj/kernel'], rank=1, alpha=2).bind(params)
        >>> trainable = {'proj': {'kernel_lora_a': np.ones((4, 1), np.float32),
        ...                       'kernel_lora_b': np.ones((1, 3), np.float32)}}
        >>> out = tempfile.mkdtemp()
        >>> save_peft_adapter(trainable, lora, out, rules=to_pytorch())
        >>> stored = SafetensorsCheckpoint(out + '/adapter_model.safetensors').arrays
        >>> for key, array in stored.items():
        ...     print(key, array.shape)
        base_model/model/proj/lora_A/weight (1, 4)
        base_model/model/proj/lora_B/weight (3, 1)
    """
    flat = {canonical(k): v for k, v in flatten(trainable_of(trainable, layout))[0].items()}
    rules = checked_rules(rules)
    whole = {k: _host(flat[k]) for k in layout.trained}
    pushed_a = _push({**{a.key: _host(flat[a.a_key]) for a in layout.adapters}, **whole}, rules)
    pushed_b = _push({**{a.key: _host(flat[a.b_key]) for a in layout.adapters}, **whole}, rules)
    adapters = {a.key: a for a in layout.adapters}
    embedding = KeyPattern(embeddings, 'save_peft_adapter(embeddings=...)') if embeddings else None
    use_rslora = bool(layout.adapters) and all(a.rslora for a in layout.adapters)
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    kinds = set()
    saved_whole = set()
    for hf_key, (key, value_a) in pushed_a.items():
        if key not in adapters:
            tensors['base_model.model.' + key_to_name(hf_key)] = value_a
            saved_whole.add(_module_of(hf_key, key, 'parameter').rpartition('/')[2])
            continue
        adapter = adapters[key]
        module = _module_of(hf_key, key, 'weight')
        left, right = _factors_of(value_a, pushed_b[hf_key][1], adapter, hf_key)
        name = 'base_model.model.' + key_to_name(module)
        if embedding is not None and embedding.fullmatch(key):
            tensors[f'{name}.lora_embedding_A'] = left.T
            tensors[f'{name}.lora_embedding_B'] = right.T
        elif fan_in_fan_out:
            tensors[f'{name}.lora_A.weight'], tensors[f'{name}.lora_B.weight'] = left.T, right.T
        else:
            tensors[f'{name}.lora_A.weight'], tensors[f'{name}.lora_B.weight'] = right, left
        dotted = key_to_name(module)
        ranks[dotted] = adapter.rank
        same = adapter.rslora == use_rslora
        root = math.sqrt(adapter.rank) if use_rslora else adapter.rank
        alphas[dotted] = adapter.alpha if same else adapter.scale * root
        kinds.add(dotted.rsplit('.', 1)[-1])
    r = _most_common(ranks.values(), 8)
    alpha = _most_common(alphas.values(), r)
    config = {
        'peft_type': 'LORA',
        'task_type': task_type,
        'base_model_name_or_path': base_model_name_or_path,
        'r': r,
        'lora_alpha': _number(alpha),
        'target_modules': sorted(kinds),
        'rank_pattern': _patterns(ranks, r),
        'alpha_pattern': {k: _number(v) for k, v in _patterns(alphas, alpha).items()},
        'use_rslora': use_rslora,
        'fan_in_fan_out': fan_in_fan_out,
        'bias': 'none',
        'lora_dropout': 0.0,
        'modules_to_save': sorted(saved_whole) or None,
        'init_lora_weights': True,
        'inference_mode': True,
        'use_dora': False,
    }
    path = epath.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    write_file(path / WEIGHTS_FILE, dict(sorted(tensors.items())), {'format': 'pt'})
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + '\n')


def _host(value: Any) -> np.ndarray:
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        raise SurgeryError(
            'save_peft_adapter writes one file from one process, but an adapter is sharded '
            'across processes; gather it first (jax.experimental.multihost_utils.'
            'process_allgather).'
        )
    return np.asarray(value)


def _push(values: Mapping[KeyPath, np.ndarray], rules: Sequence[Rule]) -> dict:
    """`{new key: (old key, value)}`: each value sent through the rules, eagerly."""
    if not values:
        return {}
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in values.items()}
    plan = resolve(shapes, None, rules)
    plan.check()
    out = {}
    for step in plan.steps:
        if len(step.sources) != 1:
            raise SurgeryError(
                f'The rules make {step.key!r} from {list(step.sources)}; writing a PEFT '
                'adapter needs one Hugging Face tensor per adapted weight.'
            )
        out[step.key] = (step.sources[0], step.expr.eager(values))
    return out


def _module_of(hf_key: KeyPath, key: KeyPath, what: str) -> KeyPath:
    module, _, name = hf_key.rpartition('/')
    if not module or (what == 'weight' and name != 'weight'):
        raise SurgeryError(
            f'The rules name the {what} {key!r} {hf_key!r}, but PEFT needs '
            f"'<module>/{'weight' if what == 'weight' else '<name>'}'. Pass rules that give "
            'Hugging Face names (to_pytorch(...)).'
        )
    return module


def _factors_of(
    a: np.ndarray, b: np.ndarray, adapter: Adapter, hf_key: KeyPath
) -> tuple[np.ndarray, np.ndarray]:
    """`(L, R)` with the stored weight's update `scale * L @ R`, from pushed A and B."""
    r = adapter.rank
    as_is = a.ndim == b.ndim == 2 and a.shape[1] == r and b.shape[0] == r
    swapped = a.ndim == b.ndim == 2 and b.shape[1] == r and a.shape[0] == r
    if as_is == swapped:
        raise SurgeryError(
            f'{adapter.key!r} goes to {hf_key!r} with factors of shapes {a.shape} and '
            f'{b.shape}, from which PEFT factors (r={r}) cannot be told apart; PEFT adapters '
            'are written for 2-d weights with rank below both sizes.'
        )
    return (a, b) if as_is else (b, a)


def _most_common(values: Any, default: Any) -> Any:
    counts = collections.Counter(values)
    return max(counts, key=lambda v: (counts[v], v)) if counts else default


def _patterns(values: Mapping[str, Any], default: Any) -> dict[str, Any]:
    """PEFT patterns for the modules whose value is not `default`.

    A module name's last part when every module of that name shares the value
    (`{'v_proj': 2}`), else the escaped full name.
    """
    by_kind = collections.defaultdict(set)
    for name, value in values.items():
        by_kind[name.rsplit('.', 1)[-1]].add(value)
    out = {}
    for name, value in values.items():
        if value == default:
            continue
        kind = name.rsplit('.', 1)[-1]
        out[re.escape(kind) if by_kind[kind] == {value} else re.escape(name)] = value
    return out


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)
