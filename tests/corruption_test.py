"""Damaged sources: every damage × format gives a specific error naming file and key, or
is caught by a verified restore; none returns wrong numbers unnoticed when verifying.

Each case damages one file of a pristine checkpoint (Orbax with OCDBT, Orbax
without it (plain zarr chunk files, compressed or not; zarr v3), safetensors
single and sharded), then restores it through `restore`, `plan_restore` and a
`CheckpointManager` (or `Checkpointer` for safetensors), with and without
`verify=True`. Orbax checkpoints are saved with `checksums=True`.
"""

import asyncio
import json
import os
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orbax_surgery as osurg
from orbax_surgery.huggingface.safetensors_file import write_file
from orbax_surgery.sources.safetensors import INDEX_FILE
from orbax_surgery.write.checksums import Recorder

W = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
B = np.arange(10, dtype=np.float32)
ORBAX = ('ocdbt', 'zarr', 'zarr-raw', 'zarr3')
SAFETENSORS = ('safetensors', 'safetensors-sharded')


def _orbax(root: Path, fmt: str, mesh) -> None:
    tree = {'w': jax.device_put(W, NamedSharding(mesh, P('x'))), 'b': B}
    if fmt in ('zarr-raw', 'zarr3'):  # Plain Orbax, checksums recorded beside.
        handler = ocp.PyTreeCheckpointHandler(
            use_ocdbt=False, use_compression=fmt == 'zarr3', use_zarr3=fmt == 'zarr3'
        )
        with ocp.CheckpointManager(root, item_handlers={'state': handler}) as manager:
            manager.save(1, args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree)))
        recorder = Recorder()
        recorder.add_tree(tree)
        asyncio.run(recorder.write(root / '1' / 'state'))
        return
    handler = osurg.SurgeryCheckpointHandler(use_ocdbt=fmt == 'ocdbt')
    args = osurg.SurgerySave(item=tree, checksums=True)
    with ocp.CheckpointManager(root, item_handlers={'state': handler}) as manager:
        manager.save(1, args=ocp.args.Composite(state=args))


def _safetensors(root: Path, fmt: str) -> None:
    root.mkdir()
    if fmt == 'safetensors':
        write_file(root / 'model.safetensors', {'w': W, 'b': B})
        return
    names = {'w': 'model-00001-of-00002.safetensors', 'b': 'model-00002-of-00002.safetensors'}
    write_file(root / names['w'], {'w': W})
    write_file(root / names['b'], {'b': B})
    (root / INDEX_FILE).write_text(json.dumps({'metadata': {}, 'weight_map': names}))


@pytest.fixture(scope='module')
def pristine(tmp_path_factory):
    mesh = jax.make_mesh((8,), ('x',))
    out = {}
    for fmt in ORBAX + SAFETENSORS:
        root = tmp_path_factory.mktemp('pristine') / fmt
        _orbax(root, fmt, mesh) if fmt in ORBAX else _safetensors(root, fmt)
        out[fmt] = root
    return out


def _item(root: Path, fmt: str) -> Path:
    return root / '1' / 'state' if fmt in ORBAX else root


def _victim(item: Path, fmt: str, what: str) -> Path:
    """The file of `item` that a case damages."""
    if what == 'chunk' and fmt == 'ocdbt':  # The data file holding w's chunks.
        return max((item / 'ocdbt.process_0' / 'd').iterdir(), key=lambda p: p.stat().st_size)
    if what == 'chunk' and fmt == 'zarr3':
        return item / 'w' / 'c' / '1' / '0'
    if what == 'chunk' and fmt in ORBAX:
        return item / 'w' / '1.0'
    if what == 'zarray' and fmt == 'zarr3':
        return item / 'w' / 'zarr.json'
    if what in ('chunk', 'header'):
        return item / (
            'model.safetensors'
            if fmt == 'safetensors'
            else json.loads((item / INDEX_FILE).read_text())['weight_map']['w']
        )
    if what == 'btree':  # The root b-tree node of the merged OCDBT database.
        (node,) = (item / 'd').iterdir()
        return node
    return (
        item
        / {
            'manifest': 'manifest.ocdbt',
            'process-manifest': 'ocdbt.process_0/manifest.ocdbt',
            'zarray': 'w/.zarray',
            'metadata': '_METADATA',
            'sharding': '_sharding',
            'index': INDEX_FILE,
        }[what]
    )


