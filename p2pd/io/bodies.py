"""Cutting an upstream blob response into pieces as it streams in."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx

from p2pd.core.pieces import PieceLayout
from p2pd.errors import DigestMismatch, UpstreamError
from p2pd.io.throttle import Throttle

OnPiece = Callable[[int, bytes], Awaitable[object]]


async def cut_into_pieces(
    response: httpx.Response, layout: PieceLayout, first: int, stop: int, *,
    skip: int = 0, throttle: Throttle, on_piece: OnPiece, whole: bool,
    stop_early: Callable[[], bool] = lambda: False,
) -> int:
    """Hand pieces ``first..stop-1`` of ``response``'s body to ``on_piece``, in order.

    ``skip`` bytes are dropped first (a server that ignored ``Range``). With ``whole``
    the body must end with piece ``stop - 1``; otherwise reading stops there. Returns the
    index of the next piece not handed over; raises :class:`UpstreamError` when the body
    breaks or ends early (the caller resumes from the returned index).
    """
    chunks: list[bytes] = []
    have, index = 0, first
    try:
        async for chunk in response.aiter_raw():
            await throttle.moved(len(chunk))
            if skip:
                cut = min(skip, len(chunk))
                chunk, skip = chunk[cut:], skip - cut
            chunks.append(chunk)
            have += len(chunk)
            while index < stop and have >= layout.length(index):
                # One join per piece: the only copy the bytes take on the way in.
                joined = b"".join(chunks)
                length = layout.length(index)
                rest = joined[length:]
                chunks, have = ([rest] if rest else []), len(rest)
                await on_piece(index, joined[:length] if rest else joined)
                index += 1
            if index == stop:
                if whole and have:
                    raise DigestMismatch(f"upstream sent more than {layout.size} bytes")
                if not whole:
                    break
            if stop_early():
                return index
    except httpx.HTTPError as exc:
        raise UpstreamError(f"upstream stream broke at piece {index}: {exc!r}") from exc
    if index < stop:
        raise UpstreamError(f"upstream body ended at piece {index} of {first}-{stop}")
    return index
