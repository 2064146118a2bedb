r"""The `orbax-surgery` command line: inspect, plan and convert checkpoints, and a demo."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import jax
import orbax.checkpoint as ocp
from etils import epath

from orbax_surgery.atomic import move_into_place, replaced_siblings
from orbax_surgery.checksums import verified
from orbax_surgery.errors import CheckpointNotFoundError, DestinationExistsError, SurgeryError
from orbax_surgery.export import DEFAULT_MAX_SHARD_SIZE, save_safetensors
from orbax_surgery.handler import SurgeryCheckpointHandler, SurgerySave
from orbax_surgery.keys import PyTree, nest
from orbax_surgery.listing import describe, format_description, item_path
from orbax_surgery.materializer import DEFAULT_MAX_INFLIGHT_BYTES
from orbax_surgery.plan import Plan, Step, resolve
from orbax_surgery.python_rules import load_target
from orbax_surgery.report import format_bytes, format_plan, plan_summary
from orbax_surgery.rules import Rule
from orbax_surgery.rules_file import RulesFile, load_rules_file
from orbax_surgery.sources import ArraySource, open_source

_SIZE_HELP = 'bytes, or with a unit: 512M, 2G (binary), 500MB, 5GB (decimal), 512MiB'

_INSPECT_HELP = """\
Shows what a checkpoint holds, reading metadata only: a tree of keys with
shapes, dtypes, chunk shapes (Orbax) and bytes, the layout of LoRA adapters
saved with LoraSave, and the steps and items of a CheckpointManager directory.

PATH is an Orbax checkpoint item, a step directory, a CheckpointManager
directory (its latest step unless --step), or Hugging Face safetensors (a
.safetensors file, or a directory with model.safetensors or its index).

examples:
  orbax-surgery inspect /ckpts/run1                  # steps, and the latest step's items
  orbax-surgery inspect /ckpts/run1 --step 1000
  orbax-surgery inspect /ckpts/run1/1000/default --json | jq '.arrays[].key'
  orbax-surgery inspect ~/hf/Llama-3.2-1B            # safetensors shards and index
"""

_RULES_HELP = """\
Rules files (TOML, YAML or Python; see docs/rules-files.md):

  # rules.toml
  [[rules]]
  rename = { pattern = 'params/(.*)', replacement = '\\1' }
  [[rules]]
  unstack = { pattern = 'layers/(.*)', replacement = 'layers_{i}/\\1', axis = 0 }
  [[rules]]
  drop = 'opt_state/.*'

The target tree comes from --target, else from the rules file (a [target]
table, or `target` in rules.py), else from the rules themselves.
"""

_PLAN_HELP = f"""\
Prints the plan of a conversion without reading array data: for each target
leaf its shape, dtype and the formula that makes it, whether it is lazy, the
bytes read, then unused and dropped checkpoint keys and every error. Exits
with status 1 when the plan has errors.

SRC is an Orbax checkpoint item (or a CheckpointManager directory with
--step/--item), or Hugging Face safetensors.

{_RULES_HELP}
examples:
  orbax-surgery plan /ckpts/run1/1000/default --rules unroll.toml
  orbax-surgery plan /ckpts/run1 --step 1000 --item params --rules unroll.yaml --json
  orbax-surgery plan ~/hf/llama --rules import.toml --target my_model:abstract_params
"""

_CONVERT_HELP = f"""\
Runs the surgery and writes the result: an Orbax checkpoint item (restore it
with plain ocp.args.StandardRestore) or, with --to safetensors, Hugging Face
safetensors shards. Array data is read and written a budget's worth at a
time (--max-inflight-bytes), with a progress bar on stderr. The destination
appears only once complete: an interrupted convert leaves no DST (only a
DST.converting-* directory, removed by the next convert to DST), and running
it again works. An existing DST is refused unless --overwrite, which
replaces it only once the new one is complete (in one atomic swap on Linux;
elsewhere a kill at that moment can leave the old one at DST.replaced-*,
which `inspect DST` points to and the next convert to DST removes).

Runs on CPU (set JAX_PLATFORMS to choose otherwise).

