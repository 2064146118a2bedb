"""Orbax checkpoints in object storage: gs:// on fake-gcs-server, s3:// on moto, for real."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orbax_surgery as osurg
from orbax_surgery.sources import orbax_on_s3

RNG = np.random.default_rng(0)
TREE = {
    'dense_0': {'kernel': RNG.standard_normal((16, 8)).astype(np.float32)},
    'embed': {'embedding': RNG.standard_normal((32, 16)).astype(np.float32)},
    'step': np.int32(7),
}
RULES = [
    osurg.Rename(r'dense_(\d+)/(.*)', r'Dense_\1/\2'),
    osurg.Copy('embed/embedding', 'lm_head/kernel'),
    osurg.Transpose('lm_head/kernel', (1, 0)),
    osurg.Drop('step'),
]


@pytest.fixture(params=['s3', 'gcs'])
def bucket(request):
    return request.getfixturevalue(request.param)()


def target(mesh):
    def leaf(shape, spec):
        return jax.ShapeDtypeStruct(shape, np.float32, sharding=NamedSharding(mesh, P(*spec)))

    return {
        'Dense_0': {'kernel': leaf((16, 8), ('x',))},
        'embed': {'embedding': leaf((32, 16), (None, 'x'))},
        'lm_head': {'kernel': leaf((16, 32), (None, 'x'))},
    }


def check(restored):
    np.testing.assert_array_equal(restored['Dense_0']['kernel'], TREE['dense_0']['kernel'])
    np.testing.assert_array_equal(restored['lm_head']['kernel'], TREE['embed']['embedding'].T)


def test_every_restore_entry_point_reads_a_bucket(bucket, mesh8):
    root = f'{bucket}/run'
    with ocp.CheckpointManager(root) as manager:
        manager.save(1, args=ocp.args.StandardSave(TREE))
        manager.wait_until_finished()
    item = f'{root}/1/default'
    plan = osurg.plan_restore(item, target(mesh8), RULES)
    assert plan.errors == () and plan.reads[0].needed == (16 * 8 + 32 * 16) * 4
    check(osurg.restore(item, target(mesh8), RULES))
    with ocp.CheckpointManager(root) as manager:
        check(manager.restore(1, args=osurg.SurgeryRestore(target=target(mesh8), rules=RULES)))
    with ocp.Checkpointer(osurg.SurgeryCheckpointHandler()) as ckptr:
        check(ckptr.restore(item, args=osurg.SurgeryRestore(target=target(mesh8), rules=RULES)))
    # Read through gaps between chunks as Orbax does: the same values.
    check(
        osurg.restore(osurg.OrbaxCheckpoint(item, read_gap_bytes=1_000_000), target(mesh8), RULES)
    )
    with pytest.raises(ValueError, match='read_gap_bytes must be >= 0, got -1'):
        osurg.OrbaxCheckpoint(item, read_gap_bytes=-1)


def test_surgery_save_writes_what_plain_orbax_restores(bucket):
    with ocp.CheckpointManager(
        f'{bucket}/run', item_handlers=osurg.SurgeryCheckpointHandler()
    ) as m:
        m.save(3, args=osurg.SurgerySave(item=TREE, rules=RULES[:1], checksums=True))
        m.wait_until_finished()
    with ocp.CheckpointManager(f'{bucket}/run') as manager:
        plain = manager.restore(3, args=ocp.args.StandardRestore())
    np.testing.assert_array_equal(plain['Dense_0']['kernel'], TREE['dense_0']['kernel'])
    verified = osurg.restore(f'{bucket}/run/3/default', verify=True)
    np.testing.assert_array_equal(verified['embed']['embedding'], TREE['embed']['embedding'])


def test_lora_save_and_restore_in_a_bucket(bucket):
    base = {'dense': {'kernel': np.ones((8, 6), np.float32)}}
    lora = osurg.LoraSpec(['dense/kernel'], rank=2, alpha=4).bind(base)
    adapters = {
        'dense': {
            'kernel_lora_a': np.ones((8, 2), np.float32),
            'kernel_lora_b': np.full((2, 6), 0.25, np.float32),
        }
    }
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        ckptr.save(f'{bucket}/base', args=ocp.args.StandardSave(base))
    with ocp.Checkpointer(osurg.LoraCheckpointHandler()) as ckptr:
        ckptr.save(f'{bucket}/adapters', args=osurg.LoraSave(item=adapters, lora=lora))
        merged = ckptr.restore(f'{bucket}/adapters', args=osurg.LoraRestore(base=f'{bucket}/base'))
    np.testing.assert_allclose(merged['dense']['kernel'], np.full((8, 6), 2.0))  # 1 + 2 * 0.5


def test_a_missing_bucket_and_a_missing_checkpoint_name_the_url(bucket):
    scheme = bucket.split('://')[0]
    with pytest.raises(
        osurg.CheckpointNotFoundError, match=rf'{scheme}://no-such-bucket-9/x.*bucket'
    ):
        osurg.plan_restore(f'{scheme}://no-such-bucket-9/x')
    with pytest.raises(osurg.CheckpointNotFoundError, match=rf'No checkpoint at {bucket}/nothing'):
        osurg.restore(f'{bucket}/nothing')


def test_an_unfinalized_checkpoint_in_a_bucket_is_refused(s3):
    bucket = s3()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(f'{bucket}/ckpt', TREE)
    import boto3  # The fixture points it at the emulator.

    name = bucket.split('://')[1]
    boto3.client('s3').delete_object(Bucket=name, Key='ckpt/commit_success.txt')
    with pytest.raises(osurg.UnfinalizedCheckpointError, match='no commit_success.txt'):
        osurg.restore(f'{bucket}/ckpt')


def test_the_s3_lookup_can_be_undone_and_done_again():
    orbax_on_s3.disallow()
    try:
        from orbax.checkpoint._src.serialization import tensorstore_utils

        assert not tensorstore_utils._use_gcs_driver('s3://b/x')
    finally:
        assert orbax_on_s3.allow()
    assert tensorstore_utils._use_gcs_driver('s3://b/x')
