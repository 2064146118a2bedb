"""Orbax v1: `SurgeryRestore` and `SurgerySave` as checkpointables of v1's handler registry.

Orbax v1 (`orbax.checkpoint.experimental.v1`) builds each handler with no
arguments and picks it by asking every registered handler whether it can take
the object given (`is_handleable` to save, `is_abstract_handleable` to load).
So the args classes travel as they are: `SurgerySave` is the checkpointable
saved, `SurgeryRestore` the abstract checkpointable loaded, and
`SurgeryCheckpointableHandler` takes exactly those. It is registered with v1's
global registry when `orbax_surgery` is imported (a v1 `Context` copies that
registry when it is made, so it must be there first), and works wherever v1
resolves handlers: `load_checkpointables`, `save_checkpointables` and v1's
training `Checkpointer`.

Loading plans in v1's blocking part, so a bad rule raises there, before
anything runs in the background (v1 would report a background failure as an
"incompatible handler"); the background then reads each host's shards with the
same plan and reads as `SurgeryCheckpointHandler` (v0). Saving writes an
ordinary PyTree item through the same v0 writer, so v1's own `PyTreeHandler`
loads it too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, ClassVar

from orbax_surgery.errors import SurgeryError
from orbax_surgery.keys import PyTree
from orbax_surgery.orbax import v1_surface
from orbax_surgery.orbax.item_handler import PyTreeItemHandler
from orbax_surgery.orbax.surgery_handler import (
    SurgeryCheckpointHandler,
    SurgeryRestore,
    SurgerySave,
)
from orbax_surgery.read.materialize import materialize_async


class ItemCheckpointableHandler:
    """Base of the v1 handlers: a v0 item handler's saves and plans behind v1's protocol.

    Subclasses name their args classes, build their v0 item handler, and plan
    a restore (`_planned`), returning the awaitable that reads it.
    """

    save_type: ClassVar[type]
    restore_type: ClassVar[type]

    def _item_handler(self) -> PyTreeItemHandler:
        raise NotImplementedError

    def _planned(self, directory: Any, args: Any) -> Awaitable[PyTree]:
        raise NotImplementedError

    def _saves_in_background(self, args: Any) -> bool:
        """Whether the whole save runs once the directory exists (surgery on save)."""
        del args
        return False

    def is_handleable(self, checkpointable: Any) -> bool:
        return isinstance(checkpointable, self.save_type)

    def is_abstract_handleable(self, abstract_checkpointable: Any) -> bool:
        return isinstance(abstract_checkpointable, self.restore_type)

    async def save(self, directory: Any, checkpointable: Any) -> Awaitable[None]:
        """Starts writing; device arrays are copied to the host before this returns.

        With rules (`SurgerySave(rules=...)`), leaves are computed in the
        background instead, reading `item` as they go: keep its arrays alive
        (not donated) until the save finishes.
        """
        v1_surface.require(type(self).__name__)
        _check_type(checkpointable, self.save_type, 'saves')
        handler = self._item_handler()
        commits = None
        if not self._saves_in_background(checkpointable):
            commits = await handler.async_save(directory.path, args=checkpointable)
        key = f'orbax_surgery:{directory.path.name}'
        operation = v1_surface.operation_id()
        processes = v1_surface.active_processes()
        primary = v1_surface.is_primary_host(v1_surface.primary_host())

        async def finish() -> None:
            path = await directory.await_creation()
            done = commits
            if done is None:
                done = await handler.async_save(path, args=checkpointable)
            await asyncio.gather(*(asyncio.to_thread(c.result) for c in done or []))
            await v1_surface.sync_processes(
                f'{key}:written', operation_id=operation, processes=processes
            )
            if primary:  # Merges the processes' OCDBT files and writes metadata, as v1 does.
                await asyncio.to_thread(handler.finalize, path)
            await v1_surface.sync_processes(
                f'{key}:finalized', operation_id=operation, processes=processes
            )

        return finish()

    async def load(self, directory: Any, abstract_checkpointable: Any = None) -> Awaitable[PyTree]:
        """Plans now (raising any rule's error here); the awaitable reads the shards."""
        v1_surface.require(type(self).__name__)
        if abstract_checkpointable is None:  # As saved: what v1's own handler gives.
            return await v1_surface.pytree_handler().load(directory, None)
        _check_type(abstract_checkpointable, self.restore_type, 'loads')
        return self._planned(directory, abstract_checkpointable)

    async def metadata(self, directory: Any) -> Any:
        """The stored tree, as v1's `PyTreeHandler` describes it.

        v1 asks for metadata without an abstract checkpointable, so there are
        no rules to apply; `osurg.plan_restore(path, target, rules).metadata()`
        gives the tree after surgery.
        """
        v1_surface.require(type(self).__name__)
        return await v1_surface.pytree_handler().metadata(directory)


class SurgeryCheckpointableHandler(ItemCheckpointableHandler):
    """Orbax v1's handler for `SurgerySave` and `SurgeryRestore`.

    Example:
        >>> import tempfile, numpy as np
        >>> import orbax.checkpoint.experimental.v1 as ocp
        >>> from orbax_surgery import Rename, SurgeryRestore, SurgerySave
        >>> path = tempfile.mkdtemp() + '/step_1'
        >>> ocp.save_checkpointables(path, {'params': SurgerySave(item={'w': np.ones(2)})})
        >>> args = SurgeryRestore(target={'W': ...}, rules=[Rename('w', 'W')])
        >>> ocp.load_checkpointables(path, {'params': args})['params']['W'].tolist()
        [1.0, 1.0]
    """

    save_type = SurgerySave
    restore_type = SurgeryRestore

    def _item_handler(self) -> SurgeryCheckpointHandler:
        return SurgeryCheckpointHandler(use_ocdbt=v1_surface.use_ocdbt())

    def _saves_in_background(self, args: SurgerySave) -> bool:
        return args.planned is not None

    def _planned(self, directory: Any, args: SurgeryRestore) -> Awaitable[PyTree]:
        plan, source = self._item_handler().plan_restore(directory, args)
        return materialize_async(plan, source, args.max_inflight_bytes)


def _check_type(args: Any, expected: type, verb: str) -> None:
    if not isinstance(args, expected):
        raise SurgeryError(
            f'This handler {verb} only {expected.__name__}, not {type(args).__name__}; '
            'Orbax v1 chooses it by that type.'
        )


def register(handler_type: type[ItemCheckpointableHandler]) -> bool:
    """Registers `handler_type` with Orbax v1's global registry; False without v1."""
    if not v1_surface.AVAILABLE:
        return False
    v1_surface.register_handler(handler_type)
    return True


# Part of registering with Orbax, like `register_with_handler` for v0.
register(SurgeryCheckpointableHandler)
