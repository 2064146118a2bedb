"""Putting a complete directory in place of its destination, never a partial one.

Exports and conversions write into a temporary sibling; `move_into_place`
then renames it to the destination. An existing destination is swapped with
the new result in one step where the system allows it (Linux
`renameat2(RENAME_EXCHANGE)`), so the destination path always holds a whole
result, old or new, even if the process is killed. Elsewhere the old
destination is first renamed aside: a kill between the two renames leaves no
destination and the old result beside it, which `replaced_siblings` finds.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import sys

from etils import epath

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def move_into_place(complete: epath.Path, destination: epath.Path, *, aside: str = '.old-') -> None:
    """Renames `complete` to `destination`; an old destination goes only after.

    Args:
        complete: The finished result, a sibling of `destination`.
        destination: Where it belongs.
        aside: Infix of the name the old destination has while it is replaced
            (where no atomic swap is available).

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
    if _exchange(complete, destination):
        old = complete  # The swap left the old result under the new one's temporary name.
    else:
        old = destination.parent / f'{destination.name}{aside}{secrets.token_hex(4)}'
        os.rename(destination, old)
        try:
            os.rename(complete, destination)
        except BaseException:
            os.rename(old, destination)
            raise
    try:
        _remove(old)
    except OSError as e:
        e.add_note(f'The new result is complete at {destination}; the old one is left at {old}.')
        raise


def replaced_siblings(destination: epath.Path, aside: str) -> list[epath.Path]:
    """Old results that a `move_into_place(..., aside=aside)` killed midway left beside it.

    Example:
        >>> import tempfile
        >>> root = epath.Path(tempfile.mkdtemp())
        >>> (root / 'out.replaced-1a2b').mkdir()
        >>> [p.name for p in replaced_siblings(root / 'out', '.replaced-')]
        ['out.replaced-1a2b']
    """
    return sorted(destination.parent.glob(f'{destination.name}{aside}*'))


def _exchange(a: epath.Path, b: epath.Path) -> bool:
    """Swaps two paths atomically; False where the system or filesystem cannot."""
    if not sys.platform.startswith('linux'):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # A libc without it (glibc < 2.28, musl < 1.2.?).
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # Not on this filesystem.
        return False
    raise OSError(code, f'Cannot swap {a} and {b}: {os.strerror(code)}', str(b))


def _remove(path: epath.Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)
