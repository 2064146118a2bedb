"""The Orbax v1 names this package uses, pinned in one place.

Orbax's next API, `orbax.checkpoint.experimental.v1`, is experimental: a
release may move or rename what `orbax_surgery.orbax.v1_handler` relies on.
Every such name is listed in `PINNED` and looked up once, here, when the
package is imported. If v1 is missing, or any pinned name is, the v1
integration is skipped (`REASON` says why, and a warning is logged) and the rest of
the package works as before; `tests/orbax/v1_surface_test.py` then fails with
the names that moved.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

from orbax_surgery.errors import SurgeryError

V1 = 'orbax.checkpoint.experimental.v1'

# (module, attribute): everything the integration touches. Internal (`_src`) names are
# ones v1's own handlers use and that have no public spelling in orbax-checkpoint 0.12.8.
PINNED: tuple[tuple[str, str], ...] = (
    (f'{V1}.handlers', 'register_handler'),
    (f'{V1}.handlers', 'global_registry'),
    (f'{V1}.handlers', 'PyTreeHandler'),
    (f'{V1}.multihost', 'sync_global_processes'),
    (f'{V1}.multihost', 'is_primary_host'),
    (f'{V1}._src.context.context', 'get_context'),
    (f'{V1}._src.synchronization.synchronization', 'get_operation_id'),
)

_log = logging.getLogger('orbax_surgery')


def _look_up(pinned: tuple[tuple[str, str], ...]) -> tuple[dict[str, Any], list[str], str | None]:
    """The pinned objects by attribute name, the names not found, and why."""
    try:
        importlib.import_module(V1)
    except ImportError as e:
        return {}, [f'{m}.{a}' for m, a in pinned], f'{V1} cannot be imported ({e})'
    found: dict[str, Any] = {}
    missing: list[str] = []
    for module_name, attribute in pinned:
        try:
            found[attribute] = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError):
            missing.append(f'{module_name}.{attribute}')
    reason = f'this Orbax lacks v1 names the integration uses: {missing}' if missing else None
    return found, missing, reason


_FOUND, MISSING, REASON = _look_up(PINNED)
AVAILABLE: bool = REASON is None
if not AVAILABLE:
    _log.warning(
        'Orbax v1 integration skipped (%s); SurgeryRestore and LoraRestore '
        'still work through Orbax v0 (CheckpointManager, ocp.Checkpointer).',
        REASON,
    )


def require(what: str) -> None:
    """Raises `SurgeryError` naming `what` when the v1 integration is unavailable."""
    if not AVAILABLE:
        raise SurgeryError(
            f'{what} needs Orbax v1 ({V1}), but {REASON}. Use Orbax v0 '
            '(CheckpointManager, ocp.Checkpointer) or an orbax-checkpoint release with v1.'
        )


def _get(name: str) -> Callable[..., Any]:
    require(f'Orbax v1 {name}')
    return _FOUND[name]


def register_handler(handler_type: type) -> None:
    """Adds `handler_type` to v1's global registry, once."""
    registry = _get('global_registry')()
    if all(entry is not handler_type for entry, _ in registry.get_all_entries()):
        _get('register_handler')(handler_type)


def pytree_handler() -> Any:
    """v1's own PyTree handler, for loads and metadata without surgery."""
    return _get('PyTreeHandler')()


def use_ocdbt() -> bool:
    """Whether the active v1 `Context` saves arrays in OCDBT (v1's default: yes)."""
    return bool(_get('get_context')().array_options.saving.use_ocdbt)


def primary_host() -> int | None:
    """The active v1 `Context`'s primary host (None: every host is primary)."""
    return _get('get_context')().multiprocessing_options.primary_host


def active_processes() -> set[int] | None:
    """The processes taking part in the active v1 `Context` (None: all)."""
    return _get('get_context')().multiprocessing_options.active_processes


def operation_id() -> str:
    """The id of the v1 save or load in progress, the same on every process."""
    return _get('get_operation_id')()


async def sync_processes(key: str, *, operation_id: str, processes: Any) -> None:
    """A barrier across `processes` (all if None), under v1's naming."""
    await _get('sync_global_processes')(key, operation_id=operation_id, processes=processes)


def is_primary_host(primary_host: int | None) -> bool:
    return bool(_get('is_primary_host')(primary_host))
