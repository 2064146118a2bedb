"""The `orbax-surgery` command line: inspect, plan and convert checkpoints, and a demo.

Parsing imports nothing heavy: `--help` answers at once, and the status line
shows before JAX loads. A command's module is imported once it runs.
"""

from __future__ import annotations

import _thread
import argparse
import gc
import logging
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from orbax_surgery.cli.progress import Status
from orbax_surgery.errors import SurgeryError
from orbax_surgery.units import parse_bytes

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
it again works; Ctrl-C stops it with exit status 130 and one line saying
what it left. An existing DST is refused unless --overwrite, which
replaces it only once the new one is complete (in one atomic swap on Linux;
elsewhere a kill at that moment can leave the old one at DST.replaced-*,
which `inspect DST` points to and the next convert to DST removes). With
--dst-step N, DST is a CheckpointManager directory and step N is written
there, finalized and with step metadata as Orbax writes them.

Runs on CPU (set JAX_PLATFORMS to choose otherwise).

{_RULES_HELP}
examples:
  orbax-surgery convert /ckpts/scanned/1000/default /ckpts/unrolled --rules unroll.toml
  orbax-surgery convert ~/hf/llama /ckpts/llama-flax --rules import.toml --max-inflight-bytes 2G
  orbax-surgery convert /ckpts/llama-flax ~/hf/llama-out --rules export.toml --to safetensors \\
      --max-shard-size 2GB
  orbax-surgery convert /ckpts/base /ckpts/merged --rules merge_lora.toml --overwrite
  orbax-surgery convert ~/hf/llama /ckpts/run --dst-step 0 --rules import.toml
  orbax-surgery convert ~/hf/Llama-3.1-8B /ckpts/llama-maxtext --preset import \\
      --layout maxtext --layers stacked --dst-step 0 --dst-item items
"""

_DEMO_HELP = """\
Makes a small checkpoint with plain Orbax in a temporary directory, restores
it with SurgeryRestore through CheckpointManager into a differently named and
differently sharded target, prints the plan and checks every value.

example:
  orbax-surgery demo
  orbax-surgery demo --dir /tmp/surgery-demo   # keep the checkpoint
