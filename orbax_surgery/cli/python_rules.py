"""Rules and targets written in Python: a `rules.py` file, and 'module:function' targets.

User code runs here, so its failures are reported with the file and line
they come from, as one `RuleError`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from etils import epath

from orbax_surgery.errors import RuleError, SurgeryError
from orbax_surgery.keys import PyTree, did_you_mean
from orbax_surgery.rules.rule import Rule


def load_python_rules(path: epath.Path) -> tuple[tuple[Rule, ...], PyTree]:
    """Runs a Python rules file; returns its `rules` and its `target` (None if absent).

    `rules` is a list of rule objects (or an Orbax `Transform` dict); `target`
    is a tree, or a function of no arguments returning one (called here).
    """
    module = _exec_python(path)
    names = vars(module)
    if 'rules' not in names:
        public = [n for n in names if not n.startswith('_')]
        raise RuleError(
            f'{path} defines no `rules` (a list of rules, e.g. [osurg.Rename(...)]).'
            f'{did_you_mean("rules", public)}'
        )
    rules = names['rules']
    if not isinstance(rules, Sequence | Mapping) or isinstance(rules, str):
        raise RuleError(f'{path}: `rules` is a {type(rules).__name__}, not a list of rules.')
    from orbax_surgery.plan.resolve import checked_rules

    try:
        checked = checked_rules(rules)
    except RuleError as e:
        raise RuleError(f'{path}: {e}') from e
    target = names.get('target')
    if target is not None:
        target = _call_target(target, f'{path}: target')
    return checked, target


def load_target(spec: str, *, relative_to: epath.Path | None = None) -> PyTree:
    """The target named by 'module:function' or 'file.py:function' (or a variable's name).

    A function is called without arguments, e.g. one returning
    `jax.eval_shape(model.init, ...)`; anything else is the tree itself.
    """
    where, sep, name = spec.rpartition(':')
    if not sep or not where or not name.isidentifier():
        raise RuleError(
            f"target {spec!r} is not 'module:function' or 'file.py:function' (e.g. "
            "'my_model:abstract_params')."
        )
    if where.endswith('.py'):
        file = epath.Path(where)
        if relative_to is not None and not file.is_absolute():
            file = relative_to / file
        module = _exec_python(file)
    else:
        module = _import(where, spec)
    if not hasattr(module, name):
        public = [n for n in vars(module) if not n.startswith('_')]
        raise RuleError(
            f'target {spec!r}: {where} defines no {name!r}.{did_you_mean(name, public)}'
        )
    return _call_target(getattr(module, name), spec)


def _exec_python(file: epath.Path) -> Any:
    """Runs a Python file as a module of its own; its errors name the file and line."""
    if not file.is_file():
        near = did_you_mean(file.name, _names_in(file.parent))
        raise FileNotFoundError(f'No Python file {file}.{near}')
    name = f'_orbax_surgery_user_{abs(hash(str(file.resolve())))}'
    spec = importlib.util.spec_from_file_location(name, os.fspath(file))
    assert spec is not None and spec.loader is not None, f'cannot load {file}'
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name.
    with _importable(file.parent):
        try:
            spec.loader.exec_module(module)
        except SyntaxError as e:
            raise RuleError(f'{file}, line {e.lineno}: SyntaxError: {e.msg}.') from e
        except Exception as e:
            raise _user_error(e, file, 'running') from e
    return module


def _call_target(value: Any, what: str) -> PyTree:
    if not callable(value):
        return value
    try:
        return value()
    except SurgeryError:
        raise
    except Exception as e:
        file = inspect.getsourcefile(value) if inspect.isfunction(value) else None
        raise _user_error(e, epath.Path(file) if file else None, f'calling {what}') from e


def _user_error(e: Exception, file: epath.Path | None, doing: str) -> RuleError:
    frames = list(traceback.extract_tb(e.__traceback__))
    mine = [f for f in frames if file is not None and f.filename == os.fspath(file)]
    chosen = mine or frames
    at = f'{chosen[-1].filename}, line {chosen[-1].lineno}' if chosen else str(file)
    return RuleError(f'{type(e).__name__} while {doing} ({at}): {e}')


def _import(module: str, spec: str) -> Any:
    with _importable(epath.Path(os.getcwd())):
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is not None and module.startswith(e.name):
                raise RuleError(
                    f'target {spec!r}: no module named {e.name!r} (looked in the current '
                    'directory and sys.path). For a file, write path/to/file.py:function.'
                ) from e
            raise _user_error(e, None, f'importing {module}') from e
        except SyntaxError as e:
            raise RuleError(f'{e.filename}, line {e.lineno}: SyntaxError: {e.msg}.') from e
        except Exception as e:
            raise _user_error(e, None, f'importing {module}') from e


@contextlib.contextmanager
def _importable(directory: epath.Path) -> Iterator[None]:
    """Puts a directory first on sys.path while a user's file is imported."""
    entry = os.fspath(directory)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        sys.path.remove(entry)


def _names_in(directory: epath.Path) -> list[str]:
    return [p.name for p in directory.iterdir()] if directory.is_dir() else []
