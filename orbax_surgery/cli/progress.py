"""What a running command shows on stderr: a status line, then a progress bar.

Light on purpose: `main` imports it before JAX, so the first status line comes
at once; rich and the sources are imported only when a bar starts.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

from orbax_surgery.units import format_bytes

if TYPE_CHECKING:
    import numpy as np
    from rich.progress import Task
    from rich.text import Text

    from orbax_surgery.arrays.expr import Source
    from orbax_surgery.arrays.regions import Region
    from orbax_surgery.sources.source import ArraySource

_KEY_WIDTH = 48


class Status:
    """One line on stderr saying what the command does now, rewritten in place.

    Shown only on a terminal (logs and pipes get no partial lines); `doing`
    is kept either way, for the message when the user interrupts.

    Example:
        >>> import io
        >>> status = Status(io.StringIO())
        >>> status.show('planning 3 arrays')
        >>> status.doing
        'planning 3 arrays'
    """

    def __init__(self, stream: TextIO | None = None, *, quiet: bool = False):
        self.doing = 'starting'
        self._stream = sys.stderr if stream is None else stream
        self._live = not quiet and self._stream.isatty()
        self._shown = False

    def show(self, doing: str) -> None:
        """Says what the command does now, e.g. 'planning 291 arrays'."""
        self.doing = doing
        if self._live:
            self._stream.write(f'\r\x1b[2K{doing}...')
            self._stream.flush()
            self._shown = True

    def clear(self) -> None:
        """Erases the line, before other output takes its place."""
        if self._shown:
            self._stream.write('\r\x1b[2K')
            self._stream.flush()
            self._shown = False


class Bar:
    """A running progress bar: bytes done, and the array being read now."""

    def __init__(self, progress: Any = None, task: Any = None):
        self._progress, self._task = progress, task

    def advance(self, nbytes: int) -> None:
        """Counts `nbytes` more bytes computed."""
        if self._progress is not None:
            self._progress.advance(self._task, nbytes)

    def reading(self, key: str) -> None:
        """Shows `key` as the array being read."""
        if self._progress is not None:
            self._progress.update(self._task, key=_shortened(key))


@contextmanager
def progress_bar(total: int, status: Status, *, quiet: bool) -> Iterator[Bar]:
    """A progress bar on stderr in binary units: bytes done / total, rate, time left, key.

    It takes the status line's place; with `quiet`, nothing is shown.
    """
    status.show('writing')
    if quiet:
        yield Bar()
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Bytes(ProgressColumn):
        def render(self, task: Task) -> Text:
            done, total = format_bytes(int(task.completed)), format_bytes(int(task.total or 0))
            return Text(f'{done} / {total}', style='progress.download')

    class Speed(ProgressColumn):
        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            shown = '?' if speed is None else f'{format_bytes(int(speed))}/s'
            return Text(shown, style='progress.data.speed')

    columns = (
        TextColumn('converting'),
        BarColumn(),
        Bytes(),
        Speed(),
        TimeRemainingColumn(),
        TextColumn('{task.fields[key]}'),
    )
    status.clear()
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task('converting', total=total, key='')
        yield Bar(progress, task)
        progress.update(task, completed=total, key='')


def watched(source: ArraySource, bar: Bar) -> ArraySource:
    """`source`, telling `bar` the key of each array it reads."""
    return _Watched(source, bar)


class _Watched:
    """An array source that reports each read's key, and otherwise is `source`."""

    def __init__(self, source: ArraySource, bar: Bar):
        self._source, self._bar = source, bar

    def __repr__(self) -> str:
        return repr(self._source)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)

    @property
    def arrays(self) -> Mapping[str, Source]:
        return self._source.arrays

    async def open(self, keys: Collection[str]) -> None:
        await self._source.open(keys)

    async def read(self, source: Source, region: Region) -> np.ndarray:
        self._bar.reading(source.key)
        return await self._source.read(source, region)


def _shortened(key: str) -> str:
    """`key`, its start cut to fit a column: the layer and leaf names stay.

    Example:
        >>> _shortened('model/language_model/decoder/layers/12/self_attn/q_proj/weight')
        '…model/decoder/layers/12/self_attn/q_proj/weight'
    """
    return key if len(key) <= _KEY_WIDTH else '…' + key[-(_KEY_WIDTH - 1) :]
