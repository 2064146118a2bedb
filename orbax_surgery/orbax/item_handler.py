"""The base of this package's handlers: an Orbax PyTree item, written by Orbax's handler."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from orbax_surgery.errors import SurgeryError
from orbax_surgery.keys import PyTree
from orbax_surgery.read.materialize import run_sync
from orbax_surgery.write.checksums import Recorder


class PyTreeItemHandler(ocp.AsyncCheckpointHandler):
    """Base of this package's handlers: an Orbax PyTree item, written by Orbax's handler.

    Subclasses say how args become what `ocp.PyTreeCheckpointHandler` writes
    (`async_save`) and how a restore reads it; saving synchronously, metadata,
    finalizing and closing are the PyTree handler's.
    """

    def __init__(self, *, use_ocdbt: bool = True):
        self._impl = ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt)

    def save(self, directory: epath.Path, item: Any = None, args: Any = None) -> None:
        async def save_and_commit() -> None:
            for commit in await self.async_save(directory, item, args=args) or []:
                commit.result()

        run_sync(save_and_commit())

    async def save_tree(
        self,
        directory: Any,
        item: PyTree,
        *,
        save_args: PyTree | None,
        custom_metadata: dict[str, Any] | None,
        checksums: bool,
    ) -> Any:
        """Saves `item` as Orbax's PyTree handler does, with its checksums if asked.

        The checksums are computed before this returns (the caller may then
        change the arrays) and written beside Orbax's files before it finalizes.
        """
        commits = []
        if checksums:
            recorder = Recorder()
            recorder.add_tree(item, save_args)
            commits.append(recorder.commit(directory))
        pytree = ocp.args.PyTreeSave(
            item=item, save_args=save_args, custom_metadata=custom_metadata
        )
        return commits + list(await self._impl.async_save(directory, args=pytree) or [])

    def metadata(self, directory: epath.Path) -> Any:
        """The stored tree, as Orbax's; `plan_restore(...).metadata()` gives it after surgery."""
        return self._impl.metadata(directory)

    def finalize(self, directory: epath.Path) -> None:
        self._impl.finalize(directory)

    def close(self) -> None:
        self._impl.close()


def reject_positional(item: Any, args_name: str) -> None:
    if isinstance(item, ocp.args.CheckpointArgs):
        raise SurgeryError(
            f'{type(item).__name__} was passed positionally; pass it as args={args_name}(...).'
        )


def args_repr(args: Any) -> str:
    """A `CheckpointArgs` dataclass in one short line: trees by leaf count, rules by name.

    Orbax puts args in its own error messages; a tree of arrays there would be
    printed whole.

    Example:
        >>> import numpy as np
        >>> from orbax_surgery import Rename, SurgeryRestore
        >>> SurgeryRestore(target={'w': np.zeros((512, 512))}, rules=[Rename('a', 'b')])
        SurgeryRestore(target=<1 leaf>, rules=[Rename(pattern='a', replacement='b')])
    """
    parts = []
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        if not field.init or not field.repr or _is_default(field, value):
            continue
        parts.append(f'{field.name}={_short(field.name, value)}')
    return f'{type(args).__name__}({", ".join(parts)})'


def _is_default(field: dataclasses.Field, value: Any) -> bool:
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        return False
    try:
        return bool(value == default) and type(value) is type(default)
    except Exception:  # An array compared with a default: not the default.
        return False


def _short(name: str, value: Any) -> str:
    if name == 'rules' and isinstance(value, tuple):
        shown = ', '.join(map(repr, value[:3]))
        return f'[{shown}{f", ... ({len(value)} rules)" if len(value) > 3 else ""}]'
    if isinstance(value, str | int | float | bool) or value is None:
        return repr(value)
    if callable(getattr(type(value), 'read', None)):  # A source: its own short repr.
        return repr(value)
    leaves = jax.tree.leaves(value)
    return f'<{len(leaves)} {"leaf" if len(leaves) == 1 else "leaves"}>'
