"""`orbax-surgery convert`: a plan written as an Orbax item, a manager's step or safetensors.

What it writes appears only when complete; when interrupted, it says what it
left and what removes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import orbax.checkpoint as ocp
from etils import epath

from orbax_surgery import locations
from orbax_surgery.cli.commands import REPLACED, Planned, planned, use_cpu
from orbax_surgery.cli.listing import item_path
from orbax_surgery.cli.progress import Bar, Status, progress_bar, watched
from orbax_surgery.errors import DestinationExistsError
from orbax_surgery.huggingface.export import DEFAULT_MAX_SHARD_SIZE, save_safetensors
from orbax_surgery.keys import nest
from orbax_surgery.orbax.surgery_handler import SurgeryCheckpointHandler, SurgerySave
from orbax_surgery.plan.plan import Plan, Step
from orbax_surgery.read.materialize import DEFAULT_MAX_INFLIGHT_BYTES
from orbax_surgery.units import format_bytes
from orbax_surgery.write.atomic import move_into_place, replaced_siblings

_PARTIAL = '.converting-'
_NOTHING = 'nothing was written'


@dataclasses.dataclass(frozen=True)
class Written:
    """What a convert wrote: its summary line, and with `--json` its JSON (plus `written`)."""

    destination: str
    format: str
    step: int | None
    arrays: int
    bytes: int
    seconds: float

    def __str__(self) -> str:
        where = self.destination if self.step is None else f'step {self.step} of {self.destination}'
        kind = 'Orbax checkpoint' if self.format == 'orbax' else 'safetensors'
        return (
            f'Wrote {where} ({kind}): {self.arrays} arrays, {format_bytes(self.bytes)} in '
            f'{self.seconds:.1f} s.'
        )


def convert_command(args: argparse.Namespace, status: Status) -> int:
    src, location = locations.absolute(args.src), locations.absolute(args.dst)
    if args.dst_step is not None:  # Another step of the source's own manager is fine.
        written = _convert_to_step(args, location, status)
    elif location == src or location.startswith(src.rstrip('/') + '/'):
        raise DestinationExistsError(
            f'{location} is the source or inside it; write somewhere else.'
        )
    elif locations.is_url(location):
        written = _convert_to_url(args, location, status)
    else:
        written = _convert_to_directory(args, epath.Path(location), status)
    if written is None:
        return 1
    status.clear()
    if args.json:
        print(json.dumps({'written': True, **dataclasses.asdict(written)}, indent=2))
    elif not args.quiet:
        print(written)
    return 0


def _convert_to_directory(
    args: argparse.Namespace, dst: epath.Path, status: Status
) -> Written | None:
    """Writes beside `dst`, then moves the complete result into place."""
    if os.path.lexists(dst) and not args.overwrite:
        raise DestinationExistsError(
            f'{dst} exists; convert leaves it untouched. Choose another destination, or pass '
            '--overwrite to replace it once the new one is complete.'
        )
    with _noted_on_interrupt(lambda: _NOTHING):
        planned = _planned_to_write(args, status)
    if planned is None:
        return None
    partial = dst.parent / f'{dst.name}{_PARTIAL}{secrets.token_hex(4)}'
    moved = False
    try:
        _remove_leftovers(dst, quiet=args.quiet)
        dst.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        with progress_bar(_nbytes(planned.plan), status, quiet=args.quiet) as bar:
            if args.to == 'orbax':
                _write_orbax(partial, planned, args, bar)
            else:
                _write_safetensors(planned, str(partial), args, bar)
        status.show(f'moving the result to {dst}')
        move_into_place(partial, dst, aside=REPLACED)
        moved = True
        for old in replaced_siblings(dst, REPLACED):  # Kept until now, in case this one failed.
            if not args.quiet:
                print(f'Removing {old}, left by an interrupted --overwrite.', file=sys.stderr)
            shutil.rmtree(old)
    except BaseException as e:
        if not moved:
            _discard(dst.parent.glob(f'{partial.name}*'))
        if isinstance(e, KeyboardInterrupt):
            e.add_note(_left_in_directory(dst, moved))
        raise
    return _written(dst, args, planned.plan, None, start)


def _left_in_directory(dst: epath.Path, moved: bool) -> str:
    """What an interrupted convert to `dst` leaves, and what the user does about it."""
    if moved:
        return f'{dst} is complete (an old one beside it goes with the next convert to it)'
    leftovers = sorted(dst.parent.glob(f'{dst.name}{_PARTIAL}*'))
    aside = replaced_siblings(dst, REPLACED)
    if aside and not os.path.lexists(dst):
        return f'the previous {dst} is at {aside[-1]}: mv {aside[-1]} {dst}, or convert again'
    if leftovers:
        shown = ', '.join(map(str, leftovers))
        return f'left {shown}, which the next convert to {dst} removes (or rm -r it now)'
    return f'{_NOTHING} ({dst} is {"unchanged" if os.path.lexists(dst) else "not created"})'


def _discard(paths: Iterator[epath.Path]) -> None:
    """Removes what a failed convert wrote, as far as it can; the next convert does the rest."""
    for path in list(paths):
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _noted_on_interrupt(note: Callable[[], str]) -> Iterator[None]:
    """Adds `note()` (what was left, what to do) to a KeyboardInterrupt, for its message."""
    try:
        yield
    except KeyboardInterrupt as e:
        e.add_note(note())
        raise


def _planned_to_write(args: argparse.Namespace, status: Status) -> Planned | None:
    """A convert's plan, on the CPU, with the target the writers need (what the rules
    give, spelled out, when none is given); None, its errors printed, if it has any."""
    use_cpu()
    plan = planned(args, status)
    if _has_errors(plan.plan, args, status):
        return None
    if plan.target is None:
        plan = dataclasses.replace(plan, target=nest(dict.fromkeys(plan.plan.target_keys, ...)))
    return plan


def _write_safetensors(
    planned: Planned, location: str, args: argparse.Namespace, bar: Bar, *, overwrite: bool = False
) -> None:
    """Writes the planned conversion as safetensors at `location`, as `args` ask."""
    save_safetensors(
        watched(planned.source, bar),
        location,
        target=planned.target,
        rules=planned.rules,
        max_shard_size=args.max_shard_size or DEFAULT_MAX_SHARD_SIZE,
        max_inflight_bytes=args.max_inflight_bytes or DEFAULT_MAX_INFLIGHT_BYTES,
        progress=bar.advance,
        checksums=args.checksums,
        overwrite=overwrite,
        config=planned.hf_config,
    )


def _has_errors(plan: Plan, args: argparse.Namespace, status: Status) -> bool:
    """Prints a plan's errors (and with --json their JSON on stdout); convert then stops."""
    if not plan.errors:
        return False
    status.clear()
    print(f'orbax-surgery convert: the plan has {len(plan.errors)} error(s):', file=sys.stderr)
    errors = [f'{type(e).__name__}: {e}' for e in plan.errors]
    for i, error in enumerate(errors, 1):
        print(f'  {i}. {error}', file=sys.stderr)
    print('Nothing was written. `orbax-surgery plan` shows the whole plan.', file=sys.stderr)
    if args.json:
        print(json.dumps({'written': False, 'errors': errors}, indent=2))
    return True


