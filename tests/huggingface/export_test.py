import errno
import json
import os
import re

import jax
import ml_dtypes
import numpy as np
import pytest
from fixtures import random_array, save, sds, sharded
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orbax_surgery as osurg
from orbax_surgery.errors import DestinationExistsError
from orbax_surgery.huggingface.export import save_safetensors
from orbax_surgery.keys import nest

safetensors_numpy = pytest.importorskip('safetensors.numpy')


def read_back(directory):
    """Every tensor of an exported directory, read by the `safetensors` library."""
    names = sorted(p.name for p in directory.iterdir() if p.name.endswith('.safetensors'))
    out = {}
    for name in names:
        out.update(safetensors_numpy.load_file(directory / name))
    return out


def header(path):
    with open(path, 'rb') as f:
        n = int.from_bytes(f.read(8), 'little')
        return json.loads(f.read(n)), 8 + n


def leftovers(parent, *expected):
    """Entries of `parent` other than `expected`: temporary or set-aside directories."""
    return sorted(p.name for p in parent.iterdir() if p.name not in expected)


def flax_target(state_dict):
    """The Flax (Linen) tree matching a Hugging Face Llama state dict: names, shapes."""
    flat = {}
    for name, tensor in state_dict.items():
        key = name.removeprefix('model.').replace('.', '/')
        key = re.sub(r'(^|/)layers/(\d+)', r'\1layers_\2', key)
        module, leaf = key.rsplit('/', 1)
        shape = tuple(tensor.shape)
        if leaf == 'weight':
            if module.endswith('embed_tokens'):
                leaf = 'embedding'
            elif len(shape) == 2:
                leaf, shape = 'kernel', shape[::-1]
            else:
                leaf = 'scale'
        flat[f'{module}/{leaf}'] = sds(shape)
    return nest(flat)


