"""The `orbax-surgery` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

_DEMO_HELP = """\
Makes a small checkpoint with plain Orbax in a temporary directory, restores
it with SurgeryRestore through CheckpointManager into a differently named and
differently sharded target, prints the plan and checks every value.

example:
  orbax-surgery demo
  orbax-surgery demo --dir /tmp/surgery-demo   # keep the checkpoint
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `orbax-surgery` console script."""
    parser = argparse.ArgumentParser(
        prog='orbax-surgery',
        description='Model surgery while an Orbax checkpoint is restored, shard by shard.',
    )
    commands = parser.add_subparsers(dest='command', metavar='COMMAND')
    demo = commands.add_parser(
        'demo',
        help='save, plan and restore with surgery, then check the values',
        description=_DEMO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument('--dir', help='directory for the demo checkpoint (default: a temporary one)')
    demo.add_argument(
        '--devices',
        type=int,
        default=8,
        help='CPU devices to simulate when no accelerator is present (default: 8)',
    )
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return _demo(args.dir, args.devices)


def _demo(directory: str | None, devices: int) -> int:
    import jax

    jax.config.update('jax_num_cpu_devices', devices)
    from orbax_surgery.demo import run_demo

    return 0 if run_demo(directory) else 1


if __name__ == '__main__':
    sys.exit(main())
