"""What a node announces of a blob: every piece it holds, and only the hashes that
coordinator has not had from it."""

from p2pd.core.bitfield import pack_bitfield, unpack_bitfield
from p2pd.io.swarm import BlobState

DIGEST = "sha256:" + "ab" * 32
SIZE = 4 << 20  # four pieces of 1 MiB


def _hash(index: int) -> bytes:
    return bytes([index + 1]) * 32


def test_a_coordinator_gets_each_hash_once_and_a_new_one_gets_them_all() -> None:
    state = BlobState(DIGEST, SIZE, 4, {0, 1}, [_hash(0), _hash(1), None, None])
    first, taught = state.announce("me:1", "c1:1")
    assert unpack_bitfield(first.hashed, 4) == {0, 1}
    assert first.hashes == _hash(0) + _hash(1)
    state.taught = ("c1:1", taught)
    state.held.add(2)
    state.hashes[2] = _hash(2)
    second, taught = state.announce("me:1", "c1:1")
    assert second.bitfield == pack_bitfield({0, 1, 2}, 4)
    assert unpack_bitfield(second.hashed, 4) == {2} and second.hashes == _hash(2)
    state.taught = ("c1:1", taught)
    again, _ = state.announce("me:1", "c1:1")
    assert again.hashed == pack_bitfield((), 4) and again.hashes == b""
    other, _ = state.announce("me:1", "c2:1")  # the coordinator changed: the whole table
    assert unpack_bitfield(other.hashed, 4) == {0, 1, 2}
    assert other.hashes == _hash(0) + _hash(1) + _hash(2)
