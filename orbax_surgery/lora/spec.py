"""What to adapt: which weights get LoRA adapters, with what rank and alpha.

A `LoraSpec` is what you write; `LoraSpec.bind(params)` checks it against a
model's parameters (shapes only) and returns the `LoraLayout`: every adapter
resolved to keys, shapes and a scale. The layout is what checkpoints record.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from orbax_surgery.arrays.regions import Shape
from orbax_surgery.errors import RuleError, ShapeMismatchError, UnmatchedKeyError
from orbax_surgery.keys import KeyPath, KeyPattern, PyTree, did_you_mean, summarize
from orbax_surgery.lora.adapter import NAMINGS, Adapter, Naming, adapter_keys, canonical_shapes
from orbax_surgery.lora.layout import LoraLayout
from orbax_surgery.rules.arguments import parse_int


@dataclasses.dataclass(frozen=True)
class LoraTarget:
    """Weights whose key fully matches `pattern`, and how to adapt them.

    A kernel's axes are read as `batch + in + out`: `batch_axes` leading axes of
    stacked (scanned) layers, each with its own adapter, then `in_axes` input
    axes, then the output axes. The adapters are `A: batch + in + (rank,)` and
    `B: batch + (rank,) + out`, and the update is `scale * A @ B`.

    Attributes:
        pattern: Regex, matched with `re.fullmatch` on the '/'-joined key path.
        rank: Adapter rank; None takes the spec's.
        alpha: LoRA alpha; None takes the spec's.
        in_axes: How many axes (after the batch axes) are inputs. 1 fits
            `nn.Dense`, `nnx.Linear`, embeddings and DenseGeneral q/k/v
            kernels `(d, heads, head_dim)`; 2 fits an output projection
            `(heads, head_dim, d)`.
        batch_axes: Leading stacked-layer axes, e.g. 1 for `(L, in, out)`.

    Example:
        >>> LoraTarget(r'.*/attn/out/kernel', in_axes=2)
        LoraTarget(pattern='.*/attn/out/kernel', rank=None, alpha=None, in_axes=2, batch_axes=0)
    """

    pattern: str = '.*'
    rank: int | None = None
    alpha: float | None = None
    in_axes: int = 1
    batch_axes: int = 0
    _re: KeyPattern = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, '_re', KeyPattern(self.pattern, repr(self)))
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise RuleError(f'{self!r}: rank must be a positive int, not {self.rank!r}.')
        in_axes = parse_int(self.in_axes, 'in_axes', repr(self))
        if in_axes < 1 or parse_int(self.batch_axes, 'batch_axes', repr(self)) < 0:
            raise RuleError(f'{self!r}: in_axes must be >= 1 and batch_axes >= 0.')


Targets = Sequence[str | LoraTarget] | Callable[[KeyPath, Shape], bool | LoraTarget | None]


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    r"""Which weights get adapters, and which other parameters train in full.

    Attributes:
        targets: Regexes or `LoraTarget`s, tried in order (the first match
            decides, so put specific overrides first); or a function of
            `(key, shape)` returning True, a `LoraTarget`, or False/None.
        rank: Default rank.
        alpha: Default alpha; None means `rank` (scale 1).
        rslora: Scale by `alpha / sqrt(rank)` (rsLoRA) instead of `alpha / rank`.
        train: Regexes of parameters trained in full and saved with the
            adapters (PEFT's `modules_to_save`), e.g. a new head.
        train_vectors: Also train every vector and scalar (biases, norm scales).
        naming: Where adapters live next to their weight: 'sibling'
            (`dense/kernel_lora_a`, as qwix names them in Linen), 'nnx'
            (`dense/lora/lora_a`, as in `nnx.LoRALinear`), or two templates
            using `{module}` (the key minus its last part), `{name}` (that
            part) and `{parent}` (the module minus its last part).
        dtype: Adapter dtype for new adapters.

    Example:
        >>> import numpy as np
        >>> spec = LoraSpec([r'.*/(query|value)/kernel'], rank=2, alpha=4)
        >>> params = {'attn': {'query': {'kernel': np.zeros((8, 8))},
        ...                    'value': {'kernel': np.zeros((8, 8))}}}
        >>> lora = spec.bind(params)
        >>> [a.a_key for a in lora.adapters], lora.adapters[0].scale
        (['attn/query/kernel_lora_a', 'attn/value/kernel_lora_a'], 2.0)
    """

    targets: Targets
    rank: int = 8
    alpha: float | None = None
    rslora: bool = False
    train: Sequence[str] = ()
    train_vectors: bool = False
    naming: Naming = 'sibling'
    dtype: Any = 'float32'

    _patterns: tuple[LoraTarget, ...] = dataclasses.field(
        init=False, default=(), repr=False, compare=False
    )

    def __post_init__(self):
        if isinstance(self.targets, str | LoraTarget):
            object.__setattr__(self, 'targets', (self.targets,))
        if not callable(self.targets):
            patterns = tuple(
                t if isinstance(t, LoraTarget) else LoraTarget(t) for t in self.targets
            )
            if not patterns:
                raise RuleError('LoraSpec needs at least one target pattern.')
            object.__setattr__(self, 'targets', patterns)
            object.__setattr__(self, '_patterns', patterns)
        if isinstance(self.train, str):
            object.__setattr__(self, 'train', (self.train,))
        object.__setattr__(self, 'train', tuple(self.train))
        for pattern in self.train:
            KeyPattern(pattern, f'LoraSpec(train={self.train!r})')
        if not isinstance(self.rank, int) or self.rank < 1:
            raise RuleError(f'LoraSpec: rank must be a positive int, not {self.rank!r}.')
        if isinstance(self.naming, str) and self.naming not in NAMINGS:
            raise RuleError(
                f'LoraSpec: naming {self.naming!r} is not one of {sorted(NAMINGS)} or a pair of '
                'templates.'
            )
        object.__setattr__(self, 'dtype', np.dtype(self.dtype).name)

    @property
    def templates(self) -> tuple[str, str]:
        return NAMINGS[self.naming] if isinstance(self.naming, str) else tuple(self.naming)  # type: ignore[return-value]

    def bind(self, params: PyTree) -> LoraLayout:
        """Resolves the spec against a model's parameters (shapes are enough).

        `params` may be concrete or abstract (`jax.eval_shape`), a Linen params
        dict, an `nnx.State` or a pure dict; it may already hold adapters (an
        NNX model built with `nnx.LoRALinear`), whose shapes are then checked.

        Raises:
            UnmatchedKeyError: a target pattern matches no weight.
            ShapeMismatchError: a weight has too few axes, or existing adapters
                do not fit their weight.
            RuleError: a rank larger than the weight's matrix.
        """
        shapes = canonical_shapes(params)
        templates = self.templates
        existing = _adapter_like(shapes, templates)
        weights = {k: v for k, v in shapes.items() if k not in existing}
        adapters: list[Adapter] = []
        chosen: set[int] = set()
        for key, (shape, dtype) in weights.items():
            target = self._target_for(key, shape)
            if target is not None:
                chosen.add(id(target))
                adapters.append(
                    self._adapter(key, shape, dtype, target, shapes, templates, existing)
                )
        self._check_every_pattern_used(weights, chosen)
        if not adapters:
            raise UnmatchedKeyError(
                f'LoraSpec targets match none of the {len(weights)} parameters '
                f'({summarize(weights)}).'
            )
        adapted = {a.key for a in adapters}
        train_res = [KeyPattern(p, f'LoraSpec(train={self.train!r})') for p in self.train]
        trained = []
        for key, (shape, _) in weights.items():
            if key in adapted:
                continue
            if any(r.fullmatch(key) for r in train_res) or (self.train_vectors and len(shape) <= 1):
                trained.append(key)
        for pattern, r in zip(self.train, train_res, strict=True):
            if not any(r.fullmatch(k) for k in weights):
                raise UnmatchedKeyError(
                    f'LoraSpec train pattern {pattern!r} matches none of the '
                    f'{len(weights)} parameters.{did_you_mean(pattern, weights)}'
                )
        return LoraLayout(
            adapters=tuple(adapters),
            trained={k: weights[k] for k in trained},
            templates=templates,
        )

    def _target_for(self, key: KeyPath, shape: Shape) -> LoraTarget | None:
        if callable(self.targets):
            chosen = self.targets(key, shape)
            if chosen is True:
                return LoraTarget()
            return chosen if isinstance(chosen, LoraTarget) else None
        return next((t for t in self._patterns if t._re.fullmatch(key)), None)

    def _adapter(
        self,
        key: KeyPath,
        shape: Shape,
        dtype: np.dtype,
        target: LoraTarget,
        shapes: Mapping[KeyPath, tuple[Shape, np.dtype]],
        templates: tuple[str, str],
        existing: set[KeyPath],
    ) -> Adapter:
        rank = target.rank or self.rank
        default = self.alpha if self.alpha is not None else rank  # alpha=0.0 is not None.
        alpha = float(target.alpha if target.alpha is not None else default)
        nb, ni = target.batch_axes, target.in_axes
        if len(shape) < nb + ni + 1:
            raise ShapeMismatchError(
                f'LoRA target {key!r} has shape {shape}, which has no room for {nb} batch '
                f'axes, {ni} input axes and an output axis; narrow the pattern (e.g. to '
                "'.*/kernel') or set in_axes/batch_axes."
            )
        fan_in, fan_out = math.prod(shape[nb : nb + ni]), math.prod(shape[nb + ni :])
        if rank > min(fan_in, fan_out):
            raise RuleError(
                f'LoRA rank {rank} for {key!r} is larger than its matrix: shape {shape} is '
                f'{fan_in} inputs x {fan_out} outputs per layer; use rank <= '
                f'{min(fan_in, fan_out)}.'
            )
        if not np.issubdtype(dtype, np.floating) and dtype.name != 'bfloat16':
            raise RuleError(f'LoRA target {key!r} has dtype {dtype}; adapters need floats.')
        a_key, b_key = adapter_keys(key, templates)
        adapter_dtype = np.dtype(self.dtype)
        adapter = Adapter(
            key=key,
            a_key=a_key,
            b_key=b_key,
            shape=shape,
            rank=rank,
            alpha=alpha,
            rslora=self.rslora,
            batch_axes=nb,
            in_axes=ni,
            dtype=adapter_dtype.name,
        )
        found = [shapes.get(a_key), shapes.get(b_key)]
        if any(found):
            return adapter.checked_against(found, 'the params')
        if existing:
            raise UnmatchedKeyError(
                f'The params hold adapters (e.g. {min(existing)!r}) but none for {key!r} at '
                f'{a_key!r}: that layer cannot train an adapter. Build it with '
                'nnx.LoRALinear, or narrow the target patterns.'
            )
        return adapter

    def _check_every_pattern_used(self, weights: Mapping[KeyPath, Any], chosen: set[int]):
        for target in self._patterns:
            if id(target) not in chosen:
                matches = [k for k in weights if target._re.fullmatch(k)]
                why = (
                    f'its matches {summarize(matches)} were taken by an earlier target'
                    if matches
                    else f'it matches none of the {len(weights)} parameters'
                    f'{did_you_mean(target.pattern, weights)}'
                )
                raise UnmatchedKeyError(f'LoRA target {target.pattern!r} adapts nothing: {why}')

    def to_json(self) -> dict[str, Any]:
        """The spec's settings, for the record (a target function as its name)."""
        targets: Any
        if callable(self.targets):
            targets = getattr(self.targets, '__name__', type(self.targets).__name__)
        else:
            targets = [
                {f.name: getattr(t, f.name) for f in dataclasses.fields(t) if f.init}
                for t in self._patterns
            ]
        return {
            'targets': targets,
            'rank': self.rank,
            'alpha': self.alpha,
            'rslora': self.rslora,
            'train': list(self.train),
            'train_vectors': self.train_vectors,
            'naming': list(self.templates),
            'dtype': self.dtype,
        }


def _adapter_like(shapes: Mapping[KeyPath, Any], templates: tuple[str, str]) -> set[KeyPath]:
    """Keys that are themselves adapters under this naming (never targets)."""
    found = set()
    for template in templates:
        pattern = re.escape(template)
        for part in ('{module}', '{parent}'):
            pattern = pattern.replace(re.escape(part) + '/', '(?:.*/)?')
            pattern = pattern.replace(re.escape(part), '.*')
        pattern = pattern.replace(re.escape('{name}'), '[^/]+')
        compiled = re.compile(pattern)
        found |= {k for k in shapes if compiled.fullmatch(k)}
    return found
