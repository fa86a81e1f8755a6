"""Peer authentication: the HMAC proofs and the handshake of two connections wired together."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import random

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pd.core.auth import (
    AUTH_FEATURE,
    Role,
    check_secret,
    compute_proof,
    hello_features,
    verify_proof,
)
from p2pd.core.messages import ERROR_AUTH, AuthProof, Hello, Message, Ping
from p2pd.core.protocol import CLOSED, NEED_DATA, PeerConnection, State, encode_frame
from p2pd.errors import LocalProtocolError, RemoteProtocolError

SECRET = b"cluster-secret-0123456789"
OTHER = b"another-secret-0123456789"
nonces = st.binary(min_size=16, max_size=16)
node_ids = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,40}", fullmatch=True)


def test_proof_is_the_documented_hmac() -> None:
    own, peer = bytes(range(16)), bytes(range(16, 32))
    expected = hmac.new(
        SECRET, b"p2pd-auth-v1" + b"\x01" + own + peer + b"node-a", hashlib.sha256
    ).digest()
    assert compute_proof(SECRET, Role.INITIATOR, own, peer, "node-a") == expected


@given(st.binary(min_size=16, max_size=64), nonces, nonces, node_ids, st.sampled_from(Role))
def test_a_proof_verifies_only_with_the_same_secret_role_nonces_and_node(
    secret: bytes, peer_nonce: bytes, own_nonce: bytes, node: str, role: Role
) -> None:
    mac = compute_proof(secret, role, peer_nonce, own_nonce, node)
    assert verify_proof(secret, role, peer_nonce, own_nonce, node, mac)
    assert not verify_proof(secret + b"x", role, peer_nonce, own_nonce, node, mac)
    assert not verify_proof(secret, role.peer, peer_nonce, own_nonce, node, mac)
    assert not verify_proof(secret, role, peer_nonce, own_nonce, node + "x", mac)
    if peer_nonce != own_nonce:
        assert not verify_proof(secret, role, own_nonce, peer_nonce, node, mac)


def test_secrets_and_features() -> None:
    assert Role.INITIATOR.peer is Role.RESPONDER and Role.RESPONDER.peer is Role.INITIATOR
    assert check_secret(SECRET) == SECRET
    with pytest.raises(ValueError):
        check_secret(b"x" * 15)
    assert hello_features(("zstd",), SECRET) == ("zstd", AUTH_FEATURE)
    assert hello_features(("zstd",), None) == ("zstd",)
    with pytest.raises(ValueError):
        hello_features((AUTH_FEATURE,), None)


def conn(node: str, role: Role, secret: bytes | None, seed: int) -> PeerConnection:
    return PeerConnection(node, role=role, secret=secret, rng=random.Random(seed))


def exchange(
    a: PeerConnection, b: PeerConnection
) -> tuple[list[Message] | RemoteProtocolError, list[Message] | RemoteProtocolError]:
    """Shuttle bytes until both sides are quiet: each side's messages, or its error."""
    results: dict[PeerConnection, list[Message] | RemoteProtocolError] = {a: [], b: []}
    for _ in range(4):
        for src, dst in ((a, b), (b, a)):
            if data := src.data_to_send():
                dst.receive_data(data)
        for side in (a, b):
            events = results[side]
            if isinstance(events, RemoteProtocolError):
                continue
            try:
                while (event := side.next_event()) is not NEED_DATA and event is not CLOSED:
                    events.append(event)
            except RemoteProtocolError as exc:
                results[side] = exc
    return results[a], results[b]


def test_handshake_without_a_secret() -> None:
    a, b = conn("node-a", Role.INITIATOR, None, 1), conn("node-b", Role.RESPONDER, None, 2)
    events_a, events_b = exchange(a, b)
    assert events_a == [b.our_hello] and events_b == [a.our_hello]
    assert a.state is b.state is State.READY
    assert a.peer_hello == b.our_hello


def test_handshake_with_a_shared_secret() -> None:
    a, b = conn("node-a", Role.INITIATOR, SECRET, 1), conn("node-b", Role.RESPONDER, SECRET, 2)
    events_a, events_b = exchange(a, b)
    assert isinstance(events_a, list) and isinstance(events_b, list)
    assert [type(e) for e in events_a] == [type(e) for e in events_b] == [Hello, AuthProof]
    assert a.state is b.state is State.READY
    assert AUTH_FEATURE in a.our_hello.features


def test_different_secrets_fail_on_both_sides() -> None:
    a, b = conn("node-a", Role.INITIATOR, SECRET, 1), conn("node-b", Role.RESPONDER, OTHER, 2)
    for result in exchange(a, b):
        assert isinstance(result, RemoteProtocolError)
        assert "authentication failed" in result.message and result.code == ERROR_AUTH


