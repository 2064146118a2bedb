"""How fast a wrong plan explains itself, on Llama-shaped trees of 32 and 80 layers.

Planning reads no data, so a mistake should be reported at once, however big the
model: one error per cause, with its fixes. Each case is planned from shapes
alone (a Hugging Face checkpoint's keys, the Flax target of the same config),
and the table gives the errors reported, the first fix and the seconds taken.
Plain Orbax has no plan to compare with: its `apply_transformations` raises on
the first key it cannot fill.

    python benchmarks/plan_errors.py
    python benchmarks/plan_errors.py --layers 32 80 126
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / 'tests'))

import mistakes  # noqa: E402  (tests/mistakes.py: the trees and the table of mistakes)

import orbax_surgery as osurg  # noqa: E402

CASES = {
    'no mistake': lambda n: (mistakes.hf_llama(n), mistakes.flax_llama(n), ['model']),
    'typo in drop_prefix': lambda n: (mistakes.hf_llama(n), mistakes.flax_llama(n), ['modle']),
    'no rules at all': lambda n: (mistakes.hf_llama(n), mistakes.flax_llama(n), None),
    'one layer too many': lambda n: (mistakes.hf_llama(n), mistakes.flax_llama(n + 1), ['model']),
    'another hidden size': lambda n: (
        mistakes.hf_llama(n, d=32),
        mistakes.flax_llama(n, d=64),
        ['model'],
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--layers', type=int, nargs='+', default=[32, 80])
    args = parser.parse_args()
    rows = [('layers', 'leaves', 'case', 'errors', 'folded', 'seconds', 'first fix')]
    for layers in args.layers:
        for name, case in CASES.items():
            source, target, prefix = case(layers)
            rules = mistakes.fp(drop_prefix=prefix[0]) if prefix else []
            start = time.perf_counter()
            plan = osurg.resolve(source, target, rules)
            seconds = time.perf_counter() - start
            folded = sum(len(e.consequences) for e in plan.errors)
            fixes = plan.errors[0].suggestions if plan.errors else ()
            fix = fixes[0] if fixes else '-'
            rows.append(
                (
                    str(layers),
                    str(len(source)),
                    name,
                    str(len(plan.errors)),
                    str(folded),
                    f'{seconds:.2f}',
                    fix,
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print('  '.join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


if __name__ == '__main__':
    main()
