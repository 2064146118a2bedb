"""The command line's commands: inspect, plan and convert, each from parsed arguments."""

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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from orbax_surgery import locations
from orbax_surgery.cli.listing import describe, format_description, item_path
from orbax_surgery.cli.python_rules import load_target
from orbax_surgery.cli.rules_file import RulesFile, load_rules_file
from orbax_surgery.cli.rules_file_entries import ConfigPreset
from orbax_surgery.errors import CheckpointNotFoundError, DestinationExistsError
from orbax_surgery.huggingface.export import DEFAULT_MAX_SHARD_SIZE, save_safetensors
from orbax_surgery.keys import PyTree, nest
from orbax_surgery.orbax.surgery_handler import SurgeryCheckpointHandler, SurgerySave
from orbax_surgery.plan.plan import Plan, Step, format_plan, plan_summary
from orbax_surgery.plan.resolve import resolve
from orbax_surgery.read.materialize import DEFAULT_MAX_INFLIGHT_BYTES
from orbax_surgery.read.verify import verified
from orbax_surgery.rules.rule import Rule
from orbax_surgery.sources.open import open_source
from orbax_surgery.sources.source import ArraySource
from orbax_surgery.units import format_bytes
from orbax_surgery.write.atomic import move_into_place, replaced_siblings

_PARTIAL = '.converting-'
_REPLACED = '.replaced-'


def use_cpu() -> None:
    """Files to files need no accelerator: leave them to others, unless JAX_PLATFORMS says."""
    if not os.environ.get('JAX_PLATFORMS'):
        jax.config.update('jax_platforms', 'cpu')


def inspect_command(args: argparse.Namespace) -> int:
    use_cpu()
    path = locations.absolute(args.path)
    _check_not_mid_replace(path)
    description = describe(path, step=args.step)
    print(json.dumps(description, indent=2) if args.json else format_description(description))
    return 0


def plan_command(args: argparse.Namespace) -> int:
    use_cpu()
    plan = _planned(args).plan
    print(json.dumps(plan_summary(plan), indent=2) if args.json else format_plan(plan))
    return 1 if plan.errors else 0


@dataclasses.dataclass(frozen=True)
class Planned:
    """A conversion's plan, the source, target and rules it comes from, and the
    Hugging Face config a preset export writes beside the files (or None)."""

    plan: Plan
    source: ArraySource
    target: PyTree
    rules: tuple[Rule, ...]
    hf_config: dict[str, Any] | None


def _planned(args: argparse.Namespace) -> Planned:
    """The plan, and what it comes from."""
    rules_file = load_rules_file(args.rules) if args.rules else RulesFile(epath.Path('.'))
    if args.preset:  # After the file's rules: a preset fills what they leave.
        auto = ConfigPreset(layers=args.layers, config=args.config, direction=args.preset)
        rules_file = dataclasses.replace(rules_file, rules=(*rules_file.rules, auto))
    target = rules_file.target
    if args.target:
        target = load_target(args.target, relative_to=epath.Path(os.getcwd()))
    _check_not_mid_replace(locations.absolute(args.src))
    src = item_path(locations.absolute(args.src), step=args.step, item=args.item)
    opened = open_source(src)
    if getattr(args, 'verify', False):
        opened = verified(opened)
    if target is None:
        target = rules_file.target_for(opened)
    source, rules = rules_file.compose(opened, target)
    plan = resolve(source.arrays, target, rules)
    return Planned(plan, source, target, rules, rules_file.export_config(opened))