def _convert_to_url(args: argparse.Namespace, location: str, status: Status) -> Written | None:
    """Converts into object storage, finalized there as Orbax and the export finalize.

    No rename exists there: Orbax writes its commit file last, the export its
    index (or its one file) last; what an interrupted convert leaves is never
    read as a checkpoint, and the next convert to `location` replaces it.
    """
    shown = locations.shown(location)
    if not locations.is_cloud(location):
        raise DestinationExistsError(f'{shown} is on an HTTP server, which is read-only here.')
    dst = epath.Path(location)
    if args.to == 'orbax' and dst.exists():
        if not args.overwrite and (dst / 'commit_success.txt').exists():
            raise DestinationExistsError(
                f'{shown} exists; convert leaves it untouched. Choose another destination, '
                'or pass --overwrite to replace it (in object storage the old one goes first).'
            )
        if not args.quiet:
            print(f'Removing {shown} first, to write it anew.', file=sys.stderr)
        dst.rmtree()
    with _noted_on_interrupt(lambda: _NOTHING):
        planned = _planned_to_write(args, status)
    if planned is None:
        return None
    start = time.monotonic()
    last = 'commit_success.txt' if args.to == 'orbax' else 'index'
    incomplete = f'{shown} is incomplete (no {last}), which the next convert to it replaces'
    with _noted_on_interrupt(lambda: incomplete):
        with progress_bar(_nbytes(planned.plan), status, quiet=args.quiet) as bar:
            if args.to == 'orbax':
                _write_orbax(dst, planned, args, bar)
            else:
                _write_safetensors(planned, location, args, bar, overwrite=args.overwrite)
    return _written(shown, args, planned.plan, None, start)


