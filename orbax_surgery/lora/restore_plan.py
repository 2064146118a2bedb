"""Planning a LoRA restore: adapters alone, or onto a base, merged, attached or split."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import threadpoolctl

from orbax_surgery.errors import AmbiguousRuleError, SurgeryError
from orbax_surgery.keys import KeyPath, PyTree, flatten, nest
from orbax_surgery.lora.adapter import canonical
from orbax_surgery.lora.layout import LoraLayout
from orbax_surgery.lora.merge import MergeAdapters
from orbax_surgery.plan.plan import Plan
from orbax_surgery.plan.resolve import Rules, normalize_rules, resolve
from orbax_surgery.read.materialize import materialize_async, run_sync
from orbax_surgery.rules.rule import Entry, Rule, Target, Tree
from orbax_surgery.sources.namespaced import Namespaced
from orbax_surgery.sources.source import ArraySource

Mode = Literal['merge', 'attach', 'split', 'unmerge']
MODES = ('merge', 'attach', 'split', 'unmerge')
Prepared = tuple[Plan, ArraySource, Callable[[PyTree], Any]]


def plan_adapters(
    adapters: ArraySource,
    layout: LoraLayout,
    *,
    base: ArraySource | None,
    target: PyTree,
    mode: Mode,
    base_rules: Rules = (),
    adapter_rules: Sequence[Rule] = (),
) -> Prepared:
    """Plans restoring `adapters` (laid out as `layout`) alone, or onto `base` in `mode`.

    The one restore path of `LoraRestore` and of PEFT adapters: the base's keys
    go through `base_rules`, the adapter source's through `adapter_rules` (none
    when it holds the layout's keys already, as a `LoraSave` item does).

    Returns:
        The plan, the source it reads, and the function that shapes its result.
    """
    if base is None:
        target = layout.abstract_trainable() if target is None else target
        if not adapter_rules:
            return resolve(adapters.arrays, target, [_TargetSpelling()]), adapters, _same
        alone = Namespaced({'adapters': adapters})
        within = _Within('adapters', adapter_rules)
        return resolve(alone.arrays, target, [within, _TargetSpelling()]), alone, _same
    source = Namespaced({'base': base, 'adapters': adapters})
    finish: Callable[[PyTree], Any] = _same
    if mode in ('merge', 'unmerge'):
        sign = 1 if mode == 'merge' else -1
        rules = merge_rules(layout, base_rules=base_rules, adapter_rules=adapter_rules, sign=sign)
        if target is not None:
            _reject_adapter_keys(target, layout)
    else:
        rules = [
            _Within('base', normalize_rules(base_rules)),
            _Within('adapters', adapter_rules, wins=True),
            _TargetSpelling(),
        ]
        target = _with_adapters(target, layout)
        if mode == 'split':
            finish = layout.split
    return resolve(source.arrays, target, rules), source, finish


def merge_rules(
    layout: LoraLayout,
    *,
    base_rules: Rules = (),
    adapter_rules: Sequence[Rule] = (),
    sign: int = 1,
) -> list[Rule]:
    """Rules that merge adapters into a base, over `Namespaced({'base': ..., 'adapters': ...})`.

    The base's keys go through `base_rules`, the adapters' through
    `adapter_rules`; then every adapted weight becomes `W + sign * scale * A @ B`.
    Rules appended after these see the merged weights (e.g. `to_pytorch()`).
    """
    return [
        _Within('base', normalize_rules(base_rules)),
        _Within('adapters', adapter_rules, wins=True),
        MergeAdapters(layout, sign=sign),
        _TargetSpelling(),
    ]


def restore_planned(prepared: Prepared, max_inflight_bytes: int) -> PyTree:
    """Runs what `plan_adapters` planned, and shapes the result."""
    prepared[0].check()
    return run_sync(restore_planned_async(prepared, max_inflight_bytes))


async def restore_planned_async(prepared: Prepared, max_inflight_bytes: int) -> PyTree:
    """`restore_planned` in a running event loop, for a plan already checked."""
    plan, source, finish = prepared
    # Each shard's update is a thin matmul (inner size = rank) on the reading thread;
    # BLAS threads would only spin against TensorStore's decoders (measured: 1.4x slower).
    with threadpoolctl.threadpool_limits(limits=1, user_api='blas'):
        tree = await materialize_async(plan, source, max_inflight_bytes)
    return finish(tree)


def _same(tree: PyTree) -> PyTree:
    return tree


def _reject_adapter_keys(target: PyTree, layout: LoraLayout) -> None:
    keys = {canonical(k) for k in flatten(target)[0]}
    clash = sorted(keys & {k for a in layout.adapters for k in (a.a_key, a.b_key)})
    if clash:
        raise SurgeryError(
            f'The merge target holds adapter keys ({clash[0]!r}, ...); a merged restore returns '
            "weights without adapters. Use mode='attach' to fill them, or a target without them."
        )


def _with_adapters(target: PyTree, layout: LoraLayout) -> PyTree:
    """The target, or with the adapter keys it lacks added (then as nested dicts)."""
    if target is None:
        return None
    flat = flatten(target)[0]
    present = {canonical(k) for k in flat}
    missing = {
        k: v for k, v in flatten(layout.abstract_trainable(target))[0].items() if k not in present
    }
    if not missing:
        return target
    return nest({**{canonical(k): v for k, v in flat.items()}, **missing})


@dataclasses.dataclass(frozen=True)
class _Within:
    """Applies `rules` to the keys under `prefix/` only, then drops the prefix.

    With `wins`, a key that exists outside too is replaced (fully trained params
    in the adapter checkpoint replace the base's).
    """

    prefix: str
    rules: Sequence[Rule]
    wins: bool = False

    def __repr__(self):
        inner = ', '.join(map(repr, self.rules))
        if self.wins:
            return f'the {self.prefix} checkpoint, which holds the same key'
        return f'{self.prefix} checkpoint' + (f' rules [{inner}]' if inner else '')

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        head = self.prefix + '/'
        inside = {k[len(head) :]: e for k, e in tree.items() if k.startswith(head)}
        out = {k: e for k, e in tree.items() if not k.startswith(head)}
        for rule in self.rules:
            inside = rule.apply(inside, target)
        outside = {canonical(k): k for k in out}
        for key, entry in inside.items():
            clash = outside.get(canonical(key))
            if clash is not None and not self.wins:
                raise AmbiguousRuleError(
                    f'{key!r} comes from both the {self.prefix} and another checkpoint.'
                )
            if clash is not None:
                del out[clash]
            out[key] = entry
        return out


@dataclasses.dataclass(frozen=True)
class _TargetSpelling:
    """Renames keys to the target's spelling when they differ only by '/value'.

    An `nnx.State` target has a trailing '/value' on every key; adapters are
    saved without it, and a base may be saved either way.
    """

    def __repr__(self):
        return "keys spelled as the target's ('/value')"

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        wanted = {canonical(k): k for k in target}
        out = {}
        for key, entry in tree.items():
            spelled = wanted.get(canonical(key), key)
            out[spelled if spelled not in tree or spelled == key else key] = entry
        return out