def convert_command(args: argparse.Namespace) -> int:
    src, location = locations.absolute(args.src), locations.absolute(args.dst)
    if args.dst_step is not None:  # Another step of the source's own manager is fine.
        return _convert_to_step(args, location)
    if location == src or location.startswith(src.rstrip('/') + '/'):
        raise DestinationExistsError(
            f'{location} is the source or inside it; write somewhere else.'
        )
    if locations.is_url(location):
        return _convert_to_url(args, location)
    dst = epath.Path(location)
    if os.path.lexists(dst) and not args.overwrite:
        raise DestinationExistsError(
            f'{dst} exists; convert leaves it untouched. Choose another destination, or pass '
            '--overwrite to replace it once the new one is complete.'
        )
    planned = _planned_to_write(args)
    if planned is None:
        return 1
    plan, source, target, rules = planned.plan, planned.source, planned.target, planned.rules
    budget = args.max_inflight_bytes or DEFAULT_MAX_INFLIGHT_BYTES
    _remove_leftovers(dst, quiet=args.quiet)
    partial = dst.parent / f'{dst.name}{_PARTIAL}{secrets.token_hex(4)}'
    dst.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    total = sum(_nbytes(step) for step in plan.steps)
    try:
        with _progress(total, args.quiet) as advance:
            if args.to == 'orbax':
                _write_orbax(partial, source, target, rules, budget, advance, args.checksums)
            else:
                _write_safetensors(planned, str(partial), args, advance)
        move_into_place(partial, dst, aside=_REPLACED)
    except BaseException:
        for leftover in dst.parent.glob(f'{partial.name}*'):
            shutil.rmtree(leftover, ignore_errors=True)
        raise
    for old in replaced_siblings(dst, _REPLACED):  # Kept until now, in case this one failed.
        if not args.quiet:
            print(f'Removing {old}, left by an interrupted --overwrite.', file=sys.stderr)
        shutil.rmtree(old)
    if not args.quiet:
        secs = time.monotonic() - start
        print(
            f'Wrote {dst} ({"Orbax checkpoint" if args.to == "orbax" else "safetensors"}): '
            f'{len(plan.steps)} arrays, {format_bytes(total)} in {secs:.1f} s.'
        )
    return 0


def _planned_to_write(args: argparse.Namespace) -> Planned | None:
    """A convert's plan, on the CPU, with the target the writers need (what the rules
    give, spelled out, when none is given); None, its errors printed, if it has any."""
    use_cpu()
    planned = _planned(args)
    if _has_errors(planned.plan):
        return None
    if planned.target is None:
        target = nest(dict.fromkeys(planned.plan.target_keys, ...))
        planned = dataclasses.replace(planned, target=target)
    return planned


def _write_safetensors(
    planned: Planned,
    location: str,
    args: argparse.Namespace,
    advance: Callable[[int], None],
    *,
    overwrite: bool = False,
) -> None:
    """Writes the planned conversion as safetensors at `location`, as `args` ask."""
    save_safetensors(
        planned.source,
        location,
        target=planned.target,
        rules=planned.rules,
        max_shard_size=args.max_shard_size or DEFAULT_MAX_SHARD_SIZE,
        max_inflight_bytes=args.max_inflight_bytes or DEFAULT_MAX_INFLIGHT_BYTES,
        progress=advance,
        checksums=args.checksums,
        overwrite=overwrite,
        config=planned.hf_config,
    )


def _has_errors(plan: Plan) -> bool:
    """Prints a plan's errors for `convert`, which then writes nothing."""
    if not plan.errors:
        return False
    print(f'orbax-surgery convert: the plan has {len(plan.errors)} error(s):', file=sys.stderr)
    for i, e in enumerate(plan.errors, 1):
        print(f'  {i}. {type(e).__name__}: {e}', file=sys.stderr)
    print('Nothing was written. `orbax-surgery plan` shows the whole plan.', file=sys.stderr)
    return True


def _convert_to_url(args: argparse.Namespace, location: str) -> int:
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
    planned = _planned_to_write(args)
    if planned is None:
        return 1
    plan, source, target, rules = planned.plan, planned.source, planned.target, planned.rules
    budget = args.max_inflight_bytes or DEFAULT_MAX_INFLIGHT_BYTES
    start = time.monotonic()
    total = sum(_nbytes(step) for step in plan.steps)
    with _progress(total, args.quiet) as advance:
        if args.to == 'orbax':
            _write_orbax(dst, source, target, rules, budget, advance, args.checksums)
        else:
            _write_safetensors(planned, location, args, advance, overwrite=args.overwrite)
    if not args.quiet:
        secs = time.monotonic() - start
        kind = 'Orbax checkpoint' if args.to == 'orbax' else 'safetensors'
        print(
            f'Wrote {shown} ({kind}): {len(plan.steps)} arrays, {format_bytes(total)} in '
            f'{secs:.1f} s.'
        )
    return 0


