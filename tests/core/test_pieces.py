"""Piece math: the size rule and the layout cover every blob exactly."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pd.core.pieces import MAX_PIECE, MIN_PIECE, TARGET_PIECES, MiB, PieceLayout, piece_size_for

sizes = st.integers(min_value=0, max_value=64 << 30)


@given(sizes)
def test_piece_size_is_a_bounded_power_of_two(size: int) -> None:
    piece = piece_size_for(size)
    assert piece & (piece - 1) == 0
    assert MIN_PIECE <= piece <= MAX_PIECE


@given(sizes)
def test_piece_size_is_the_smallest_that_keeps_the_target(size: int) -> None:
    piece = piece_size_for(size)
    layout = PieceLayout(size, piece)
    if piece < MAX_PIECE:
        assert layout.count <= TARGET_PIECES
    if piece > MIN_PIECE:
        assert PieceLayout(size, piece // 2).count > TARGET_PIECES


@pytest.mark.parametrize(
    ("size", "piece"),
    [(0, MiB), (1, MiB), (512 * MiB, MiB), (512 * MiB + 1, 2 * MiB), (1 << 30, 2 * MiB),
     (4 << 30, 8 * MiB), (8 << 30, 16 * MiB), (100 << 30, 16 * MiB)],
)
def test_piece_size_table(size: int, piece: int) -> None:
    assert piece_size_for(size) == piece


@given(sizes, st.sampled_from([1, 7, MiB, 4 * MiB]))
def test_spans_cover_the_blob_exactly_without_overlap(size: int, piece: int) -> None:
    layout = PieceLayout(size, piece)
    position = 0
    for index in range(min(layout.count, 5000)):
        start, stop = layout.span(index)
        assert start == position
        assert stop > start
        assert stop - start <= piece
        position = stop
    if layout.count <= 5000:
        assert position == size


@given(st.data(), st.integers(min_value=1, max_value=10_000), st.integers(1, 1000))
def test_pieces_for_a_range_are_exactly_those_overlapping_it(
    data: st.DataObject, size: int, piece: int
) -> None:
    layout = PieceLayout(size, piece)
    start = data.draw(st.integers(0, size))
    stop = data.draw(st.integers(start, size))
    chosen = set(layout.pieces_for(start, stop))
    for index in range(layout.count):
        lo, hi = layout.span(index)
        assert (index in chosen) == (start < stop and lo < stop and start < hi)


def test_empty_blob_has_no_pieces() -> None:
    layout = PieceLayout.for_size(0)
    assert layout.count == 0
    assert list(layout.pieces_for(0, 0)) == []


def test_out_of_range_piece_is_refused() -> None:
    layout = PieceLayout(10, 4)
    with pytest.raises(IndexError):
        layout.span(3)
    with pytest.raises(ValueError):
        layout.pieces_for(0, 11)
