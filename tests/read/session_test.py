"""Read-once planning: each stored chunk is read once per host, and freed after."""

import asyncio
import collections

import numpy as np
import pytest
from fixtures import axis_request, counting_reads, random_array, save, sds
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orbax_surgery as osurg
from orbax_surgery.arrays import expr as ex
from orbax_surgery.arrays import regions
from orbax_surgery.read.materialize import host_regions, run_sync
from orbax_surgery.read.session import Session, Usage


class ChunkedSource:
    """In-memory arrays stored in chunks, counting chunk reads as a chunked store does."""

    def __init__(self, values, chunks):
        self.values = values
        self.arrays = {
            k: ex.Source(k, v.shape, v.dtype, tuple(chunks[k])) for k, v in values.items()
        }
        self.chunk_reads = collections.Counter()

    async def open(self, keys):
        return None

    async def read(self, source, region):
        for c in regions.chunk_cover(region, source.chunk_shape):
            self.chunk_reads[source.key, c] += 1
        await asyncio.sleep(0)  # Let concurrent readers interleave, as real reads do.
        return np.asarray(regions.take(self.values[source.key], region))


def restore(source, target, rules, **kwargs):
    return osurg.materialize(osurg.resolve(source.arrays, target, rules), source, **kwargs)


UNROLL = osurg.Unstack(r'layers/(.*)', r'layers_{i}/\1')


def unrolled_target(mesh, n, shape):
    sharding = NamedSharding(mesh, P(None, 'x'))
    return {f'layers_{i}': {'w': sds(shape, sharding=sharding)} for i in range(n)}


def test_a_stack_saved_as_one_chunk_is_read_once_when_unrolled(mesh8):
    stacked = random_array((4, 16, 32))
    source = ChunkedSource({'layers/w': stacked}, {'layers/w': stacked.shape})
    out = restore(source, unrolled_target(mesh8, 4, (16, 32)), [UNROLL])
    for i in range(4):
        np.testing.assert_array_equal(out[f'layers_{i}']['w'], stacked[i])
    assert source.chunk_reads == {('layers/w', (0, 0, 0)): 1}


def test_a_chunk_bigger_than_the_budget_is_still_read_once(mesh8):
    stacked = random_array((4, 16, 32))
    source = ChunkedSource({'layers/w': stacked}, {'layers/w': stacked.shape})
    out = restore(source, unrolled_target(mesh8, 4, (16, 32)), [UNROLL], max_inflight_bytes=1024)
    np.testing.assert_array_equal(out['layers_3']['w'], stacked[3])
    assert source.chunk_reads == {('layers/w', (0, 0, 0)): 1}


def test_tied_weights_read_each_chunk_once_with_little_kept(mesh8):
    embedding = random_array((256, 64))
    source = ChunkedSource({'embed': embedding}, {'embed': (16, 64)})
    cols = NamedSharding(mesh8, P(None, 'x'))
    target = {'embed': sds((256, 64), sharding=cols), 'lm_head': sds((64, 256), sharding=cols)}
    rules = [osurg.Copy('embed', 'lm_head'), osurg.Transpose('lm_head', (1, 0))]
    plan = osurg.resolve(source.arrays, target, rules)
    blocks = [(step.expr, region) for step in plan.steps for region in host_regions(step)]
    usage = Usage.count(blocks)
    assert usage.chunks[('embed', (0, 0))] == 8 + 1  # Every embed shard, one lm_head shard.
    out = osurg.materialize(plan, source, max_inflight_bytes=16 * 64 * 4 * 4)
    np.testing.assert_array_equal(out['lm_head'], embedding.T)
    np.testing.assert_array_equal(out['embed'], embedding)
    assert set(source.chunk_reads.values()) == {1}
    assert len(source.chunk_reads) == 256 // 16


def test_blocks_sharing_a_chunk_are_scheduled_together():
    usage = Usage()
    usage.block_chunks = [[('a', (1,))], [('b', (0,))], [('a', (0,))], [('a', (1,))]]
    usage.chunks.update(c for cs in usage.block_chunks for c in cs)
    assert usage.order() == [0, 3, 1, 2]  # Shared ('a', 1) first, then the rest as given.


