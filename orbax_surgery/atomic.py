"""Putting a complete directory in place of its destination, never a partial one.

Exports and conversions write into a temporary sibling; `move_into_place` then
renames it to the destination. An existing destination is moved aside first
and removed only once the new one is in place, so a failure at any point
leaves either the old result or the new one, whole.
"""

from __future__ import annotations

import os
import secrets
import shutil

from etils import epath


def move_into_place(complete: epath.Path, destination: epath.Path, *, aside: str = '.old-') -> None:
    """Renames `complete` to `destination`; an old destination goes only after.

    Args:
        complete: The finished result, a sibling of `destination`.
        destination: Where it belongs.
        aside: Infix of the name the old destination has while it is replaced.

    Example:
        >>> import tempfile
        >>> root = epath.Path(tempfile.mkdtemp())
        >>> (root / 'new').mkdir(); (root / 'out').mkdir()
        >>> move_into_place(root / 'new', root / 'out')
        >>> sorted(p.name for p in root.iterdir())
        ['out']
    """
    if not os.path.lexists(destination):
        os.rename(complete, destination)
        return
    old = destination.parent / f'{destination.name}{aside}{secrets.token_hex(4)}'
    os.rename(destination, old)
    try:
        os.rename(complete, destination)
    except BaseException:
        os.rename(old, destination)
        raise
    try:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old)
        else:
            os.remove(old)
    except OSError as e:
        e.add_note(f'The new result is complete at {destination}; the old one is left at {old}.')
        raise
