"""Orbax v1: `LoraSave` and `LoraRestore` as checkpointables of v1's handler registry."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from orbax_surgery.keys import PyTree
from orbax_surgery.lora.handler import (
    LoraCheckpointHandler,
    LoraRestore,
    LoraSave,
    prepare_restore,
)
from orbax_surgery.lora.restore_plan import restore_planned_async
from orbax_surgery.orbax import v1_surface
from orbax_surgery.orbax.v1_handler import ItemCheckpointableHandler, register


class LoraCheckpointableHandler(ItemCheckpointableHandler):
    """Orbax v1's handler for `LoraSave` and `LoraRestore`.

    As `SurgeryCheckpointableHandler` (see `orbax_surgery.orbax.v1_handler`):
    registered when `orbax_surgery` is imported, chosen by the args' type,
    planning in v1's blocking part and merging each host's shards in the
    background.

    Example:
        >>> import tempfile, numpy as np
        >>> import orbax.checkpoint.experimental.v1 as ocp
        >>> from orbax_surgery import LoraRestore, LoraSave, LoraSpec
        >>> root = tempfile.mkdtemp()
        >>> params = {'w': np.ones((4, 6), np.float32)}
        >>> ocp.save_checkpointables(f'{root}/base', {'params': params})
        >>> lora = LoraSpec(['w'], rank=2, alpha=2).bind(params)
        >>> trainable = {'w_lora_a': np.ones((4, 2), np.float32),
        ...              'w_lora_b': np.full((2, 6), 0.5, np.float32)}
        >>> ocp.save_checkpointables(f'{root}/run', {
        ...     'adapters': LoraSave(item=trainable, lora=lora)})
        >>> merge = LoraRestore(base=f'{root}/base/params')
        >>> out = ocp.load_checkpointables(f'{root}/run', {'adapters': merge})
        >>> out['adapters']['w'][0].tolist()  # 1 + (2 / 2) * (0.5 + 0.5)
        [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    """

    save_type = LoraSave
    restore_type = LoraRestore

    def _item_handler(self) -> LoraCheckpointHandler:
        return LoraCheckpointHandler(use_ocdbt=v1_surface.use_ocdbt())

    def _planned(self, directory: Any, args: LoraRestore) -> Awaitable[PyTree]:
        prepared = prepare_restore(directory, args)
        prepared[0].check()
        return restore_planned_async(prepared, args.max_inflight_bytes)


register(LoraCheckpointableHandler)