{_RULES_HELP}
examples:
  orbax-surgery convert /ckpts/scanned/1000/default /ckpts/unrolled --rules unroll.toml
  orbax-surgery convert ~/hf/llama /ckpts/llama-flax --rules import.toml --max-inflight-bytes 2G
  orbax-surgery convert /ckpts/llama-flax ~/hf/llama-out --rules export.toml --to safetensors \\
      --max-shard-size 2GB
  orbax-surgery convert /ckpts/base /ckpts/merged --rules merge_lora.toml --overwrite
"""

_DEMO_HELP = """\
Makes a small checkpoint with plain Orbax in a temporary directory, restores
it with SurgeryRestore through CheckpointManager into a differently named and
differently sharded target, prints the plan and checks every value.

example:
  orbax-surgery demo
  orbax-surgery demo --dir /tmp/surgery-demo   # keep the checkpoint
"""

_UNITS = {'': 1, 'B': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}
_UNITS |= {'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'TB': 10**12}
_UNITS |= {'KIB': 2**10, 'MIB': 2**20, 'GIB': 2**30, 'TIB': 2**40}
_DEFAULT_BUDGET = format_bytes(DEFAULT_MAX_INFLIGHT_BYTES).replace('.0 ', ' ')
_PARTIAL = '.converting-'
_REPLACED = '.replaced-'


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `orbax-surgery` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == 'convert' and args.max_shard_size is not None and args.to != 'safetensors':
        parser.error('--max-shard-size is for --to safetensors.')
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print('orbax-surgery: interrupted', file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(f'orbax-surgery {args.command}: error: {_message(e)}', file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='orbax-surgery',
        description='Model surgery while an Orbax checkpoint is restored, shard by shard.',
        epilog='Run `orbax-surgery COMMAND --help` for examples.',
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--debug', action='store_true', help='show the traceback of an error')
    commands = parser.add_subparsers(dest='command', metavar='COMMAND')

    def command(name: str, text: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=text,
            description=description,
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    inspect = command('inspect', 'show what a checkpoint holds (metadata only)', _INSPECT_HELP)
    inspect.add_argument('path', metavar='PATH')
    inspect.add_argument('--step', type=int, help='step of a CheckpointManager directory')
    inspect.add_argument('--json', action='store_true', help='print JSON, for scripts')
    inspect.set_defaults(run=_inspect)

    plan = command('plan', 'print the plan of a conversion (reads no array data)', _PLAN_HELP)
    _source_arguments(plan)
    plan.add_argument('--json', action='store_true', help='print the plan as JSON')
    plan.set_defaults(run=_plan)

    convert = command('convert', 'run the surgery and write the result', _CONVERT_HELP)
    _source_arguments(convert)
    convert.add_argument('dst', metavar='DST', help='where to write (new, unless --overwrite)')
    convert.add_argument(
        '--to',
        choices=('orbax', 'safetensors'),
        default='orbax',
        help='what to write: an Orbax checkpoint item (default) or Hugging Face safetensors',
    )
    convert.add_argument(
        '--max-inflight-bytes',
        type=_size,
        default=None,
        metavar='SIZE',
        help=f'host memory for data in flight (default {_DEFAULT_BUDGET}); {_SIZE_HELP}',
    )
    convert.add_argument(
        '--max-shard-size',
        type=_size,
        default=None,
        metavar='SIZE',
        help='with --to safetensors: bytes per file before the next (default 5GB)',
    )
    convert.add_argument('--overwrite', action='store_true', help='replace an existing DST')
    convert.add_argument(
        '--checksums',
        action='store_true',
        help='record a checksum of every block written (in DST/_CHECKSUMS/), for --verify later',
    )
    convert.add_argument(
        '--verify',
        action='store_true',
        help='check every block read against the checksums SRC was saved with',
    )
    convert.add_argument('--quiet', '-q', action='store_true', help='no progress bar or summary')
    convert.set_defaults(run=_convert)

    demo = command('demo', 'save, plan and restore with surgery, then check the values', _DEMO_HELP)
    demo.add_argument('--dir', help='directory for the demo checkpoint (default: a temporary one)')
    demo.add_argument(
        '--devices',
        type=int,
        default=8,
        help='CPU devices to simulate when no accelerator is present (default: 8)',
    )
    demo.set_defaults(run=lambda args: _demo(args.dir, args.devices))
    return parser


def _source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('src', metavar='SRC', help='Orbax checkpoint or Hugging Face safetensors')
    parser.add_argument('--rules', metavar='FILE', help='rules file: .toml, .yaml/.yml or .py')
    parser.add_argument(
        '--target',
        metavar='MODULE:FUNCTION',
        help="target tree from 'module:function' or 'file.py:function' (or a variable)",
    )
    parser.add_argument('--step', type=int, help='step of a CheckpointManager directory SRC')
    parser.add_argument('--item', help='item of a step with several (default: the only one)')


def _size(text: str) -> int:
    match = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*', text)
    unit = _UNITS.get(match[2].upper()) if match else None
    if not match or unit is None or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f'{text!r} is not a size: {_SIZE_HELP}')
    return int(float(match[1]) * unit)


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename and not str(e).startswith('No '):
        text = f'{e.strerror}: {e.filename}'
    else:
        text = str(e) or type(e).__name__
    if not isinstance(e, SurgeryError | OSError):
        text = f'{type(e).__name__}: {text} (unexpected; --debug shows the traceback)'
    notes = getattr(e, '__notes__', ())
    return '\n  '.join([text, *notes])


def _use_cpu() -> None:
    """Files to files need no accelerator: leave them to others, unless JAX_PLATFORMS says."""
    if not os.environ.get('JAX_PLATFORMS'):
        jax.config.update('jax_platforms', 'cpu')


def _inspect(args: argparse.Namespace) -> int:
    _use_cpu()
    _check_not_mid_replace(os.path.abspath(args.path))
    description = describe(os.path.abspath(args.path), step=args.step)
    print(json.dumps(description, indent=2) if args.json else format_description(description))
    return 0


def _plan(args: argparse.Namespace) -> int:
    _use_cpu()
    plan, _, _, _ = _planned(args)
    print(json.dumps(plan_summary(plan), indent=2) if args.json else format_plan(plan))
    return 1 if plan.errors else 0


def _planned(args: argparse.Namespace) -> tuple[Plan, ArraySource, PyTree, tuple[Rule, ...]]:
    """The plan, and the source, target and rules it comes from."""
    rules_file = load_rules_file(args.rules) if args.rules else RulesFile(epath.Path('.'))
    target = rules_file.target
    if args.target:
        target = load_target(args.target, relative_to=epath.Path(os.getcwd()))
    _check_not_mid_replace(os.path.abspath(args.src))
    src = item_path(os.path.abspath(args.src), step=args.step, item=args.item)
    opened = open_source(src)
    if getattr(args, 'verify', False):
        opened = verified(opened)
    source, rules = rules_file.compose(opened, target)
    return resolve(source.arrays, target, rules), source, target, rules


def _convert(args: argparse.Namespace) -> int:
    dst = epath.Path(os.path.abspath(args.dst))
    src = os.path.abspath(args.src)
    if os.path.lexists(dst) and not args.overwrite:
        raise DestinationExistsError(
            f'{dst} exists; convert leaves it untouched. Choose another destination, or pass '
            '--overwrite to replace it once the new one is complete.'
        )
    if dst == epath.Path(src) or str(dst).startswith(src.rstrip('/') + '/'):
        raise DestinationExistsError(f'{dst} is the source or inside it; write somewhere else.')
    _use_cpu()
    budget = args.max_inflight_bytes or DEFAULT_MAX_INFLIGHT_BYTES
    plan, source, target, rules = _planned(args)
    if plan.errors:
        print(f'orbax-surgery convert: the plan has {len(plan.errors)} error(s):', file=sys.stderr)
        for i, e in enumerate(plan.errors, 1):
            print(f'  {i}. {type(e).__name__}: {e}', file=sys.stderr)
        print('Nothing was written. `orbax-surgery plan` shows the whole plan.', file=sys.stderr)
        return 1
    if target is None:  # What the rules give, spelled out: the writers need a target.
        target = nest(dict.fromkeys(plan.target_keys, ...))
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
                save_safetensors(
                    source,
                    partial,
                    target=target,
                    rules=rules,
                    max_shard_size=args.max_shard_size or DEFAULT_MAX_SHARD_SIZE,
                    max_inflight_bytes=budget,
                    progress=advance,
                    checksums=args.checksums,
                )
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


def _demo(directory: str | None, devices: int) -> int:
    jax.config.update('jax_num_cpu_devices', devices)
    from orbax_surgery.demo import run_demo

    return 0 if run_demo(directory) else 1


if __name__ == '__main__':
    sys.exit(main())
