"""Presets on real models: each family imported from `config.json` alone, proven by logits.

For every model_type `transformers` builds a tiny model (every parameter
perturbed) and saves it in shards; `osurg.huggingface.preset(directory)`
gives the target tree and the rules. The target must be exactly the Flax
model's parameter tree (`hf_models.flax_model`, written from PyTorch's
modeling code), the restore sharded over 8 devices must give PyTorch's
logits, unrolled and scanned, and the export rules must give back the stored
tensors bit for bit, which `transformers` then loads with the same logits.
"""

import json

import hf_models
import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

import orbax_surgery as osurg
from orbax_surgery.keys import flatten
from orbax_surgery.sources.safetensors import key_to_name

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TOL = {'rtol': 1e-4, 'atol': 1e-4}
IDS = np.random.default_rng(0).integers(0, 128, size=(2, 12)).astype(np.int32)
QUICK = {
    ('llama', 'stacked'),
    ('phi3', 'unrolled'),
    ('mixtral', 'stacked'),
    ('gpt_neox', 'unrolled'),
}


def cases():
    for model_type in hf_models.MODEL_TYPES:
        for layers in ('unrolled', 'stacked'):
            slow = (model_type, layers) not in QUICK
            marks = [pytest.mark.slow] if slow else []
            yield pytest.param(model_type, layers, id=f'{model_type}-{layers}', marks=marks)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    """model_type -> (directory, PyTorch logits), each saved once, in several shards."""
    made = {}

    def get(model_type):
        if model_type not in made:
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(hf_models.tiny_config(model_type))
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
            model.eval()
            path = tmp_path_factory.mktemp(model_type)
            model.save_pretrained(path, max_shard_size='40KB')
            ids = torch.from_numpy(IDS).long()
            with torch.no_grad():
                logits = model(ids, attention_mask=torch.ones_like(ids)).logits.numpy()
            made[model_type] = path, logits
        return made[model_type]

    return get


def sharded(target, mesh):
    """Each leaf sharded over the mesh along its largest axis that divides evenly."""

    def one(leaf):
        fits = [a for a, n in enumerate(leaf.shape) if n % mesh.size == 0]
        spec = [None] * len(leaf.shape)
        if fits:
            spec[max(fits, key=lambda a: leaf.shape[a])] = 'x'
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, P(*spec)))

    return jax.tree.map(one, target)


def stored_tensors(path):
    out = {}
    for file in sorted(path.glob('*.safetensors')):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize(('model_type', 'layers'), list(cases()))
def test_a_family_imports_by_its_config_alone_with_pytorchs_logits(saved, model_type, layers):
    path, want = saved(model_type)
    preset = osurg.huggingface.preset(path, layers=layers)
    config = transformers.AutoConfig.from_pretrained(path)
    model = hf_models.flax_model(config, scan=layers == 'stacked')

    # The config-derived target is the model's own parameter tree.
    abstract = jax.eval_shape(model.init, jax.random.key(0), IDS)['params']
    got = {k: (v.shape, v.dtype) for k, v in flatten(preset.target)[0].items()}
    assert got == {k: (v.shape, v.dtype) for k, v in flatten(abstract)[0].items()}

    mesh = jax.make_mesh((8,), ('x',), axis_types=(AxisType.Auto,))
    source = osurg.SafetensorsCheckpoint(path)
    plan = osurg.plan_restore(source, sharded(preset.target, mesh), preset.import_rules)
    assert plan.errors == (), str(plan)
    params = osurg.restore(source, sharded(preset.target, mesh), preset.import_rules)
    logits = jax.jit(model.apply)({'params': params}, IDS)
    np.testing.assert_allclose(np.asarray(logits), want, **TOL)
    # Every stored byte read once (a tied embedding too), none in vain.
    assert (
        source.bytes_read == plan.reads[0].needed == sum(s.nbytes for s in source.arrays.values())
    )

    # And back: the stored tensors, bit for bit, under their stored names.
    back = osurg.apply_rules(params, None, preset.export_rules)
    exported = {key_to_name(k): np.asarray(v) for k, v in flatten(back)[0].items()}
    stored = stored_tensors(path)
    assert sorted(exported) == sorted(stored)
    for name, tensor in stored.items():
        np.testing.assert_array_equal(exported[name], tensor, err_msg=name)


@pytest.mark.parametrize(
    'model_type',
    [
        'phi3',
        'gpt_neox',
        pytest.param('mixtral', marks=pytest.mark.slow),
        pytest.param('gpt2', marks=pytest.mark.slow),
        pytest.param('gemma2', marks=pytest.mark.slow),
    ],
)
def test_an_export_with_its_config_loads_in_transformers_with_the_same_logits(
    saved, tmp_path, model_type
):
    path, want = saved(model_type)
    preset = osurg.huggingface.preset(path, layers='stacked')
    params = osurg.restore(path, preset.target, preset.import_rules)
    out = tmp_path / 'export'
    osurg.save_safetensors(
        params, out, rules=preset.export_rules, config=preset.config, max_shard_size='40KB'
    )
    assert json.loads((out / 'config.json').read_text())['model_type'] == model_type
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.from_numpy(IDS).long()
    with torch.no_grad():
        logits = model(ids, attention_mask=torch.ones_like(ids)).logits.numpy()
    np.testing.assert_allclose(logits, want, **TOL)


def test_the_command_line_imports_and_exports_a_family_in_one_line(saved, tmp_path, capsys):
    from orbax_surgery.cli import main as cli

    path, want = saved('phi3')
    run = tmp_path / 'run'
    assert cli.main(['plan', str(path), '--preset', 'import', '--layers', 'stacked']) == 0
    assert 'Plan (ready)' in capsys.readouterr().out
    args = [path, run, '--preset', 'import', '--layers', 'stacked', '--dst-step', '0', '-q']
    assert cli.main(['convert', *map(str, args)]) == 0
    out = tmp_path / 'hf'
    args = [run, out, '--to', 'safetensors', '--preset', 'export', '--layers', 'stacked']
    assert cli.main(['convert', *map(str, [*args, '--config', path, '-q'])]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(IDS).long()).logits.numpy()
    np.testing.assert_allclose(logits, want, **TOL)
    # Without a config beside an Orbax source, the export says how to give one.
    args = [run, tmp_path / 'hf2', '--to', 'safetensors', '--preset', 'export']
    assert cli.main(['convert', *map(str, args)]) == 2
    assert 'No config.json at' in capsys.readouterr().err
