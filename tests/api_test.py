import doctest
import importlib
import inspect
import pkgutil
import re
import sys

import orbax_surgery as osurg
import orbax_surgery.huggingface
import orbax_surgery.lora


def test_public_api_is_pinned():
    assert set(osurg.__all__) == {
        'AmbiguousRuleError',
        'Cast',
        'CheckpointNotFoundError',
        'ChecksumMismatchError',
        'Combine',
        'Concatenate',
        'Copy',
        'DestinationExistsError',
        'Drop',
        'DtypeMismatchError',
        'Exported',
        'Fallback',
        'FromPyTorch',
        'LoraCheckpointHandler',
        'LoraCheckpointableHandler',
        'LoraLayout',
        'LoraMismatchError',
        'LoraRestore',
        'LoraSave',
        'LoraSpec',
        'LoraTarget',
        'MapValue',
        'ModuleLists',
        'OrbaxCheckpoint',
        'OrbaxTransforms',
        'PeerTimeoutError',
        'PeftAdapter',
        'Plan',
        'PyTorchCheckpoint',
        'Rename',
        'Reshape',
        'RuleError',
        'SafetensorsCheckpoint',
        'ShapeMismatchError',
        'Slice',
        'SourceReadError',
        'Split',
        'Stack',
        'Step',
        'SurgeryCheckpointHandler',
        'SurgeryCheckpointableHandler',
        'SurgeryError',
        'SurgeryRestore',
        'SurgerySave',
        'ToPyTorch',
        'Transpose',
        'TreeSource',
        'UnfinalizedCheckpointError',
        'Unstack',
        'UnmatchedKeyError',
        'Unsuffixed',
        'UnusedKeyError',
        'apply_rules',
        'from_pytorch',
        'layer_save_args',
        'materialize',
        'plan_lora_restore',
        'plan_restore',
        'read_lora_layout',
        'read_peft_adapter',
        'resolve',
        'restore',
        'save_peft_adapter',
        'save_safetensors',
        'to_pytorch',
    }


def test_the_lora_and_huggingface_namespaces_are_pinned():
    assert set(orbax_surgery.lora.__all__) == {
        'Adapter',
        'LoraCheckpointHandler',
        'LoraCheckpointableHandler',
        'LoraLayout',
        'LoraRestore',
        'LoraSave',
        'LoraSpec',
        'LoraTarget',
        'LowRankUpdate',
        'MergeAdapters',
        'plan_lora_restore',
        'read_lora_layout',
    }
    assert set(orbax_surgery.huggingface.__all__) == {
        'Exported',
        'FromPyTorch',
        'ModuleLists',
        'PeftAdapter',
        'Preset',
        'SafetensorsCheckpoint',
        'ToPyTorch',
        'from_pytorch',
        'load',
        'preset',
        'read_peft_adapter',
        'save_peft_adapter',
        'save_safetensors',
        'to_pytorch',
    }


def test_every_public_name_has_a_docstring():
    missing = [n for n in osurg.__all__ if not inspect.getdoc(getattr(osurg, n))]
    assert missing == []


def test_every_public_name_has_an_example_the_suite_runs():
    # Errors included: their examples show what raises them, with the message.
    public = {n: getattr(osurg, n) for n in osurg.__all__}
    for namespace in (orbax_surgery.lora, orbax_surgery.huggingface):
        public |= {n: getattr(namespace, n) for n in namespace.__all__}
    finder = doctest.DocTestFinder()
    collected = set()
    for module in {sys.modules[obj.__module__] for obj in public.values()}:
        collected |= {t.name for t in finder.find(module) if t.examples}
    missing = [
        name
        for name, obj in sorted(public.items())
        if f'{obj.__module__}.{obj.__qualname__}' not in collected
    ]
    assert missing == [], f'no doctest example (>>>) in the docstrings of {missing}'


# What another library prints for its objects: a new release may change it (ml_dtypes 0.7 printed
# `dtype=dtype(bfloat16)`), so doctests show `.tolist()` and `.dtype.name` instead.
_FOREIGN_REPR = re.compile(
    r'\b(array|Array|dtype|ShapeDtypeStruct|NamedSharding|PartitionSpec)\(|dtype='
)


def test_doctests_do_not_print_reprs_of_other_libraries():
    finder = doctest.DocTestFinder()
    modules = [
        importlib.import_module(m.name)
        for m in pkgutil.walk_packages(osurg.__path__, 'orbax_surgery.')
    ]
    found = [
        f'{test.name}: {example.want.strip()[:60]!r}'
        for module in [osurg, *modules]
        for test in finder.find(module)
        for example in test.examples
        if _FOREIGN_REPR.search(example.want)
    ]
    assert found == [], f'print .tolist() and .dtype.name instead: {found}'


def test_errors_share_one_root_and_are_value_errors():
    errors = [getattr(osurg, n) for n in osurg.__all__ if n.endswith('Error')]
    assert all(issubclass(e, osurg.SurgeryError) for e in errors)
    assert issubclass(osurg.SurgeryError, ValueError)
    assert not any(issubclass(e, KeyError) for e in errors)
    assert issubclass(osurg.CheckpointNotFoundError, FileNotFoundError)


def test_args_are_registered_with_the_handler():
    import orbax.checkpoint as ocp

    get = ocp.args.get_registered_handler_cls
    assert get(osurg.SurgeryRestore) is osurg.SurgeryCheckpointHandler
    assert get(osurg.SurgerySave) is osurg.SurgeryCheckpointHandler
    assert osurg.SurgeryCheckpointHandler.typestr() == 'orbax_surgery.SurgeryCheckpointHandler'
    assert get(osurg.LoraSave) is osurg.LoraCheckpointHandler
    assert get(osurg.LoraRestore) is osurg.LoraCheckpointHandler
    assert osurg.LoraCheckpointHandler.typestr() == 'orbax_surgery.LoraCheckpointHandler'
