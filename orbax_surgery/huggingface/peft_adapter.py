"""PEFT LoRA adapters read onto a model's keys, lazily, for merging or attaching."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from orbax_surgery.arrays import expr as ex
from orbax_surgery.errors import LoraMismatchError, SurgeryError, UnmatchedKeyError
from orbax_surgery.huggingface.peft_format import (
    AdaptedModule,
    check_all_placed,
    claimed,
    parse_tensors,
    read_config,
    source_keys,
    weights_file,
)
from orbax_surgery.keys import KeyPath, PyTree, did_you_mean, summarize
from orbax_surgery.lora.adapter import NAMINGS, Adapter, Naming, adapter_keys
from orbax_surgery.lora.layout import LoraLayout
from orbax_surgery.lora.restore_plan import MODES, Mode, Prepared, plan_adapters, restore_planned
from orbax_surgery.plan.plan import Plan
from orbax_surgery.plan.resolve import Rules, checked_rules
from orbax_surgery.read.materialize import DEFAULT_MAX_INFLIGHT_BYTES, check_budget
from orbax_surgery.rules.rule import Entry, Rule, Target, Tree
from orbax_surgery.rules.target import TargetLeaf, read_target
from orbax_surgery.sources.open import open_source
from orbax_surgery.sources.safetensors import SafetensorsCheckpoint, key_to_name
from orbax_surgery.sources.source import ArraySource


class PeftAdapter:
    """A PEFT LoRA adapter directory, mapped onto a model's keys (read lazily).

    Made by `read_peft_adapter`; restore it with `restore()`, or plan that
    with `plan()`.

    Attributes:
        directory: The adapter directory.
        config: Its `adapter_config.json`.
        layout: The adapters on the model's keys (rank, alpha and rsLoRA per
            weight; A as `in + (r,)`, B as `(r,) + out`), and in `trained`
            the tensors PEFT saved whole (`modules_to_save`).
        modules: For each adapted weight key, the PEFT module(s) adapting it.

    Example:
        >>> import json, tempfile, numpy as np
        >>> from orbax_surgery.huggingface.peft_format import CONFIG_FILE, WEIGHTS_FILE
        >>> from orbax_surgery.huggingface.safetensors_file import write_file
        >>> root = epath.Path(tempfile.mkdtemp())  # What PeftModel.save_pretrained writes:
        >>> write_file(root / WEIGHTS_FILE, {
        ...     'base_model.model.proj.lora_A.weight': np.ones((1, 4), np.float32),
        ...     'base_model.model.proj.lora_B.weight': np.ones((3, 1), np.float32)})
        >>> _ = (root / CONFIG_FILE).write_text(json.dumps({'r': 1, 'lora_alpha': 2}))
        >>> adapter = read_peft_adapter(root)  # No base, no rules: torch names and layout.
        >>> adapter.modules
        {'proj/weight': ('proj',)}
        >>> trainable = adapter.restore()
        >>> trainable['proj']['weight_lora_a'].shape, trainable['proj']['weight_lora_b'].shape
        ((3, 1), (1, 4))
    """

    def __init__(
        self,
        directory: epath.Path,
        config: Mapping[str, Any],
        source: SafetensorsCheckpoint,
        modules: Sequence[AdaptedModule],
        whole: Mapping[KeyPath, KeyPath],
        base: ArraySource | None,
        target: PyTree,
        base_rules: Sequence[Rule],
        templates: tuple[str, str],
    ):
        self.directory = directory
        self.config = dict(config)
        self._source = source
        self._modules = tuple(modules)
        self._whole = dict(whole)  # Hugging Face key -> adapter file key, saved whole.
        self._base = base
        self._target = target
        self._leaves: dict[KeyPath, TargetLeaf] = {} if target is None else read_target(target)[0]
        self._rules = tuple(base_rules)
        self._templates = templates
        self._base_tree = self._base_entries()
        mapped = self._mapped(self._source.arrays.__getitem__)
        self.layout: LoraLayout = mapped.layout
        self.modules: dict[KeyPath, tuple[str, ...]] = mapped.modules

    def __repr__(self):
        return f'PeftAdapter({str(self.directory)!r}, {len(self.layout.adapters)} adapters)'

    def __str__(self):
        return f'PEFT adapter {self.directory}\n{self.layout}'

    def plan(self, *, mode: Mode = 'merge') -> Plan:
        """The plan of `restore(mode=...)`, reading no array data."""
        return self._prepare(mode)[0]

    def restore(
        self, *, mode: Mode = 'merge', max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES
    ) -> PyTree:
        """Restores the adapter, alone or onto the base, per target shard.

        Modes (with a base), as `LoraRestore`'s: 'merge' gives the target with
        each adapted weight `W + scale * A @ B`; 'attach' the base with the
        adapters beside their weights; 'split' `(frozen, trainable)`;
        'unmerge' takes a merged base back. Without a base: the trainable
        tree (adapters and whole tensors) on the model's keys.
        """
        check_budget(max_inflight_bytes)
        return restore_planned(self._prepare(mode), max_inflight_bytes)

    def _prepare(self, mode: Mode) -> Prepared:
        if mode not in MODES:
            raise SurgeryError(f'PeftAdapter.restore: mode {mode!r} is not one of {MODES}.')
        if self._base is None and mode != 'merge':
            raise SurgeryError(
                f'PeftAdapter.restore(mode={mode!r}) needs a base: pass base=<the base '
                'checkpoint> to read_peft_adapter.'
            )
        target = self._target
        if self._base is None:
            target = self.layout.abstract_trainable(self._target)
        return plan_adapters(
            self._source,
            self.layout,
            base=self._base,
            target=target,
            mode=mode,
            base_rules=self._rules,
            adapter_rules=self.tensor_rules(with_base=self._base is not None),
        )

    @property
    def source(self) -> ArraySource:
        """The adapter's `adapter_model.safetensors`, opened."""
        return self._source

    def tensor_rules(self, *, with_base: bool = True) -> list[Rule]:
        """Rules that turn the PEFT tensors into the layout's A and B keys (see `merge_rules`)."""
        return [_PeftTensors(self, with_base=with_base)]

    def _base_entries(self) -> dict[KeyPath, Entry]:
        """The base's keys for the rules to see: the base's own, or stand-ins."""
        stand_ins: dict[KeyPath, ex.Expr] = {}
        for m in self._modules:
            left, right = m.factors(self._source.arrays.__getitem__)
            shape = (left.shape[0], right.shape[1])
            if self._base is None:
                stand_ins[m.weight] = ex.Source(m.weight, shape, left.dtype)
                continue
            found = self._base.arrays.get(m.weight)
            if found is None:
                raise UnmatchedKeyError(
                    f'PEFT module {key_to_name(m.name)!r} has an adapter, but the base has no '
                    f'{m.weight!r} for it to adapt.{did_you_mean(m.weight, self._base.arrays)} '
                    'Is this the base the adapter was made for?'
                )
            if found.shape != shape:
                raise LoraMismatchError(
                    f'PEFT module {key_to_name(m.name)!r}: its adapter ({m.a} {left.shape[::-1]}'
                    f', {m.b}) fits a weight of shape {shape}, but the base has {m.weight!r} '
                    f'of shape {found.shape}. Is this the base the adapter was made for?'
                )
        if self._base is not None:
            return {k: Entry(s) for k, s in self._base.arrays.items()}
        return {k: Entry(e) for k, e in stand_ins.items()}

    def _through_rules(self, lookup: Callable[[KeyPath], ex.Expr], side: int | None) -> Tree:
        """The base's keys after the rules, with factor `side` (or none) in place of weights."""
        tree = dict(self._base_tree)
        for key, stored in self._whole.items():
            tree[key] = Entry(lookup(stored))
        if side is not None:
            for m in self._modules:
                tree[m.weight] = Entry(m.factors(lookup)[side])
        for rule in self._rules:
            try:
                tree = rule.apply(tree, self._leaves)
            except SurgeryError as e:
                e.add_note(
                    f'while mapping the PEFT adapter {self.directory} through the base rules '
                    "(they see the base's keys, LoRA factors in place of adapted weights)"
                )
                raise
        return tree

    def _mapped(self, lookup: Callable[[KeyPath], ex.Expr]) -> _Mapped:
        """The adapter's tensors as the layout's keys, each an expression over `lookup`."""
        owner: dict[KeyPath, AdaptedModule] = {}
        for m in self._modules:
            owner.update(dict.fromkeys(source_keys(lookup(m.a)) | source_keys(lookup(m.b)), m))
        whole = {k for stored in self._whole.values() for k in source_keys(lookup(stored))}
        left = claimed(self._through_rules(lookup, 0), owner.keys())
        right = claimed(self._through_rules(lookup, 1), owner.keys())
        adapters, exprs, modules = [], {}, {}
        for key, expr in left.items():
            adapter, a, b = self._adapter(key, expr, right.get(key), owner)
            adapters.append(adapter)
            exprs[adapter.a_key], exprs[adapter.b_key] = a, b
            modules[key] = tuple(sorted({key_to_name(owner[s].name) for s in source_keys(expr)}))
        check_all_placed(self._modules, modules, self.directory)
        replaced, trained = {}, {}
        if self._whole:
            for key, expr in claimed(self._through_rules(lookup, None), whole).items():
                if key in modules:
                    replaced[key] = expr  # The weight PEFT saved beside its adapter.
                else:
                    trained[key] = expr
        layout = LoraLayout(
            adapters=tuple(sorted(adapters, key=lambda a: a.key)),
            trained={k: (e.shape, e.dtype) for k, e in sorted(trained.items())},
            templates=self._templates,
        )
        return _Mapped(layout, {**exprs, **trained}, replaced, modules)

    def _adapter(
        self,
        key: KeyPath,
        left: ex.Expr,
        right: ex.Expr | None,
        owner: Mapping[KeyPath, AdaptedModule],
    ) -> tuple[Adapter, ex.Expr, ex.Expr]:
        mods = {owner[s] for s in source_keys(left)}
        names = summarize([key_to_name(m.name) for m in mods])
        ranks = {(m.rank, m.alpha) for m in mods}
        if len(ranks) > 1:
            raise LoraMismatchError(
                f'The base rules stack PEFT modules {names} into {key!r}, but their ranks and '
                f'alphas differ ({sorted(ranks)}); one stacked weight takes one rank and alpha.'
            )
        ((rank, alpha),) = ranks
        nb = len(left.shape) - 2
        as_is = swapped = False
        if (
            right is not None
            and {owner[s] for s in source_keys(right)} == mods
            and len(right.shape) == len(left.shape)
            and nb >= 0
            and left.shape[:nb] == right.shape[:nb]
        ):
            as_is = left.shape[-1] == rank and right.shape[nb] == rank
            swapped = right.shape[-1] == rank and left.shape[nb] == rank
        if as_is == swapped or right is None:
            why = 'it is square with the rank as both sides' if as_is else 'the shapes do not fit'
            got = f'{right.describe()} {right.shape}' if right is not None else 'nothing'
            raise LoraMismatchError(
                f'The base rules make {key!r} from PEFT module(s) {names} in a way a low-rank '
                f'update cannot follow ({why}): the factors become {left.describe()} '
                f'{left.shape} and {got}. Rules that rename, transpose, cast or stack weights '
                'carry adapters; reshapes and concatenations do not.'
            )
        a, b = (left, right) if as_is else (right, left)
        shape = a.shape[:-1] + b.shape[nb + 1 :]
        leaf = self._leaves.get(key)
        if leaf is not None and leaf.shape is not None and leaf.shape != shape:
            raise LoraMismatchError(
                f'The adapter of PEFT module(s) {names} fits a weight of shape {shape} at '
                f'{key!r}, but the target has shape {leaf.shape} there.'
            )
        a_key, b_key = adapter_keys(key, self._templates)
        adapter = Adapter(
            key=key,
            a_key=a_key,
            b_key=b_key,
            shape=shape,
            rank=rank,
            alpha=alpha,
            rslora=bool(self.config.get('use_rslora', False)),
            batch_axes=nb,
            in_axes=1,
            dtype=np.dtype(a.dtype).name,
        )
        return adapter, a, b


