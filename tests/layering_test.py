"""The package's stages import downwards only, and no modules import each other in a cycle.

docs/architecture.md draws the same order.
"""

import ast
import graphlib
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / 'orbax_surgery'

# Lowest first. A module may import modules of its own stage or of a lower one.
STAGES = [
    ('errors', 'keys', 'locations', 'suggestions', 'units'),
    ('arrays',),
    ('rules',),
    ('plan',),
    ('sources',),
    ('read',),
    ('write',),
    ('orbax',),
    ('lora',),
    ('huggingface',),
    ('cli',),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def stage(module: str) -> int:
    if module == 'orbax_surgery':
        return len(STAGES)  # The public API re-exports every stage.
    first = module.split('.')[1]
    return next(i for i, names in enumerate(STAGES) if first in names)


def imports() -> dict[str, set[str]]:
    """Every module's imports of this package's modules, wherever they are in the file."""
    modules = {module_name(p): p for p in PACKAGE.rglob('*.py')}
    found: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                if node.level:  # Relative imports: resolved against this package.
                    base = '.'.join(name.split('.')[: -node.level] + [node.module])
                for alias in node.names:  # `from pkg import module` names a module.
                    dotted = f'{base}.{alias.name}'
                    targets.add(dotted if dotted in modules else base)
        found[name] = {t for t in targets if t in modules and t != name}
    return found


def test_every_module_is_in_a_stage():
    for module in imports():
        stage(module)  # Raises StopIteration for a package no stage names.


def test_no_stage_imports_a_higher_stage():
    upward = [
        f'{module} ({STAGES[stage(module)][0]}) imports {target} ({STAGES[stage(target)][0]})'
        for module, targets in sorted(imports().items())
        for target in sorted(targets)
        if stage(target) > stage(module)
    ]
    assert upward == []


def test_no_import_cycles():
    graph = {
        module: {t for t in targets if not _is_package_init(t)}
        for module, targets in imports().items()
    }
    graphlib.TopologicalSorter(graph).prepare()  # Raises CycleError naming the cycle.


def test_modules_stay_under_the_house_limit():
    long = {
        module_name(p): n
        for p in PACKAGE.rglob('*.py')
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert long == {}


def _is_package_init(module: str) -> bool:
    return (PACKAGE.parent / module.replace('.', '/') / '__init__.py').exists()
