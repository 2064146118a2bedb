"""Where each adapter lives and what it does: the resolved, recordable LoRA layout.

A `LoraLayout` names, for every adapted weight, its two adapter keys, shapes,
rank, alpha and scale, plus the parameters trained in full. It is plain data
(JSON in a checkpoint's metadata, so nothing is re-typed at load time) and it
does the tree work of training with adapters: `init`, `merge`, `split`,
`join`, and an optimizer that leaves frozen weights without updates or state.
Trees come back as nested dicts (`nnx.to_pure_dict` form for NNX state).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from orbax_surgery.arrays.regions import Shape
from orbax_surgery.errors import LoraMismatchError, ShapeMismatchError, UnmatchedKeyError
from orbax_surgery.keys import SEP, KeyPath, PyTree, did_you_mean, flatten, key_name, nest
from orbax_surgery.lora.adapter import NAMINGS, Adapter, canonical


@dataclasses.dataclass(frozen=True, eq=False)
class LoraLayout:
    """Every adapter and fully trained parameter of a model, resolved.

    Made by `LoraSpec.bind(params)`; recorded by `LoraSave`.

    Attributes:
        adapters: One `Adapter` per adapted weight, in key order.
        trained: Parameters trained in full: `{key: (shape, dtype)}`.
        templates: The naming templates of the adapter keys.

    Example:
        >>> import jax, numpy as np
        >>> from orbax_surgery import LoraSpec
        >>> params = {'dense': {'kernel': np.ones((4, 6), np.float32)}}
        >>> lora = LoraSpec(['dense/kernel'], rank=2).bind(params)
        >>> print(lora)
        LoRA layout: 1 adapters, 0 trained in full
          dense/kernel (4, 6): rank 2, scale 1, A (4, 2), B (2, 6)
        >>> trainable = lora.init(params, jax.random.key(0))  # B = 0: starts as the base.
        >>> merged = lora.merge(params, trainable)  # Differentiable; use it in a loss.
        >>> bool((merged['dense']['kernel'] == 1).all())
        True
        >>> frozen, trainable = lora.split(lora.join(params, trainable))
        >>> sorted(trainable['dense'])
        ['kernel_lora_a', 'kernel_lora_b']
    """

    adapters: tuple[Adapter, ...]
    trained: Mapping[KeyPath, tuple[Shape, np.dtype]] = dataclasses.field(default_factory=dict)
    templates: tuple[str, str] = NAMINGS['sibling']

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoraLayout) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self.adapters)

    def __str__(self) -> str:
        lines = [f'LoRA layout: {len(self.adapters)} adapters, {len(self.trained)} trained in full']
        for a in self.adapters:
            lines.append(
                f'  {a.key} {a.shape}: rank {a.rank}, scale {a.scale:g}, A {a.a_shape}, '
                f'B {a.b_shape}'
            )
        lines += [f'  {k} {s}: trained in full' for k, (s, _) in self.trained.items()]
        return '\n'.join(lines)

    @functools.cached_property
    def trainable_keys(self) -> frozenset[KeyPath]:
        """The keys an adapter checkpoint holds: every A and B, and `trained`."""
        keys = {k for a in self.adapters for k in (a.a_key, a.b_key)}
        return frozenset(keys | set(self.trained))

    def abstract_trainable(self, base: PyTree = None) -> dict[str, Any]:
        """The trainable tree as `jax.ShapeDtypeStruct`s, to restore it into.

        With `base` (the model's target tree, with shardings) each `A` is sharded
        like its weight's input axes and each `B` like its output axes, so that
        every shard of `W + scale * A @ B` is computed where it lives; trained
        parameters take their base leaf's sharding.
        """
        shardings = _shardings(base)
        flat: dict[KeyPath, jax.ShapeDtypeStruct] = {}
        for a in self.adapters:
            spec_a, spec_b = _adapter_shardings(a, shardings.get(a.key))
            flat[a.a_key] = jax.ShapeDtypeStruct(a.a_shape, np.dtype(a.dtype), sharding=spec_a)
            flat[a.b_key] = jax.ShapeDtypeStruct(a.b_shape, np.dtype(a.dtype), sharding=spec_b)
        for key, (shape, dtype) in self.trained.items():
            flat[key] = jax.ShapeDtypeStruct(shape, dtype, sharding=shardings.get(key))
        return nest(dict(sorted(flat.items())))

    def init(self, params: PyTree, key: jax.Array, *, stddev: float = 0.01) -> dict[str, Any]:
        """New trainable params: `A ~ N(0, stddev²)`, `B = 0`, trained ones copied.

        With `B = 0` the adapted model starts equal to the base. Every `A` gets
        its own key folded from `key`.
        """
        flat = _canonical_flat(params)
        out: dict[KeyPath, Any] = {}
        for i, a in enumerate(self.adapters):
            dtype = jnp.dtype(a.dtype)
            sub = jax.random.fold_in(key, i)
            out[a.a_key] = (stddev * jax.random.normal(sub, a.a_shape, jnp.float32)).astype(dtype)
            out[a.b_key] = jnp.zeros(a.b_shape, dtype)
        for k in self.trained:
            out[k] = _needed(flat, k, 'params')
        return nest(dict(sorted(out.items())))

    def merge(self, params: PyTree, trainable: PyTree = None, *, sign: int = 1) -> dict[str, Any]:
        """`params` with every weight `W + sign * scale * A @ B`, adapters removed.

        `trainable` holds the adapters and fully trained params; without it they
        are read from `params` itself (a joined tree). Differentiable: use it in
        a Linen loss, `model.apply({'params': lora.merge(params, trainable)}, x)`.
        Computed in float32 (or wider) and cast back to each weight's dtype.
        """
        flat = _canonical_flat(params)
        extra = _canonical_flat(trainable) if trainable is not None else flat
        trainable = self.trainable_keys
        out = {k: v for k, v in flat.items() if k not in trainable or k in self.trained}
        for a in self.adapters:
            w = _needed(flat, a.key, 'params')
            wa, wb = _needed(extra, a.a_key, 'trainable'), _needed(extra, a.b_key, 'trainable')
            acc = jnp.promote_types(jnp.promote_types(w.dtype, wa.dtype), jnp.float32)
            delta = a.delta(jnp.asarray(wa, acc), jnp.asarray(wb, acc))
            out[a.key] = (jnp.asarray(w, acc) + sign * delta).astype(w.dtype)
        for k in self.trained:
            out[k] = _needed(extra, k, 'trainable')
        return nest(out)

    def unmerge(self, merged: PyTree, trainable: PyTree) -> dict[str, Any]:
        """The base back from merged weights: `W' - scale * A @ B`."""
        return self.merge(merged, trainable, sign=-1)

    def split(self, joined: PyTree) -> tuple[dict[str, Any], dict[str, Any]]:
        """`(frozen, trainable)` from a tree holding both (e.g. `nnx.state(model)`)."""
        flat = _canonical_flat(joined)
        trainable = self.trainable_keys
        keys = sorted(trainable)
        for k in keys:
            _needed(flat, k, 'the joined tree')
        frozen = {k: v for k, v in flat.items() if k not in trainable}
        return nest(frozen), nest({k: flat[k] for k in keys})

    def join(self, frozen: PyTree, trainable: PyTree) -> dict[str, Any]:
        """One tree from `split`'s two; trainable values win."""
        return nest({**_canonical_flat(frozen), **_canonical_flat(trainable)})

    def optimizer(self, tx: Any) -> Any:
        """`tx` for the trainable params only: frozen ones get no update and no state.

        Works on a joined tree (frozen leaves get `optax.set_to_zero()`, which
        keeps no state) and on a trainable-only tree. For NNX, pass
        `wrt=layout.nnx_filter` to `nnx.Optimizer` instead.
        """
        import optax

        trainable = self.trainable_keys

        def labels(params: PyTree) -> PyTree:
            def label(path: Sequence[Any], _: Any) -> str:
                key = canonical(SEP.join(key_name(p) for p in path))
                return 'train' if key in trainable else 'frozen'

            return jax.tree_util.tree_map_with_path(label, params)

        return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)

    @property
    def nnx_filter(self) -> Callable[[Sequence[Any], Any], bool]:
        """An NNX filter selecting the trainable params: `nnx.Optimizer(..., wrt=...)`."""
        trainable = self.trainable_keys

        def is_trainable(path: Sequence[Any], _: Any) -> bool:
            return canonical(SEP.join(str(p) for p in path)) in trainable

        return is_trainable

    def check_same(self, other: LoraLayout, where: str) -> None:
        """Raises `LoraMismatchError` naming the first adapter that differs."""
        mine = {a.key: a for a in self.adapters}
        theirs = {a.key: a for a in other.adapters}
        for key in sorted(mine.keys() | theirs.keys()):
            if key not in theirs:
                raise LoraMismatchError(
                    f'The given spec adapts {key!r}, but {where} has no adapter for it '
                    f'(it adapts {len(theirs)} weights).{did_you_mean(key, theirs)}'
                )
            if key not in mine:
                raise LoraMismatchError(
                    f'{where} adapts {key!r}, which the given spec does not.'
                    f'{did_you_mean(key, mine)}'
                )
            a, b = mine[key], theirs[key]
            for field in ('rank', 'alpha', 'rslora', 'batch_axes', 'in_axes', 'shape'):
                if getattr(a, field) != getattr(b, field):
                    raise LoraMismatchError(
                        f'Adapter of {key!r}: the given spec has {field}={getattr(a, field)!r} '
                        f'but {where} has {field}={getattr(b, field)!r}. Drop the spec to use '
                        'the saved one, or pass the one it was trained with.'
                    )
        if set(self.trained) != set(other.trained):
            raise LoraMismatchError(
                f'The given spec trains {sorted(self.trained)} in full, but {where} holds '
                f'{sorted(other.trained)}.'
            )

    def to_json(self) -> dict[str, Any]:
        return {
            'adapters': [a.to_json() for a in self.adapters],
            'trained': {k: [list(s), np.dtype(d).name] for k, (s, d) in self.trained.items()},
            'templates': list(self.templates),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LoraLayout:
        return cls(
            adapters=tuple(Adapter.from_json(a) for a in data['adapters']),
            trained={k: (tuple(s), jnp.dtype(d)) for k, (s, d) in data['trained'].items()},
            templates=(data['templates'][0], data['templates'][1]),
        )


def _canonical_flat(tree: PyTree) -> dict[KeyPath, Any]:
    return {canonical(k): v for k, v in flatten(tree)[0].items()}


def _needed(flat: Mapping[KeyPath, Any], key: KeyPath, where: str) -> Any:
    if key not in flat:
        raise UnmatchedKeyError(
            f'{key!r} is not in {where} ({len(flat)} keys).{did_you_mean(key, flat)}'
        )
    return flat[key]


def _shardings(base: PyTree) -> dict[KeyPath, jax.sharding.Sharding]:
    if base is None:
        return {}
    out = {}
    for key, leaf in flatten(base)[0].items():
        sharding = getattr(leaf, 'sharding', None)
        if isinstance(sharding, jax.sharding.Sharding):
            out[canonical(key)] = sharding
    return out


def _adapter_shardings(
    a: Adapter, sharding: jax.sharding.Sharding | None
) -> tuple[jax.sharding.Sharding | None, jax.sharding.Sharding | None]:
    """A follows the weight's batch and input axes, B its batch and output axes."""
    if sharding is None:
        return None, None
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (len(a.shape) - len(sharding.spec))
        nb, ni = a.batch_axes, a.in_axes
        spec_a = jax.sharding.PartitionSpec(*spec[: nb + ni], None)
        spec_b = jax.sharding.PartitionSpec(*spec[:nb], None, *spec[nb + ni :])
        return (
            jax.sharding.NamedSharding(sharding.mesh, spec_a),
            jax.sharding.NamedSharding(sharding.mesh, spec_b),
        )
    if sharding.is_fully_replicated:
        return sharding, sharding
    raise ShapeMismatchError(
        f'Cannot derive adapter shardings for {a.key!r} from its {type(sharding).__name__}; '
        'use a NamedSharding, or pass the adapters target explicitly.'
    )
