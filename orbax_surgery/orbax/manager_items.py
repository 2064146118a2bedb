"""One `CheckpointManager` item restored with Orbax's args and with this package's.

A `CheckpointManager` hands each item to the handler of the first args it sees
for it: an item saved with `StandardSave` then refuses `SurgeryRestore` in the
same manager ('does not match with any registered handler'), although Orbax's
handler registry can map one item to several args types. `allow()`, run when
this package is imported, wraps that one lookup
(`CompositeCheckpointHandler._get_or_set_handler`): where Orbax would refuse
args of this package's own types, the item gets this package's handler for
them as well. Orbax's answer for every other lookup, and for every other args
type, is unchanged, and no file of Orbax's is edited. `disallow()` undoes it.
"""

from __future__ import annotations

import functools
from typing import Any

import orbax.checkpoint as ocp

_WRAPPED = '_orbax_surgery_original'


def allow() -> bool:
    """Lets items take this package's args beside Orbax's; False if Orbax moved the lookup.

    Example:
        >>> import tempfile, numpy as np, orbax.checkpoint as ocp
        >>> import orbax_surgery as osurg
        >>> with ocp.CheckpointManager(tempfile.mkdtemp()) as manager:
        ...     _ = manager.save(1, args=ocp.args.StandardSave({'w': np.ones(2)}))
        ...     manager.wait_until_finished()
        ...     out = manager.restore(1, args=osurg.SurgeryRestore(rules=[osurg.Rename('w', 'W')]))
        >>> out['W'].tolist()
        [1.0, 1.0]
    """
    handler_class = ocp.handlers.CompositeCheckpointHandler
    original = getattr(handler_class, '_get_or_set_handler', None)
    if original is None:
        return False
    if hasattr(original, _WRAPPED):
        return True

    @functools.wraps(original)
    def get_or_set_handler(self: Any, item_name: str, args: Any) -> Any:
        try:
            return original(self, item_name, args)
        except ValueError:
            if not _is_ours(args):
                raise
            handler = ocp.args.get_registered_handler_cls(args)()
            self._handler_registry.add(item_name, type(args), handler)  # noqa: SLF001
            return handler

    setattr(get_or_set_handler, _WRAPPED, original)
    handler_class._get_or_set_handler = get_or_set_handler
    return True


def disallow() -> None:
    """Puts Orbax's own lookup back: an item then takes only its first handler's args."""
    handler_class = ocp.handlers.CompositeCheckpointHandler
    original = getattr(handler_class._get_or_set_handler, _WRAPPED, None)
    if original is not None:
        handler_class._get_or_set_handler = original


def _is_ours(args: Any) -> bool:
    return isinstance(args, ocp.args.CheckpointArgs) and type(args).__module__.startswith(
        'orbax_surgery.'
    )
