"""The `orbax-surgery` console script: answers `--help` and shows its status before JAX loads.

Importing `orbax_surgery` imports JAX and Orbax, since it registers its handlers
with Orbax then. The command line's own modules need neither to parse
arguments, so this entry point, outside the package, registers `orbax_surgery`
without running its `__init__` yet, and `orbax_surgery.cli.main` runs it once a
command starts (see `complete_package_import` there). Same modules, one copy
each: only the order changes.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `orbax-surgery` console script."""
    if 'orbax_surgery' not in sys.modules:
        spec = importlib.util.find_spec('orbax_surgery')
        if spec is None or spec.loader is None:
            print('orbax-surgery: the orbax_surgery package is not installed.', file=sys.stderr)
            return 2
        sys.modules['orbax_surgery'] = importlib.util.module_from_spec(spec)
    from orbax_surgery.cli.main import main as run

    return run(argv)