"""

# read.materialize.DEFAULT_MAX_INFLIGHT_BYTES, written out so that `--help` needs no JAX;
# tests/cli/progress_test.py checks that the two agree.
DEFAULT_BUDGET = '128 MiB'


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `orbax-surgery` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == 'convert' and args.max_shard_size is not None and args.to != 'safetensors':
        parser.error('--max-shard-size is for --to safetensors.')
    if args.command == 'convert' and args.dst_item and args.dst_step is None:
        parser.error('--dst-item is for --dst-step (an item of a CheckpointManager step).')
    if getattr(args, 'layout', 'flax') != 'flax' and not args.preset:
        parser.error('--layout is for --preset: the layout a preset writes.')
    status = Status(quiet=getattr(args, 'quiet', False))
    try:
        with _interrupts_kept():
            return _run(args, status)
    except KeyboardInterrupt as e:  # At any point, JAX's import included: one line, no traceback.
        status.clear()
        notes = '; '.join(getattr(e, '__notes__', ()))
        print(
            f'orbax-surgery {args.command}: interrupted while {status.doing}'
            + (f'; {notes}.' if notes else '.'),
            file=sys.stderr,
        )
    except BrokenPipeError:  # `orbax-surgery inspect ... | head`: the reader has had enough.
        sys.stdout = open(os.devnull, 'w')  # Python flushes stdout at exit.
        return 141
    except Exception as e:
        status.clear()
        if args.debug:
            raise
        print(f'orbax-surgery {args.command}: error: {_message(e)}', file=sys.stderr)
        return 2
    finally:
        status.clear()
    _drop_interrupted_work()  # Here, once the interrupt and its frames are gone.
    return 130


def _drop_interrupted_work() -> None:
    """Frees the work an interrupt cut short with asyncio's log muted: its tasks would
    otherwise log their KeyboardInterrupt, traceback and all, as 'never retrieved'."""
    log = logging.getLogger('asyncio')
    muted, log.disabled = log.disabled, True
    try:
        gc.collect()
    finally:
        log.disabled = muted


def complete_package_import() -> None:
    """Runs `orbax_surgery/__init__` where the console script deferred it (`orbax_surgery_cli`)."""
    package = sys.modules['orbax_surgery']
    if not hasattr(package, '__all__') and package.__spec__ and package.__spec__.loader:
        package.__spec__.loader.exec_module(package)


def _run(args: argparse.Namespace, status: Status) -> int:
    """Runs the parsed command, importing it (and with it JAX) only now."""
    status.show('loading JAX and Orbax')
    complete_package_import()
    if args.command == 'convert':
        try:
            from orbax_surgery.cli.convert import convert_command
        except KeyboardInterrupt as e:
            e.add_note('nothing was written')
            raise

        return convert_command(args, status)
    from orbax_surgery.cli import commands

    if args.command == 'demo':
        status.clear()  # The demo prints as it goes.
        return commands.demo_command(args.dir, args.devices)
    if args.command == 'inspect':
        return commands.inspect_command(args, status)
    return commands.plan_command(args, status)


@contextmanager
def _interrupts_kept() -> Iterator[None]:
    """Delivers again a Ctrl-C that hit code Python cannot raise from.

    One that lands in JAX's garbage-collection callback (or a `__del__`) is
    otherwise printed as 'Exception ignored' and lost, and the command runs on.
    """
    previous = sys.unraisablehook

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            # Later, from another thread: raised in the main code once this callback is over.
            again = threading.Timer(0.05, _thread.interrupt_main)
            again.daemon = True
            again.start()
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


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
    inspect.add_argument(
        '--json', action='store_true', help='print JSON, for scripts (every array, unfolded)'
    )
    inspect.add_argument(
        '--all-layers',
        action='store_true',
        help='list every layer; by default alike numbered layers print once, as layers_{0..31}/',
    )

    plan = command('plan', 'print the plan of a conversion (reads no array data)', _PLAN_HELP)
    _source_arguments(plan)
    plan.add_argument('--json', action='store_true', help='print the plan as JSON')

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
        help=f'host memory for data in flight (default {DEFAULT_BUDGET}); {_SIZE_HELP}',
    )
    convert.add_argument(
        '--max-shard-size',
        type=_size,
        default=None,
        metavar='SIZE',
        help='with --to safetensors: bytes per file before the next (default 5GB)',
    )
    convert.add_argument(
        '--dst-step',
        type=int,
        metavar='N',
        help='with --to orbax: DST is a CheckpointManager directory; write step N there',
    )
    convert.add_argument(
        '--dst-item',
        metavar='NAME',
        help="with --dst-step: the step's item to write (default: the manager's one item, "
        "'default'); MaxText's converters write 'items'",
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
    convert.add_argument(
        '--json',
        action='store_true',
        help='print the result as JSON on stdout: written, destination, format, step, arrays, '
        'bytes, seconds (or written: false and the plan errors)',
    )

    demo = command('demo', 'save, plan and restore with surgery, then check the values', _DEMO_HELP)
    demo.add_argument('--dir', help='directory for the demo checkpoint (default: a temporary one)')
    demo.add_argument(
        '--devices',
        type=int,
        default=8,
        help='CPU devices to simulate when no accelerator is present (default: 8)',
    )
    return parser


def _source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('src', metavar='SRC', help='Orbax checkpoint or Hugging Face safetensors')
    parser.add_argument('--rules', metavar='FILE', help='rules file: .toml, .yaml/.yml or .py')
    parser.add_argument(
        '--preset',
        choices=('import', 'export'),
        help="a model family's rules from the config.json beside SRC (import: Hugging Face to "
        'Flax, with the target; export: back), after the rules file if any',
    )
    parser.add_argument(
        '--config',
        metavar='FILE',
        help='with --preset: the config.json (or its directory); default: the one beside SRC',
    )
    parser.add_argument(
        '--layers',
        choices=('unrolled', 'stacked'),
        default='unrolled',
        help='with --preset: the Flax layers, layers_0/... or one stacked (scanned) layers/...',
    )
    parser.add_argument(
        '--layout',
        choices=('flax', 'maxtext'),
        default='flax',
        help="with --preset: the canonical Flax layout, or MaxText's parameter tree",
    )
    parser.add_argument(
        '--target',
        metavar='MODULE:FUNCTION',
        help="target tree from 'module:function' or 'file.py:function' (or a variable)",
    )
    parser.add_argument('--step', type=int, help='step of a CheckpointManager directory SRC')
    parser.add_argument('--item', help='item of a step with several (default: the only one)')


def _size(text: str) -> int:
    size = parse_bytes(text)
    if size is None:
        raise argparse.ArgumentTypeError(f'{text!r} is not a size: {_SIZE_HELP}')
    return size


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename and not str(e).startswith('No '):
        text = f'{e.strerror}: {e.filename}'
    else:
        text = str(e) or type(e).__name__
    if not isinstance(e, SurgeryError | OSError):
        text = f'{type(e).__name__}: {text} (unexpected; --debug shows the traceback)'
    notes = getattr(e, '__notes__', ())
    return '\n  '.join([text, *notes])