@pytest.mark.parametrize("secret_side", ["initiator", "responder"])
def test_a_node_with_a_secret_and_one_without_refuse_each_other(secret_side: str) -> None:
    a_secret = SECRET if secret_side == "initiator" else None
    b_secret = SECRET if secret_side == "responder" else None
    a = conn("node-a", Role.INITIATOR, a_secret, 1)
    b = conn("node-b", Role.RESPONDER, b_secret, 2)
    result_a, result_b = exchange(a, b)
    with_secret, without = (result_a, result_b) if a_secret else (result_b, result_a)
    assert isinstance(with_secret, RemoteProtocolError)
    assert "authentication required" in with_secret.message
    assert isinstance(without, RemoteProtocolError)
    assert "requires a cluster secret" in without.message


def hello_from(node: str, nonce: bytes, *, auth: bool = True) -> bytes:
    return encode_frame(Hello(1, node, nonce, (AUTH_FEATURE,) if auth else ()))


def test_anything_but_a_proof_is_refused_while_authenticating() -> None:
    a = conn("node-a", Role.INITIATOR, SECRET, 1)
    a.receive_data(hello_from("mallory", bytes(16)) + encode_frame(Ping(1)))
    assert isinstance(a.next_event(), Hello)
    with pytest.raises(RemoteProtocolError, match="authentication required"):
        a.next_event()


def test_a_proof_to_a_node_without_a_secret_is_refused() -> None:
    a = conn("node-a", Role.INITIATOR, None, 1)
    a.receive_data(hello_from("node-b", bytes(16), auth=False) + encode_frame(AuthProof(bytes(32))))
    assert isinstance(a.next_event(), Hello)
    with pytest.raises(RemoteProtocolError, match="no cluster secret"):
        a.next_event()


def test_a_reflected_proof_fails() -> None:
    a = conn("node-a", Role.INITIATOR, SECRET, 1)
    a.data_to_send()
    a.receive_data(hello_from("mallory", bytes(16)))
    a.next_event()
    own_proof = a.data_to_send()[4:]
    a.receive_data(len(own_proof).to_bytes(4, "big") + own_proof)
    with pytest.raises(RemoteProtocolError, match="authentication failed"):
        a.next_event()


def test_a_reflected_hello_fails() -> None:
    a = conn("node-a", Role.INITIATOR, SECRET, 1)
    a.receive_data(a.data_to_send())
    with pytest.raises(RemoteProtocolError, match="repeats our nonce"):
        a.next_event()


def test_a_parallel_session_cannot_lend_its_proof() -> None:
    """Mallory opens a second connection to node-a to make it compute the proof it expects."""
    first = conn("node-a", Role.INITIATOR, SECRET, 1)  # node-a dialled mallory
    second = conn("node-a", Role.RESPONDER, SECRET, 2)  # mallory dials node-a
    nonce_first, nonce_second = first.our_hello.nonce, second.our_hello.nonce
    # Claiming node-a's own id is refused outright.
    second.receive_data(hello_from("node-a", nonce_first))
    with pytest.raises(RemoteProtocolError, match="our own node id"):
        second.next_event()
    # Under another id, the proof node-a makes on the second connection is bound to node-a.
    second = conn("node-a", Role.RESPONDER, SECRET, 2)
    second.data_to_send()
    second.receive_data(hello_from("mallory", nonce_first))
    second.next_event()
    lent = second.data_to_send()
    first.receive_data(hello_from("mallory", nonce_second) + lent)
    first.next_event()
    with pytest.raises(RemoteProtocolError, match="authentication failed"):
        first.next_event()


def test_no_message_is_sent_before_the_peer_is_authenticated() -> None:
    a = conn("node-a", Role.INITIATOR, SECRET, 1)
    a.receive_data(hello_from("node-b", bytes(16)))
    a.next_event()
    assert a.state is State.AWAIT_AUTH
    with pytest.raises(LocalProtocolError, match="in state AWAIT_AUTH"):
        a.send(Ping(1))


def test_a_hello_without_auth_feature_still_needs_a_proof_when_we_have_a_secret() -> None:
    a = conn("node-a", Role.INITIATOR, SECRET, 1)
    raw = msgpack.packb([Hello.TAG, 1, "node-b", bytes(16), []], use_bin_type=True)
    a.receive_data(len(raw).to_bytes(4, "big") + raw)
    with pytest.raises(RemoteProtocolError, match="authentication required") as info:
        a.next_event()
    assert info.value.code == ERROR_AUTH


@given(st.booleans(), st.lists(st.integers(0, 200), max_size=40), st.integers(0, 1000))
def test_the_handshake_survives_any_split_of_the_bytes(
    with_secret: bool, points: list[int], seed: int
) -> None:
    secret = SECRET if with_secret else None
    a = conn("node-a", Role.INITIATOR, secret, seed)
    b = conn("node-b", Role.RESPONDER, secret, seed + 1)
    seen: dict[PeerConnection, list[type]] = {a: [], b: []}
    for _ in range(3):
        for src, dst in ((a, b), (b, a)):
            data = src.data_to_send()
            cuts = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
            for start, stop in itertools.pairwise(cuts):
                dst.receive_data(data[start:stop])
                while (event := dst.next_event()) is not NEED_DATA:
                    seen[dst].append(type(event))
    expected = [Hello, AuthProof] if with_secret else [Hello]
    assert seen[a] == seen[b] == expected
    assert a.state is b.state is State.READY