def test_llama_through_orbax_loads_in_transformers_with_the_same_logits(tmp_path):
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / 'hf', max_shard_size='50KB')
    state = model.state_dict()

    # Import to Flax names and layouts, and save that with plain Orbax.
    flax_tree = osurg.restore(
        tmp_path / 'hf', flax_target(state), osurg.from_pytorch(drop_prefix='model')
    )
    assert flax_tree['layers_1']['mlp']['down_proj']['kernel'].shape == (128, 64)
    save(tmp_path / 'orbax', flax_tree)

    # Export back: Llama keeps everything but lm_head under 'model.'.
    rules = [
        *osurg.to_pytorch(add_prefix='model'),
    ]
    # With checksums: transformers ignores the _CHECKSUMS/ directory inside the export.
    out = save_safetensors(
        tmp_path / 'orbax', tmp_path / 'out', rules=rules, max_shard_size='50KB', checksums=True
    )
    assert (tmp_path / 'out' / '_CHECKSUMS' / 'process_0.json').is_file()
    total = sum(t.numel() * 4 for t in state.values())
    assert out.total_size == total and out.bytes_written == total
    assert out.files[-1] == 'model.safetensors.index.json' and len(out.files) > 3
    index = json.loads((tmp_path / 'out' / 'model.safetensors.index.json').read_text())
    assert index['metadata']['total_size'] == total
    assert sorted(index['weight_map']) == sorted(state)
    for name in out.files[:-1]:
        meta, start = header(tmp_path / 'out' / name)
        assert meta.pop('__metadata__') == {'format': 'pt'}
        # Within the limit, unless a file holds a single bigger tensor.
        assert os.path.getsize(tmp_path / 'out' / name) - start <= 50_000 or len(meta) == 1

    model.config.save_pretrained(tmp_path / 'out')
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / 'out').eval()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    ids = torch.arange(24).reshape(2, 12) % config.vocab_size
    with torch.no_grad():
        want, got = model(ids).logits, loaded(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_small_shard_size_writes_files_in_key_order_with_an_index(tmp_path):
    tree = {f'w{i}': random_array((16, 16), seed=i) for i in range(5)}  # 1 KiB each
    tree['big'] = random_array((64, 64), seed=9)  # 16 KiB: a file of its own
    out = save_safetensors(tree, tmp_path / 'out', max_shard_size='2500B')
    names = [f'model-0000{i}-of-00004.safetensors' for i in range(1, 5)]
    assert out.files == (*names, 'model.safetensors.index.json')
    index = json.loads((tmp_path / 'out' / out.files[-1]).read_text())
    assert index['metadata'] == {'total_parameters': 5 * 256 + 4096, 'total_size': out.total_size}
    assert index['weight_map'] == {
        'big': names[0],
        'w0': names[1],
        'w1': names[1],
        'w2': names[2],
        'w3': names[2],
        'w4': names[3],
    }
    got = read_back(tmp_path / 'out')
    assert sorted(got) == sorted(tree)
    for name, value in tree.items():
        np.testing.assert_array_equal(got[name], value)
    assert leftovers(tmp_path, 'out') == []


def test_everything_that_fits_is_one_model_safetensors_without_an_index(tmp_path):
    tree = {'dense': {'kernel': random_array((8, 4)), 'bias': np.arange(4, dtype=np.int64)}}
    out = save_safetensors(
        tree, tmp_path / 'out', rules=osurg.to_pytorch(), metadata={'source': 'test'}
    )
    assert out.files == ('model.safetensors',)
    assert sorted(os.listdir(tmp_path / 'out')) == ['model.safetensors']
    meta, _ = header(tmp_path / 'out' / 'model.safetensors')
    assert meta['__metadata__'] == {'format': 'pt', 'source': 'test'}
    got = read_back(tmp_path / 'out')
    np.testing.assert_array_equal(got['dense.weight'], tree['dense']['kernel'].T)
    np.testing.assert_array_equal(got['dense.bias'], tree['dense']['bias'])


def test_bf16_and_mixed_dtypes_are_kept_bit_exact_and_aligned(tmp_path):
    bf16 = random_array((6, 10)).astype(ml_dtypes.bfloat16)
    tree = {
        'a_flag': np.array([True, False, True]),
        'b_half': random_array((3, 5)).astype(np.float16),
        'c_bf16': bf16,
        'd_i64': np.arange(3, dtype=np.int64),
        'e_scalar': np.float32(2.5),
    }
    save_safetensors(tree, tmp_path / 'out')
    path = tmp_path / 'out' / 'model.safetensors'
    meta, start = header(path)
    assert meta['c_bf16']['dtype'] == 'BF16' and meta['e_scalar']['shape'] == []
    for name, entry in meta.items():
        if name != '__metadata__':
            assert (start + entry['data_offsets'][0]) % tree[name].dtype.itemsize == 0, name
    src = osurg.SafetensorsCheckpoint(path)
    for name, value in tree.items():
        got = src.read_now(src.arrays[name], tuple(range(n) for n in np.shape(value)))
        assert got.dtype == value.dtype
        want = np.asarray(value).reshape(-1)
        np.testing.assert_array_equal(got.reshape(-1).view(np.uint8), want.view(np.uint8))


def test_a_sharded_live_tree_is_written_block_by_block(tmp_path, mesh8):
    kernel, embed = random_array((32, 64)), random_array((128, 32), seed=1)
    tree = {
        'dense': {'kernel': sharded(kernel, mesh8, None, 'x')},
        'embed': {'embedding': sharded(embed, mesh8, 'x')},
        'norm': {'scale': sharded(np.ones(32, np.float32), mesh8)},  # replicated
    }
    written = []
    out = save_safetensors(
        tree,
        tmp_path / 'out',
        rules=osurg.to_pytorch(),
        max_inflight_bytes=4096,  # blocks of at most 1 KiB: many of them
        progress=written.append,
    )
    assert sum(written) == out.bytes_written == out.total_size == (32 * 64 + 128 * 32 + 32) * 4
    assert len(written) == 8 + 16 + 1 and max(written) <= 1024  # embed shards cut in two
    got = read_back(tmp_path / 'out')
    np.testing.assert_array_equal(got['dense.weight'], kernel.T)
    np.testing.assert_array_equal(got['embed.weight'], embed)
    np.testing.assert_array_equal(got['norm.weight'], np.ones(32, np.float32))


def test_a_scanned_orbax_checkpoint_exports_as_unrolled_layers(tmp_path):
    stacked = random_array((3, 8, 16))
    path = save(tmp_path / 'orbax', {'params': {'layers': {'mlp': {'kernel': stacked}}}})
    rules = osurg.to_pytorch(drop_prefix='params', add_prefix='model', layers='stacked')
    save_safetensors(path, tmp_path / 'out', rules=rules)
    got = read_back(tmp_path / 'out')
    assert sorted(got) == [f'model.layers.{i}.mlp.weight' for i in range(3)]
    for i in range(3):
        np.testing.assert_array_equal(got[f'model.layers.{i}.mlp.weight'], stacked[i].T)


def test_a_safetensors_checkpoint_exports_again_with_a_rename(tmp_path):
    value = random_array((4, 6))
    save_safetensors({'a': {'w': value}}, tmp_path / 'one')
    save_safetensors(tmp_path / 'one', tmp_path / 'two', rules=[osurg.Rename('a/w', 'b/w')])
    np.testing.assert_array_equal(read_back(tmp_path / 'two')['b.w'], value)
    # Onto itself: the old files are read to the end before they are replaced.
    save_safetensors(
        tmp_path / 'two', tmp_path / 'two', rules=[osurg.Rename('b/w', 'c/w')], overwrite=True
    )
    assert list(read_back(tmp_path / 'two')) == ['c.w']
    np.testing.assert_array_equal(read_back(tmp_path / 'two')['c.w'], value)
    assert leftovers(tmp_path, 'one', 'two') == []


def test_an_existing_destination_is_an_error_and_left_untouched(tmp_path):
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'keep.txt').write_text('mine')
    with pytest.raises(DestinationExistsError, match=re.escape(str(tmp_path / 'out'))):
        save_safetensors({'w': np.ones(3)}, tmp_path / 'out')
    assert os.listdir(tmp_path / 'out') == ['keep.txt']
    assert leftovers(tmp_path, 'out') == []