def _convert_to_step(args: argparse.Namespace, location: str) -> int:
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
    planned = _planned_to_write(args)
    if planned is None:
        return 1
    plan, source, target, rules = planned.plan, planned.source, planned.target, planned.rules
    budget = args.max_inflight_bytes or DEFAULT_MAX_INFLIGHT_BYTES
    step_dir = locations.join(location, str(args.dst_step))
    src = item_path(locations.absolute(args.src), step=args.step, item=args.item)
    if str(src).rstrip('/').startswith(step_dir.rstrip('/') + '/') or str(src) == step_dir:
        raise DestinationExistsError(
            f'{locations.shown(step_dir)} is the source or holds it; write another --dst-step.'
        )
    start = time.monotonic()
    total = sum(_nbytes(step) for step in plan.steps)
    with ocp.CheckpointManager(location) as manager:
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
        with _progress(total, args.quiet) as advance:
            save = SurgerySave(
                item=source,
                rules=rules,
                target=target,
                max_inflight_bytes=budget,
                progress=advance,
                checksums=args.checksums,
            )
            manager.save(args.dst_step, args=save)
            manager.wait_until_finished()
    if not args.quiet:
        secs = time.monotonic() - start
        print(
            f'Wrote step {args.dst_step} of {shown} (Orbax checkpoint): {len(plan.steps)} '
            f'arrays, {format_bytes(total)} in {secs:.1f} s.'
        )
    return 0


def _write_orbax(
    path: epath.Path,
    source: ArraySource,
    target: PyTree,
    rules: Sequence[Rule],
    budget: int,
    advance: Callable[[int], None],
    checksums: bool = False,
) -> None:
    """Writes an Orbax checkpoint item at `path`, a budget's worth of leaves at a time.

    Orbax writes into a temporary directory of its own and renames it `path`.
    """
    args = SurgerySave(
        item=source,
        rules=rules,
        target=target,
        max_inflight_bytes=budget,
        progress=advance,
        checksums=checksums,
    )
    with ocp.Checkpointer(SurgeryCheckpointHandler()) as checkpointer:
        checkpointer.save(path, args=args)


@contextmanager
def _progress(total: int, quiet: bool) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr (bytes done / total, rate, time left), or nothing."""
    if quiet:
        yield lambda _: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn('writing'),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task('writing', total=total)
        yield lambda n: bar.advance(task, n)
        bar.update(task, completed=total)


def _nbytes(step: Step) -> int:
    leaf = step.target
    assert leaf.dtype is not None, f'unresolved {leaf.key!r}'
    return math.prod(leaf.shape or ()) * leaf.dtype.itemsize


def _check_not_mid_replace(path: str) -> None:
    """A missing `path` that a killed `convert --overwrite` moved aside: say where it is."""
    if locations.is_url(path):
        return  # Object storage has no renames, so no such leftovers.
    old = replaced_siblings(epath.Path(path), _REPLACED)
    if old and not os.path.lexists(path):
        raise CheckpointNotFoundError(
            f'No checkpoint at {path}: a `convert --overwrite` to it was killed while replacing '
            f'it, and the previous result is at {old[-1]}. Move it back (mv {old[-1]} {path}), '
            'or run the convert again (it removes the old one once the new one is in place).'
        )


def _remove_leftovers(dst: epath.Path, *, quiet: bool) -> None:
    """Removes what an interrupted convert to `dst` left beside it."""
    for leftover in sorted(dst.parent.glob(f'{dst.name}{_PARTIAL}*')):
        if not quiet:
            print(f'Removing {leftover}, left by an interrupted convert.', file=sys.stderr)
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()


def demo_command(directory: str | None, devices: int) -> int:
    jax.config.update('jax_num_cpu_devices', devices)
    from orbax_surgery.cli.demo import run_demo

    return 0 if run_demo(directory) else 1
