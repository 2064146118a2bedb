"""Bounded waits for every process of a multi-process job, by name.

`multihost_utils.sync_global_devices` runs a collective with no timeout: a
peer that hangs, or a host that vanishes without closing its connections,
holds the others forever. These barriers use the JAX coordination service
(`wait_at_barrier`), which gives up after a timeout, and turn its error into
a `PeerTimeoutError` that says what was left on disk.

A dead peer's missed heartbeats (`heartbeat_timeout_seconds` of
`jax.distributed.initialize`) also end a wait, early; but unless
`jax_enable_recoverability` is set, JAX then terminates every other process
(LOG(FATAL), SIGABRT) as well, whatever Python was doing.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax

from orbax_surgery.errors import PeerTimeoutError, SurgeryError

DEFAULT_PEER_TIMEOUT_SECS = 1200.0
"""As Orbax's `AsyncOptions.timeout_secs`: enough for the slowest process to finish its share."""


@dataclasses.dataclass(frozen=True)
class Barrier:
    """The barriers of one call of a multi-process operation, each waited for at most a timeout.

    Every process makes the same calls of `name` in the same order, so the
    n-th call has the same number (`call`) everywhere; barrier ids include it.

    Attributes:
        name: The operation, e.g. 'orbax_surgery.export'.
        call: Which call of `name` this is, counted per process from 1.
        timeout_secs: How long each wait lasts before it fails.
        process: This process's index.
        count: How many processes take part.

    Example:
        >>> barrier = Barrier.start('orbax_surgery.example', timeout_secs=5)
        >>> barrier.share('token'), barrier.wait('done', left='Nothing.')  # One process: no wait.
        ('token', None)
    """

    name: str
    call: int
    timeout_secs: float
    process: int
    count: int

    @classmethod
    def start(cls, name: str, *, timeout_secs: float) -> Barrier:
        """Numbers this process's next call of `name` (in the coordination service)."""
        if not timeout_secs > 0:
            raise SurgeryError(
                f'{name}: the peer timeout must be > 0 seconds, not {timeout_secs!r}.'
            )
        call = 1
        if jax.process_count() > 1:
            call = _client().key_value_increment(f'{name}/calls/{jax.process_index()}', 1)
        return cls(name, call, timeout_secs, jax.process_index(), jax.process_count())

    def share(self, value: str) -> str:
        """Process 0's `value`, on every process (waiting for it at most the timeout)."""
        if self.count == 1:
            return value
        key = f'{self.name}/{self.call}/shared'
        if self.process == 0:
            _client().key_value_set(key, value)
            return value
        start = time.monotonic()
        try:
            return _client().blocking_key_value_get(key, self._timeout_ms)
        except jax.errors.JaxRuntimeError as e:
            waited = time.monotonic() - start
            raise self.timed_out('shared', waited, _first_line(e), 'Nothing was written.') from e

    def wait(self, point: str, *, left: str) -> None:
        """Waits until every process reaches `point`; `left` says what a timeout leaves."""
        if self.count == 1:
            return
        start = time.monotonic()
        try:
            _client().wait_at_barrier(self._id(point), self._timeout_ms)
        except jax.errors.JaxRuntimeError as e:
            raise self.timed_out(point, time.monotonic() - start, _first_line(e), left) from e

    def timed_out(self, point: str, waited: float, detail: str, left: str) -> PeerTimeoutError:
        """The error for a wait at `point` that the coordination service ended with `detail`.

        It ends a wait at the timeout, or sooner once it finds a peer dead (no
        heartbeats for `jax.distributed.initialize(heartbeat_timeout_seconds=...)`).
        """
        return PeerTimeoutError(
            f'Process {self.process} gave up after {waited:.1f} s '
            f'(timeout {self.timeout_secs:g} s) at barrier {self._id(point)!r}: '
            f'not all of processes {list(range(self.count))} reached it. {left} '
            f'The coordination service said: {detail}'
        )

    def _id(self, point: str) -> str:
        return f'{self.name}.{self.call}.{point}'

    @property
    def _timeout_ms(self) -> int:
        return max(1, round(self.timeout_secs * 1000))


def _client() -> Any:
    from jax._src.distributed import global_state

    if global_state.client is None:
        raise RuntimeError('Several JAX processes but no jax.distributed client.')
    return global_state.client


def _first_line(e: BaseException) -> str:
    """The coordination service's message up to its first blank line (it goes on at length)."""
    return str(e).strip().split('\n\n')[0].replace('\n', ' ')