def test_overwrite_replaces_the_destination_only_once_the_new_one_is_complete(tmp_path):
    save_safetensors({'old': np.ones(3)}, tmp_path / 'out')
    save_safetensors({'new': np.zeros(3)}, tmp_path / 'out', overwrite=True)
    assert sorted(read_back(tmp_path / 'out')) == ['new']
    assert leftovers(tmp_path, 'out') == []


@pytest.mark.parametrize(
    'value, hint',
    [(np.ones(3, np.complex64), "Cast('model/w', 'float32')"), ('text', "Drop('model/w')")],
    ids=['complex64', 'string'],
)
def test_a_dtype_safetensors_cannot_hold_names_the_key_and_writes_nothing(tmp_path, value, hint):
    tree = {'w': value, 'ok': np.ones(2)}
    rules = [osurg.Rename('(w)', r'model/\1')]
    with pytest.raises(osurg.SurgeryError, match=r"'model/w' \(tensor 'model.w'") as info:
        save_safetensors(tree, tmp_path / 'out', rules=rules)
    assert hint in str(info.value)
    assert leftovers(tmp_path) == []


def test_keys_that_become_one_tensor_name_are_an_error(tmp_path):
    with pytest.raises(osurg.SurgeryError, match=r"are both tensor 'a\.b\.c'"):
        save_safetensors({'a.b': {'c': np.ones(1)}, 'a': {'b.c': np.ones(1)}}, tmp_path / 'out')


@pytest.mark.parametrize('size', ['5 parsecs', 0, '-1GB'])
def test_a_bad_shard_size_is_an_error(tmp_path, size):
    with pytest.raises(osurg.SurgeryError, match='max_shard_size'):
        save_safetensors({'w': np.ones(1)}, tmp_path / 'out', max_shard_size=size)


