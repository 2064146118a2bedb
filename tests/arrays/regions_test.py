import itertools

import numpy as np
import pytest
from fixtures import axis_request
from hypothesis import given
from hypothesis import strategies as st

from orbax_surgery.arrays import regions


def test_from_index_handles_none_negative_and_int():
    assert regions.from_index((slice(None), slice(-2, None)), (3, 5)) == (range(3), range(3, 5))
    assert regions.from_index((1,), (3, 4)) == (range(1, 2), range(4))
    assert regions.from_index((-1,), (3,)) == (range(2, 3),)


@given(st.integers(1, 40), st.data())
def test_compose_equals_indexing_twice(n, data):
    outer = data.draw(axis_request(n))
    inner = data.draw(axis_request(len(outer)))
    assert list(regions.compose(outer, inner)) == [outer[k] for k in inner]


@given(st.integers(1, 30), st.data())
def test_to_slice_selects_the_range(n, data):
    r = data.draw(axis_request(n))
    assert list(np.arange(n)[regions.to_slice(r)]) == list(r)


@given(st.lists(st.integers(0, 6), min_size=1, max_size=4), st.data())
def test_pieces_split_a_request_across_concatenated_parts(sizes, data):
    total = sum(sizes)
    request = data.draw(axis_request(total))
    offsets = np.cumsum([0] + sizes)
    got = []
    for piece, positions, sub in regions.pieces(request, sizes):
        assert [request[k] - offsets[piece] for k in positions] == list(sub)
        got += [offsets[piece] + i for i in sub]
    assert got == list(request)


@given(st.integers(1, 30), st.data())
def test_split_ascending_gives_positive_steps_and_the_flips(n, data):
    region = (data.draw(axis_request(n)), data.draw(axis_request(n)))
    ascending, flips = regions.split_ascending(region)
    assert all(r.step > 0 for r in ascending)
    block = np.arange(n * n).reshape(n, n)
    got = (
        np.flip(regions.take(block, ascending), flips) if flips else regions.take(block, ascending)
    )
    np.testing.assert_array_equal(got, regions.take(block, region))


def test_chunk_ids_for_dense_and_sparse_strides():
    assert regions.chunk_ids(range(5, 23), 8) == [0, 1, 2]
    assert regions.chunk_ids(range(0, 64, 32), 8) == [0, 4]
    assert regions.chunk_ids(range(22, 4, -1), 8) == [0, 1, 2]
    assert regions.chunk_ids(range(0), 8) == []


def test_chunk_nbytes_clips_edge_chunks():
    assert regions.chunk_nbytes((1, 0), (10, 4), (8, 4), 4) == 2 * 4 * 4


@pytest.mark.parametrize(
    'shapes',
    [
        ((4, 6, 5), (4, 2, 3, 5)),
        ((6,), (2, 3)),
        ((2, 3), (6,)),
        ((2, 1, 3), (6,)),
        ((1,), ()),
        ((), (1, 1)),
        ((3, 4), (4, 3)),
        ((2, 3, 4), (4, 6)),
        ((0, 3), (3, 0)),
        ((8, 12), (2, 4, 3, 4)),
    ],
    ids=str,
)
def test_reshape_map_reads_a_box_and_gathers_exactly(shapes):
    in_shape, out_shape = shapes
    x = np.arange(int(np.prod(in_shape))).reshape(in_shape)
    y = x.reshape(out_shape)
    mapping = regions.ReshapeMap(in_shape, out_shape)
    per_axis = [
        [range(0)] if n == 0 else [range(n), range(n)[1:], range(n)[::-2], range(n)[-1:]]
        for n in out_shape
    ]
    for request in itertools.product(*per_axis):
        in_region, gathers = mapping.input_region(request)
        got = mapping.finish(regions.take(x, in_region), request, gathers)
        np.testing.assert_array_equal(got, regions.take(y, request))


def test_reshape_that_splits_heads_reads_only_the_needed_rows():
    mapping = regions.ReshapeMap((512, 8 * 64), (512, 8, 64))
    in_region, gathers = mapping.input_region((range(0, 64), range(2, 4), range(64)))
    assert in_region == (range(0, 64), range(128, 256))
    assert gathers == [None, None]


def test_union_size_of_huge_regions_is_exact_and_quick():
    # min(range) walked all 2**40 indices; the widths' product passed int64.
    a = (range(0, 2**40), range(2**30))
    b = (range(2**40 - 1, 2**39 - 1, -1), range(2**29, 2**30))
    assert regions.union_size([a, b]) == 2**70
    c = (range(2**62 - 2, -1, -2), range(4))
    assert regions.union_size([c, (range(0), range(0))]) == (2**62 - 1) * 4


def test_an_empty_request_of_a_reshape_allocates_no_indices():
    # An empty array reshaped to (1, 0, 2**40): indexing every element of the last axis
    # raised MemoryError.
    reshape = regions.ReshapeMap((0, 2), (1, 0, 2**40))
    request = regions.full((1, 0, 2**40))
    in_region, gathers = reshape.input_region(request)
    assert in_region == (range(0), range(0)) and gathers == [None]
    assert reshape.finish(np.zeros((0, 0)), request, gathers).shape == (1, 0, 2**40)


@pytest.mark.parametrize(
    'request_',
    [
        (range(2**20), range(2**20)),  # All of it.
        (range(2**19, 2**20), range(2**20)),  # A shard of rows.
        (range(3, 4), range(2**19, 2**20)),  # Half a row.
    ],
    ids=['full', 'rows', 'half-row'],
)
def test_a_reshape_of_consecutive_elements_reads_its_box_without_index_arrays(request_):
    # Indexing every one of 2**40 elements raised MemoryError when planning a Reshape.
    mapping = regions.ReshapeMap((2**20, 2**20), (2**40,))
    in_region, gathers = mapping.input_region((range(0, 2**40),))
    assert in_region == regions.full((2**20, 2**20)) and gathers == [None]
    back = regions.ReshapeMap((2**40,), (2**20, 2**20))
    in_region, gathers = back.input_region(request_)
    lo = request_[0][0] * 2**20 + request_[1][0]
    assert in_region == (range(lo, lo + regions.size_of(request_)),) and gathers == [None]
