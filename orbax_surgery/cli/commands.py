"""The command line's commands that read: inspect and plan, and the planning convert shares."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

import jax
from etils import epath

from orbax_surgery import locations
from orbax_surgery.cli.listing import describe, format_description, item_path
from orbax_surgery.cli.progress import Status
from orbax_surgery.cli.python_rules import load_target
from orbax_surgery.cli.rules_file import RulesFile, load_rules_file
from orbax_surgery.cli.rules_file_entries import ConfigPreset
from orbax_surgery.errors import CheckpointNotFoundError
from orbax_surgery.keys import PyTree
from orbax_surgery.plan.plan import Plan, format_plan, plan_summary
from orbax_surgery.plan.resolve import resolve
from orbax_surgery.read.verify import verified
from orbax_surgery.rules.rule import Rule
from orbax_surgery.sources.open import open_source
from orbax_surgery.sources.source import ArraySource
from orbax_surgery.write.atomic import replaced_siblings

REPLACED = '.replaced-'


def use_cpu() -> None:
    """Files to files need no accelerator: leave them to others, unless JAX_PLATFORMS says."""
    if not os.environ.get('JAX_PLATFORMS'):
        jax.config.update('jax_platforms', 'cpu')


def inspect_command(args: argparse.Namespace, status: Status) -> int:
    use_cpu()
    path = locations.absolute(args.path)
    check_not_mid_replace(path)
    status.show(f'reading the metadata of {locations.shown(path)}')
    description = describe(path, step=args.step)
    status.clear()
    if args.json:
        print(json.dumps(description, indent=2))
    else:
        print(format_description(description, all_layers=args.all_layers))
    return 0


def plan_command(args: argparse.Namespace, status: Status) -> int:
    use_cpu()
    plan = planned(args, status).plan
    status.clear()
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


def planned(args: argparse.Namespace, status: Status) -> Planned:
    """The plan, and what it comes from, saying each step on the status line."""
    if args.rules:
        status.show(f'reading the rules in {args.rules}')
    rules_file = load_rules_file(args.rules) if args.rules else RulesFile(epath.Path('.'))
    if args.preset:  # After the file's rules: a preset fills what they leave.
        auto = ConfigPreset(args.layers, args.config, args.preset, to=args.layout)
        rules_file = dataclasses.replace(rules_file, rules=(*rules_file.rules, auto))
    target = rules_file.target
    if args.target:
        status.show(f'loading the target {args.target}')
        target = load_target(args.target, relative_to=epath.Path(os.getcwd()))
    check_not_mid_replace(locations.absolute(args.src))
    src = item_path(locations.absolute(args.src), step=args.step, item=args.item)
    status.show(f'opening {locations.shown(src)}')
    opened = open_source(src)
    if getattr(args, 'verify', False):
        opened = verified(opened)
    if target is None:
        target = rules_file.target_for(opened)
    source, rules = rules_file.compose(opened, target)
    status.show(f'planning {len(source.arrays)} arrays')
    plan = resolve(source.arrays, target, rules)
    return Planned(plan, source, target, rules, rules_file.export_config(opened))


def check_not_mid_replace(path: str) -> None:
    """A missing `path` that a killed `convert --overwrite` moved aside: say where it is."""
    if locations.is_url(path):
        return  # Object storage has no renames, so no such leftovers.
    old = replaced_siblings(epath.Path(path), REPLACED)
    if old and not os.path.lexists(path):
        raise CheckpointNotFoundError(
            f'No checkpoint at {path}: a `convert --overwrite` to it was killed while replacing '
            f'it, and the previous result is at {old[-1]}. Move it back (mv {old[-1]} {path}), '
            'or run the convert again (it removes the old one once the new one is in place).'
        )


def demo_command(directory: str | None, devices: int) -> int:
    jax.config.update('jax_num_cpu_devices', devices)
    from orbax_surgery.cli.demo import run_demo

    return 0 if run_demo(directory) else 1