def test_a_plan_error_is_raised_before_anything_is_written(tmp_path):
    with pytest.raises(osurg.UnmatchedKeyError, match="'missing'"):
        save_safetensors({'w': np.ones(2)}, tmp_path / 'out', target={'missing': sds((2,))})
    assert leftovers(tmp_path) == []


class FailingSource(osurg.TreeSource):
    """Reads fine until key 'w3'."""

    async def read(self, source, region):
        if source.key == 'w3':
            raise osurg.SourceReadError('disk on fire')
        return await super().read(source, region)


def test_a_failed_read_midway_leaves_no_destination_and_no_temp_dir(tmp_path):
    source = FailingSource({f'w{i}': random_array((32, 32), seed=i) for i in range(6)})
    with pytest.raises(osurg.SourceReadError, match='disk on fire'):
        save_safetensors(source, tmp_path / 'out', max_shard_size=4096, max_inflight_bytes=8192)
    assert leftovers(tmp_path) == []


def test_a_failed_write_midway_keeps_the_old_destination(tmp_path, monkeypatch):
    save_safetensors({'old': np.ones(3)}, tmp_path / 'out')
    calls = []
    real = os.pwrite

    def pwrite(fd, data, at):
        calls.append(at)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real(fd, data, at)

    monkeypatch.setattr(os, 'pwrite', pwrite)
    tree = {f'w{i}': random_array((32, 32), seed=i) for i in range(6)}
    with pytest.raises(OSError, match='No space left'):
        save_safetensors(tree, tmp_path / 'out', overwrite=True, max_inflight_bytes=8192)
    monkeypatch.undo()
    assert len(calls) > 2
    assert sorted(read_back(tmp_path / 'out')) == ['old']
    assert leftovers(tmp_path, 'out') == []


def test_a_value_function_failing_midway_leaves_no_destination(tmp_path):
    def explode(x):
        if isinstance(x, jax.core.Tracer):  # The plan traces it once, abstractly.
            return x
        raise RuntimeError('bad value')

    tree = {'a': np.ones(4, np.float32), 'b': np.ones(4, np.float32)}
    with pytest.raises(osurg.RuleError, match='bad value'):
        save_safetensors(tree, tmp_path / 'out', rules=[osurg.MapValue('b', explode)])
    assert leftovers(tmp_path) == []


def test_a_target_sharding_decides_the_blocks_of_a_checkpoint_export(tmp_path, mesh8):
    value = random_array((16, 8))
    path = save(tmp_path / 'orbax', {'w': value})
    target = {'w': sds((8, 16), sharding=NamedSharding(mesh8, P('x')))}
    written = []
    save_safetensors(
        path,
        tmp_path / 'out',
        target=target,
        rules=[osurg.Transpose('w', (1, 0))],
        progress=written.append,
    )
    assert written == [16 * 4] * 8  # one block per row, as the target's shards
    np.testing.assert_array_equal(read_back(tmp_path / 'out')['w'], value.T)


def test_an_interrupted_export_leaves_no_destination(tmp_path):
    def interrupt(nbytes):
        raise KeyboardInterrupt

    tree = {f'w{i}': random_array((32, 32), seed=i) for i in range(4)}
    with pytest.raises(KeyboardInterrupt):
        save_safetensors(tree, tmp_path / 'out', progress=interrupt, max_inflight_bytes=8192)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    'spec, index',
    [
        (('x',), np.s_[::-3, 1:7:2]),
        ((None, 'x'), np.s_[5:40:4, ::-1]),
        (('a', 'b'), np.s_[3, 2:]),
    ],
    ids=['rows-strided-backwards', 'cols-strided', 'grid-row'],
)
def test_slices_of_a_sharded_live_array_are_read_from_its_shards(
    tmp_path, mesh8, mesh2x4, spec, index
):
    value = random_array((48, 16))
    mesh = mesh2x4 if 'a' in spec else mesh8
    tree = {'w': sharded(value, mesh, *spec)}
    save_safetensors(tree, tmp_path / 'out', rules=[osurg.Slice('w', index)])
    np.testing.assert_array_equal(read_back(tmp_path / 'out')['w'], value[index])
