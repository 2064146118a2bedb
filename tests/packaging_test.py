"""pyproject.toml, the lock, the lower bounds and the quick start agree with each other."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).parents[1]


def declared() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
    extras = project['optional-dependencies'].values()
    requirements = [*project['dependencies'], *(r for extra in extras for r in extra)]
    return {canonicalize_name(r.name): r for r in map(Requirement, requirements)}


def pins(path: Path) -> dict[str, Version]:
    """`name==version` lines of a constraints file; comments and annotations skipped."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split('#')[0].strip()
        if line:
            name, version = line.split('==')
            found[canonicalize_name(name)] = Version(version)
    return found


def lower_bound(requirement: Requirement) -> Version:
    (bound,) = [s for s in requirement.specifier if s.operator == '>=']
    return Version(bound.version)


def test_every_dependency_has_a_tested_lower_bound():
    minimum = pins(ROOT / 'requirements' / 'minimum.txt')
    assert set(minimum) == set(declared())
    for name, requirement in declared().items():
        assert minimum[name] == lower_bound(requirement), name


def test_the_lock_pins_every_dependency_within_its_declared_range():
    lock = pins(ROOT / 'requirements' / 'lock.txt')
    for name, requirement in declared().items():
        assert name in lock, f'{name} is not in requirements/lock.txt'
        assert lock[name] in requirement.specifier, f'{name}=={lock[name]} vs {requirement}'


def test_the_lock_keeps_its_deliberate_pins():
    lock = pins(ROOT / 'requirements' / 'lock.txt')
    for name, version in pins(ROOT / 'requirements' / 'pins.txt').items():
        assert lock[name] == version, name


def test_the_lock_names_no_index_or_local_path():
    text = (ROOT / 'requirements' / 'lock.txt').read_text()
    assert not re.search(r'^\s*(--|-[ecif] )', text, flags=re.MULTILINE)
    assert 'file://' not in text


def test_ci_runs_the_readme_quick_start_verbatim():
    readme = (ROOT / 'README.md').read_text()
    block = re.search(r'## Install and quick start.*?```bash\n(.*?)```', readme, flags=re.DOTALL)
    assert block is not None
    commands = [line.split('  #')[0].strip() for line in block[1].splitlines()]
    assert len(commands) == 2 and all('-c requirements/lock.txt' in c for c in commands)
    ci = (ROOT / '.ci' / 'run').read_text().splitlines()
    for command in commands:
        assert f'    {command}' in ci, command