def test_kept_memory_stays_near_one_chunk_when_the_budget_is_tight(mesh8):
    embedding = random_array((256, 64))
    source = ChunkedSource({'embed': embedding}, {'embed': (16, 64)})
    rows = NamedSharding(mesh8, P('x'))
    target = {'a': sds((256, 64), sharding=rows), 'b': sds((256, 64), sharding=rows)}
    plan = osurg.resolve(source.arrays, target, [osurg.Rename('embed', 'a'), osurg.Copy('a', 'b')])
    blocks = [(step.expr, region) for step in plan.steps for region in host_regions(step)]
    usage = Usage.count(blocks)
    session = Session(source, usage, small_source_bytes=0)  # As if the embedding were big.

    async def run(order):
        for i in order:  # One block at a time, as a tight budget admits them.
            expr, region = blocks[i]
            np.testing.assert_array_equal(
                await expr.evaluate(region, session), regions.take(embedding, region)
            )

    run_sync(run(usage.order()))
    chunk = 16 * 64 * 4
    assert session.peak_kept_bytes <= 2 * chunk * 2, session.peak_kept_bytes
    assert session.kept_bytes == 0
    assert set(source.chunk_reads.values()) == {1}


@st.composite
def layouts(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 7)) for _ in range(ndim))
    chunks = tuple(draw(st.integers(1, n)) for n in shape)
    requests = draw(st.lists(st.tuples(*(axis_request(n) for n in shape)), min_size=1, max_size=6))
    small_source_bytes = draw(st.sampled_from([0, 2**20]))  # Chunk by chunk, or one box.
    return shape, chunks, requests, small_source_bytes


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_session_reads_give_exact_values_and_read_shared_chunks_once(layout):
    shape, chunks, requests, small_source_bytes = layout
    value = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    source = ChunkedSource({'w': value}, {'w': chunks})
    leaf = source.arrays['w']
    usage = Usage.count((leaf, r) for r in requests)
    session = Session(source, usage, small_source_bytes=small_source_bytes)

    async def run():
        return await asyncio.gather(*(session.read(leaf, r) for r in requests))

    for got, r in zip(run_sync(run()), requests, strict=True):
        np.testing.assert_array_equal(got, regions.take(value, r))
    for chunk, uses in usage.chunks.items():
        assert source.chunk_reads[chunk] == (1 if uses > 1 else uses)
    assert session.kept_bytes == 0


@pytest.mark.parametrize('cache_bytes', [0, 2**20])
def test_unrolling_a_one_chunk_checkpoint_reads_it_once(tmp_path, mesh8, cache_bytes):
    stacked = random_array((8, 64, 128))
    path = save(tmp_path / 'c', {'layers': {'w': stacked}})
    source = osurg.OrbaxCheckpoint(path, cache_bytes=cache_bytes)
    assert source.arrays['layers/w'].chunk_shape == stacked.shape
    plan = osurg.resolve(source.arrays, unrolled_target(mesh8, 8, (64, 128)), [UNROLL])
    assert plan.reads[0].needed == stacked.nbytes
    with counting_reads() as read:
        out = osurg.materialize(plan, source)
    np.testing.assert_array_equal(out['layers_5']['w'], stacked[5])
    assert 0.9 * stacked.nbytes <= read[0] <= 1.05 * stacked.nbytes  # zstd takes a little.


def test_a_small_source_in_many_chunks_is_read_in_one_go(mesh8):
    """LoRA's A: every shard reads a few rows, stored in many tiny chunks."""
    a = random_array((64, 8))
    source = ChunkedSource({'a': a}, {'a': (4, 8)})
    calls = []
    read = source.read

    async def counted(src, region):
        calls.append(region)
        return await read(src, region)

    source.read = counted
    leaf = source.arrays['a']
    requests = [(range(i, i + 16), range(8)) for i in range(0, 64, 16)] * 2
    usage = Usage.count((leaf, r) for r in requests)
    session = Session(source, usage)

    async def run():
        return await asyncio.gather(*(session.read(leaf, r) for r in requests))

    for got, r in zip(run_sync(run()), requests, strict=True):
        np.testing.assert_array_equal(got, regions.take(a, r))
    assert calls == [(range(64), range(8))]  # One read of the box, for 8 requests of 16 chunks.
    assert set(source.chunk_reads.values()) == {1}
    assert session.peak_kept_bytes == a.nbytes and session.kept_bytes == 0