def _convert_to_step(args: argparse.Namespace, location: str, status: Status) -> Written | None:
    """Converts into step `--dst-step` of the CheckpointManager directory `location`.

    The manager finalizes the step as Orbax does (a temporary directory renamed,
    or a commit file in object storage) and records its metadata, so the step is
    complete or absent; other steps are left alone.
    """
    if args.to != 'orbax':
        raise DestinationExistsError(
            '--dst-step writes a step of an Orbax CheckpointManager; safetensors have no '
            'steps. Leave out --dst-step, or pass --to orbax.'
        )
    shown = locations.shown(location)
    if args.dst_step < 0:
        raise DestinationExistsError(f'--dst-step is a step number >= 0, not {args.dst_step}.')
    with _noted_on_interrupt(lambda: _NOTHING):
        planned = _planned_to_write(args, status)
    if planned is None:
        return None
    step_dir = locations.join(location, str(args.dst_step))
    src = item_path(locations.absolute(args.src), step=args.step, item=args.item)
    if str(src).rstrip('/').startswith(step_dir.rstrip('/') + '/') or str(src) == step_dir:
        raise DestinationExistsError(
            f'{locations.shown(step_dir)} is the source or holds it; write another --dst-step.'
        )
    start = time.monotonic()
    items = {'item_names': (args.dst_item,)} if args.dst_item else {}
    with ocp.CheckpointManager(location, **items) as manager:
        if args.dst_step in manager.all_steps():
            if not args.overwrite:
                raise DestinationExistsError(
                    f'{shown} has step {args.dst_step} already (steps: '
                    f'{manager.all_steps()}); convert leaves it untouched. Choose another '
                    '--dst-step, or pass --overwrite to replace it (the old step goes first).'
                )
            if not args.quiet:
                print(f'Removing step {args.dst_step} of {shown} first.', file=sys.stderr)
            manager.delete(args.dst_step)
        with _noted_on_interrupt(lambda: _unfinalized(location, args.dst_step)):
            with progress_bar(_nbytes(planned.plan), status, quiet=args.quiet) as bar:
                save = _save_args(planned, args, bar)
                if args.dst_item:
                    save = ocp.args.Composite(**{args.dst_item: save})
                manager.save(args.dst_step, args=save)
                manager.wait_until_finished()
    return _written(shown, args, planned.plan, args.dst_step, start)


def _unfinalized(location: str, step: int) -> str:
    """What an interrupted save of `step` leaves in the manager directory `location`."""
    left = ''
    if not locations.is_url(location):
        tmp = sorted(epath.Path(location).glob(f'{step}.orbax-checkpoint-tmp*'))
        left = f'; Orbax left {", ".join(map(str, tmp))} (rm -r it)' if tmp else ''
    return f'step {step} of {locations.shown(location)} was not finalized{left}'


def _save_args(planned: Planned, args: argparse.Namespace, bar: Bar) -> SurgerySave:
    return SurgerySave(
        item=watched(planned.source, bar),
        rules=planned.rules,
        target=planned.target,
        max_inflight_bytes=args.max_inflight_bytes or DEFAULT_MAX_INFLIGHT_BYTES,
        progress=bar.advance,
        checksums=args.checksums,
    )


def _write_orbax(path: epath.Path, planned: Planned, args: argparse.Namespace, bar: Bar) -> None:
    """Writes an Orbax checkpoint item at `path`, a budget's worth of leaves at a time.

    Orbax writes into a temporary directory of its own and renames it `path`.
    """
    with ocp.Checkpointer(SurgeryCheckpointHandler()) as checkpointer:
        checkpointer.save(path, args=_save_args(planned, args, bar))


def _written(
    destination: epath.PathLike,
    args: argparse.Namespace,
    plan: Plan,
    step: int | None,
    start: float,
) -> Written:
    return Written(
        destination=str(destination),
        format=args.to,
        step=step,
        arrays=len(plan.steps),
        bytes=_nbytes(plan),
        seconds=round(time.monotonic() - start, 3),
    )


def _nbytes(plan: Plan) -> int:
    return sum(_step_bytes(step) for step in plan.steps)


def _step_bytes(step: Step) -> int:
    leaf = step.target
    assert leaf.dtype is not None, f'unresolved {leaf.key!r}'
    return math.prod(leaf.shape or ()) * leaf.dtype.itemsize


def _remove_leftovers(dst: epath.Path, *, quiet: bool) -> None:
    """Removes what an interrupted convert to `dst` left beside it."""
    for leftover in sorted(dst.parent.glob(f'{dst.name}{_PARTIAL}*')):
        if not quiet:
            print(f'Removing {leftover}, left by an interrupted convert.', file=sys.stderr)
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