def _damage(victim: Path, damage: str) -> None:
    size = victim.stat().st_size
    if damage == 'truncate-0':
        os.truncate(victim, 0)
    elif damage == 'truncate-half':
        os.truncate(victim, size // 2)
    elif damage == 'delete':
        victim.unlink()
    elif damage == 'garbage':
        victim.write_bytes(b'\x00garbage{"\xff' * 8)
    elif damage == 'header-garbage':  # Garbage inside the JSON header, sizes kept.
        data = bytearray(victim.read_bytes())
        data[9:17] = b'\x00garbag\xff'
        victim.write_bytes(bytes(data))
    elif damage == 'directory':
        victim.unlink()
        victim.mkdir()
    elif damage == 'flip':  # One bit of the stored values, mid-file.
        data = bytearray(victim.read_bytes())
        data[len(data) * 3 // 4] ^= 0x10
        victim.write_bytes(bytes(data))
    elif damage == 'permission':
        victim.chmod(0)
    else:
        raise AssertionError(damage)


FILE_DAMAGES = ('truncate-0', 'truncate-half', 'delete', 'garbage', 'directory', 'permission')
CASES = [
    *[(f, 'chunk', d) for f in ('ocdbt', 'zarr', *SAFETENSORS) for d in (*FILE_DAMAGES, 'flip')],
    ('zarr-raw', 'chunk', 'flip'),
    *[('zarr3', 'chunk', d) for d in ('truncate-half', 'delete', 'flip')],
    ('zarr3', 'zarray', 'garbage'),
    *[('ocdbt', v, d) for v in ('manifest', 'btree', 'metadata', 'sharding') for d in FILE_DAMAGES],
    *[('ocdbt', 'process-manifest', d) for d in ('garbage', 'delete')],
    *[('zarr', 'zarray', d) for d in FILE_DAMAGES],
    *[(f, 'header', 'header-garbage') for f in SAFETENSORS],
    *[('safetensors-sharded', 'index', d) for d in FILE_DAMAGES],
]


def _expected(fmt: str, what: str, damage: str):
    """(error class, key the message names or None) or 'undetected' or 'harmless'."""
    if what == 'process-manifest':
        return 'harmless'  # After the merge, Orbax reads only the root manifest.
    if what == 'sharding' and damage == 'delete':
        return 'harmless'  # Orbax then reports no saved sharding; the target gives one.
    if damage == 'flip':
        return 'undetected'  # No checksum in the format: wrong values, unless verified.
    if damage == 'delete' and (what == 'metadata' or fmt in SAFETENSORS):
        unknown = what in ('metadata', 'index') or fmt == 'safetensors'
        return osurg.CheckpointNotFoundError, None if unknown else 'w'  # Unless an index says.
    if what in ('metadata', 'sharding'):
        return osurg.SourceReadError, None  # The whole tree's files: no one key to name.
    if fmt == 'safetensors' and damage != 'truncate-half':
        return osurg.SourceReadError, None  # The header is unreadable: its keys are unknown.
    if what == 'index':
        return osurg.SourceReadError, None
    if what in ('manifest', 'btree'):
        return osurg.SourceReadError, 'w|b'  # The first array whose metadata failed.
    return osurg.SourceReadError, 'w'


def _target(mesh):
    w = jax.ShapeDtypeStruct(W.shape, W.dtype, sharding=NamedSharding(mesh, P(None, 'x')))
    return {'w': w, 'b': jax.ShapeDtypeStruct(B.shape, B.dtype)}


def _entry_points(root: Path, fmt: str, target, verify: bool):
    """Each way to restore the damaged checkpoint: name -> thunk."""
    item = _item(root, fmt)

    def manager():
        args = osurg.SurgeryRestore(target=target, verify=verify)
        if fmt in SAFETENSORS:
            with ocp.Checkpointer(osurg.SurgeryCheckpointHandler()) as ckptr:
                return ckptr.restore(item, args=args)
        handlers = {'state': osurg.SurgeryCheckpointHandler()}
        with ocp.CheckpointManager(root, item_handlers=handlers) as mgr:
            return mgr.restore(1, args=ocp.args.Composite(state=args)).state

    return {'restore': lambda: osurg.restore(item, target, verify=verify), 'manager': manager}


def _correct(tree) -> bool:
    return np.array_equal(np.asarray(tree['w']), W) and np.array_equal(np.asarray(tree['b']), B)


def _check_error(error: BaseException, cls, key, names: list[str]) -> None:
    assert isinstance(error, cls), f'{type(error).__name__}: {error}'
    text = str(error)
    assert any(n in text for n in names), f'names none of {names}: {text}'
    if key is not None:
        assert re.search(rf"'({key})'", text), f'does not name {key!r}: {text}'


@pytest.mark.parametrize(('fmt', 'what', 'damage'), CASES, ids=['-'.join(c) for c in CASES])
def test_damage_gives_a_specific_error_or_is_caught_by_verify(
    pristine, tmp_path, mesh8, fmt, what, damage
):
    if damage == 'permission' and os.geteuid() == 0:
        pytest.skip('running as root, which reads files whatever their permissions')
    root = tmp_path / fmt
    shutil.copytree(pristine[fmt], root)
    item = _item(root, fmt)
    victim = _victim(item, fmt, what)
    _damage(victim, damage)
    # The file's path; for a deleted file, its name (a listing says which is missing).
    names = [str(victim)] + ([victim.name] if damage == 'delete' else [])
    target = _target(mesh8)
    expected = _expected(fmt, what, damage)
    verifiable = fmt in ORBAX

    plan_error = None
    try:
        plan = osurg.plan_restore(item, target)
    except osurg.SurgeryError as e:
        plan_error = e
    else:
        assert plan.errors == ()
    for verify in (False, True):
        for entry, run in _entry_points(root, fmt, target, verify).items():
            where = f'{entry}(verify={verify})'
            try:
                result = run()
            except osurg.SurgeryError as e:
                error = e
            else:
                error = None
            if expected == 'harmless':
                assert error is None and _correct(result), where
            elif expected == 'undetected' and not verify:
                # Orbax's zstd frames and safetensors carry no checksum: a flipped bit
                # decodes to wrong values (documented), or fails to decode.
                assert error is not None or not _correct(result), where
                if error is not None:
                    _check_error(error, osurg.SourceReadError, 'w', names + [str(item)])
            elif expected == 'undetected' and verifiable:
                assert error is not None, f'{where} returned without noticing'
                _check_error(error, osurg.ChecksumMismatchError, 'w', [str(victim)])
                assert re.search(r'block \(\d+, \d+\) \[\d+:\d+, 0:64\]', str(error)), error
            elif expected == 'undetected':
                assert error is not None, f'{where} returned without noticing'
                assert 'no checksums' in str(error), error  # Safetensors saved without them.
            elif verify and not verifiable:
                assert error is not None, where  # Damaged or not, it has no checksums.
            else:
                cls, key = expected
                assert error is not None, f'{where} returned despite {damage} {victim}'
                _check_error(error, cls, key, names)
                if plan_error is not None:
                    _check_error(plan_error, cls, key, names)


def test_metadata_damage_fails_the_plan_already(pristine, tmp_path, mesh8):
    root = tmp_path / 'c'
    shutil.copytree(pristine['ocdbt'], root)
    _damage(_victim(_item(root, 'ocdbt'), 'ocdbt', 'manifest'), 'garbage')
    with pytest.raises(osurg.SourceReadError, match=re.escape(str(_item(root, 'ocdbt')))):
        osurg.plan_restore(_item(root, 'ocdbt'), _target(mesh8))


@pytest.mark.parametrize('fmt', ['metadata', 'safetensors'])
def test_permission_denied_is_a_source_read_error(pristine, tmp_path, monkeypatch, fmt):
    """Simulated (tests may run as root): the files Python itself opens."""
    denied = PermissionError(13, 'Permission denied')
    if fmt == 'metadata':
        root = tmp_path / 'c'
        shutil.copytree(pristine['ocdbt'], root)
        item = _item(root, 'ocdbt')
        cls = type(epath.Path(item))
        original = cls.read_text

        def read_text(self, *args, **kwargs):
            if self.name == '_METADATA':
                raise denied
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, 'read_text', read_text)
    else:
        item = tmp_path / 'st'
        shutil.copytree(pristine['safetensors'], item)

        def refuse(*args, **kwargs):
            raise denied

        from orbax_surgery.sources.file_reads import LocalFile

        monkeypatch.setattr(LocalFile, '_fileno', refuse)
    with pytest.raises(osurg.SourceReadError, match='Permission denied') as info:
        osurg.restore(item, {'w': ..., 'b': ...})
    assert str(item) in str(info.value)