@dataclasses.dataclass(frozen=True)
class _Mapped:
    layout: LoraLayout
    exprs: dict[KeyPath, ex.Expr]  # Trainable key -> expression.
    replaced: dict[KeyPath, ex.Expr]  # Adapted weight key -> the weight the adapter file holds.
    modules: dict[KeyPath, tuple[str, ...]]


@dataclasses.dataclass(frozen=True, eq=False)
class _PeftTensors:
    """Rule: a PEFT adapter file's tensors become the layout's keys (A, B, whole tensors)."""

    adapter: PeftAdapter
    with_base: bool

    def __repr__(self):
        return f'PEFT adapter {self.adapter.directory}'

    def apply(self, tree: Tree, target: Target) -> dict[KeyPath, Entry]:
        mapped = self.adapter._mapped(lambda key: tree[key].expr)
        out = {k: Entry(e, (self,)) for k, e in mapped.exprs.items()}
        if self.with_base:  # Else the weights PEFT saved beside embeddings stay unread.
            out.update({k: Entry(e, (self,)) for k, e in mapped.replaced.items()})
        return out


def read_peft_adapter(
    directory: epath.PathLike,
    *,
    base: epath.PathLike | ArraySource | None = None,
    target: PyTree = None,
    base_rules: Rules = (),
    naming: Naming = 'sibling',
) -> PeftAdapter:
    """Reads a PEFT LoRA adapter's config and tensor headers onto a model's keys.

    The adapter's modules follow the base's weights through `base_rules`: with
    `from_pytorch(...)` and a Flax `target`, the adapter of torch module
    `model.layers.0.self_attn.q_proj` lands on `layers_0/self_attn/q_proj/kernel`
    with `A = lora_A.weight.T` `(in, r)` and `B = lora_B.weight.T` `(r, out)`;
    with no rules it stays on `model/layers/0/self_attn/q_proj/weight` `(out, in)`
    with `A = lora_B.weight` and `B = lora_A.weight`. Ranks come from the
    tensors and are checked against `r`/`rank_pattern`; alphas come from
    `lora_alpha`/`alpha_pattern`, and `use_rslora` sets the scale. Tensors PEFT
    saved whole (`modules_to_save`) are `layout.trained`.

    Args:
        directory: Holds `adapter_config.json` and `adapter_model.safetensors`.
        base: The base checkpoint (Hugging Face safetensors or an Orbax item).
            Only headers are read here; `restore()` merges onto it. Without
            it the rules see only stand-ins for the adapted weights.
        target: The model's tree (abstract leaves, with shardings), as for
            restoring the base; None keeps the keys the rules give.
        base_rules: Rules from the base's keys to the target's.
        naming: Where adapters live beside their weight, as in `LoraSpec`.

    Raises:
        CheckpointNotFoundError: a file is missing.
        LoraMismatchError: the config disagrees with the tensors, the tensors
            with the base, or the rules cannot carry an adapter.
        SurgeryError: a PEFT feature that is not a low-rank update (DoRA, ...).

    Example:
        >>> import json, tempfile, numpy as np
        >>> from orbax_surgery import from_pytorch
        >>> from orbax_surgery.huggingface.peft_format import CONFIG_FILE, WEIGHTS_FILE
        >>> from orbax_surgery.huggingface.safetensors_file import write_file
        >>> root = epath.Path(tempfile.mkdtemp())
        >>> write_file(root / 'model.safetensors', {'proj.weight': np.zeros((3, 4), np.float32)})
        >>> (root / 'lora').mkdir()
        >>> write_file(root / 'lora' / WEIGHTS_FILE, {
        ...     'base_model.model.proj.lora_A.weight': np.ones((1, 4), np.float32),
        ...     'base_model.model.proj.lora_B.weight': np.ones((3, 1), np.float32)})
        >>> _ = (root / 'lora' / CONFIG_FILE).write_text(json.dumps({'r': 1, 'lora_alpha': 2}))
        >>> adapter = read_peft_adapter(root / 'lora', base=root,
        ...                             target={'proj': {'kernel': ...}}, base_rules=from_pytorch())
        >>> print(adapter.layout)
        LoRA layout: 1 adapters, 0 trained in full
          proj/kernel (4, 3): rank 1, scale 2, A (4, 1), B (1, 3)
        >>> adapter.restore()['proj']['kernel'][0].tolist()  # 0 + 2 * 1 * 1
        [2.0, 2.0, 2.0]
    """
    if isinstance(naming, str) and naming not in NAMINGS:
        raise SurgeryError(f'naming {naming!r} is not one of {sorted(NAMINGS)} or two templates.')
    directory = epath.Path(directory)
    config = read_config(directory)
    source = SafetensorsCheckpoint(weights_file(directory))
    modules, whole = parse_tensors(source, config, directory)
    templates = NAMINGS[naming] if isinstance(naming, str) else (naming[0], naming[1])
    return PeftAdapter(
        directory,
        config,
        source,
        modules,
        whole,
        None if base is None else open_source(base),
        target,
        checked_rules(base_rules),
        templates,
    )
