"""Peer authentication by an optional shared cluster secret (HMAC-SHA256 challenge).

How it works: each side puts a fresh 16-byte nonce in its HELLO. Once a side has the
other's HELLO it sends ``AUTH_PROOF(mac)`` with

    mac = HMAC-SHA256(secret, b"p2pd-auth-v1" + role + own nonce + peer nonce + own node id)

and checks the peer's proof the same way with the roles swapped. Everything before the
node id has a fixed length, so the concatenation is unambiguous.

- The nonces make every proof specific to one connection: a recorded proof is useless
  on another connection, as long as nonces are unpredictable. Give the connection a
  :class:`random.SystemRandom` in production; a seeded :class:`random.Random` is for
  tests and the simulation only.
- The role byte (initiator or responder) makes a proof useless when reflected back to
  the node that made it on the same connection.
- A peer may not claim our own node id: otherwise an attacker could open a second
  connection to us and have us compute, as the responder there, the very proof we
  expect on the first connection (a parallel-session reflection).
- A side with a secret announces :data:`AUTH_FEATURE` in its HELLO, so a node with a
  secret and a node without one both refuse at once with a clear reason. Leaving the
  feature out gains an attacker nothing: a node with a secret always demands a proof.

The proof authenticates cluster membership, not the bytes that follow: on a path an
attacker controls, use TLS as well. Pieces are protected by their sha256 either way.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Iterable

from p2pd.core.messages import ERROR_AUTH, NONCE_SIZE, AuthProof, Hello
from p2pd.errors import RemoteProtocolError

AUTH_CONTEXT = b"p2pd-auth-v1"
"""Domain separation label at the start of every MAC input."""

AUTH_FEATURE = "auth-hmac-sha256"
"""HELLO feature of a node that has a cluster secret and expects a proof."""

MIN_SECRET_SIZE = 16
"""Shortest cluster secret accepted, in bytes (128 bits)."""


class Role(enum.Enum):
    """Which end of the connection a node is; its value is the role byte of the MAC."""

    INITIATOR = 1
    RESPONDER = 2

    @property
    def peer(self) -> Role:
        """The role of the other end."""
        return Role.RESPONDER if self is Role.INITIATOR else Role.INITIATOR


def check_secret(secret: bytes) -> bytes:
    """Return ``secret`` if it can serve as a cluster secret, else raise :class:`ValueError`."""
    if not isinstance(secret, bytes):
        raise ValueError("the cluster secret must be bytes")
    if len(secret) < MIN_SECRET_SIZE:
        raise ValueError(f"the cluster secret must be at least {MIN_SECRET_SIZE} bytes")
    return secret


def compute_proof(
    secret: bytes, role: Role, own_nonce: bytes, peer_nonce: bytes, own_node_id: str
) -> bytes:
    """The MAC a node in ``role`` sends to prove it knows ``secret``."""
    if len(own_nonce) != NONCE_SIZE or len(peer_nonce) != NONCE_SIZE:
        raise ValueError(f"nonces are {NONCE_SIZE} bytes")
    message = AUTH_CONTEXT + bytes([role.value]) + own_nonce + peer_nonce
    return hmac.new(secret, message + own_node_id.encode(), hashlib.sha256).digest()


def verify_proof(
    secret: bytes,
    peer_role: Role,
    peer_nonce: bytes,
    own_nonce: bytes,
    peer_node_id: str,
    mac: bytes,
) -> bool:
    """Whether ``mac`` is the proof the peer (in ``peer_role``) should have sent.

    The comparison takes the same time wherever the MACs differ.
    """
    expected = compute_proof(secret, peer_role, peer_nonce, own_nonce, peer_node_id)
    return hmac.compare_digest(expected, mac)


def hello_features(features: Iterable[str], secret: bytes | None) -> tuple[str, ...]:
    """The HELLO features of a node: ``features`` plus :data:`AUTH_FEATURE` with a secret."""
    chosen = tuple(features)
    if AUTH_FEATURE in chosen:
        raise ValueError(f"{AUTH_FEATURE!r} is added by the connection when a secret is set")
    return chosen + ((AUTH_FEATURE,) if secret is not None else ())


class Authenticator:
    """Our side of the authentication on one connection (used by ``PeerConnection``).

    ``hello`` is the HELLO we send; ``secret`` is ``None`` when the cluster has none.
    """

    def __init__(self, hello: Hello, role: Role, secret: bytes | None) -> None:
        self._hello = hello
        self._role = role
        self._secret = None if secret is None else check_secret(secret)

    def check_hello(self, peer: Hello) -> AuthProof | None:
        """Check the peer's HELLO; return the proof to send back, if we have a secret.

        Raises :class:`RemoteProtocolError` if the peer reflects our nonce, claims our
        node id, or disagrees with us about having a cluster secret.
        """
        if peer.nonce == self._hello.nonce:
            raise RemoteProtocolError("the peer's HELLO repeats our nonce (reflected?)")
        if peer.node_id == self._hello.node_id:
            raise RemoteProtocolError(f"the peer claims our own node id {peer.node_id!r}")
        wants_proof = AUTH_FEATURE in peer.features
        if self._secret is None:
            if wants_proof:
                raise RemoteProtocolError(
                    "the peer requires a cluster secret and none is configured here",
                    code=ERROR_AUTH,
                )
            return None
        if not wants_proof:
            raise RemoteProtocolError(
                "authentication required: the peer has no cluster secret", code=ERROR_AUTH
            )
        ours = self._hello
        mac = compute_proof(self._secret, self._role, ours.nonce, peer.nonce, ours.node_id)
        return AuthProof(mac)

    def check_proof(self, peer: Hello, proof: AuthProof) -> None:
        """Raise :class:`RemoteProtocolError` unless ``proof`` is the peer's valid proof."""
        if self._secret is None or not verify_proof(
            self._secret, self._role.peer, peer.nonce, self._hello.nonce, peer.node_id, proof.mac
        ):
            raise RemoteProtocolError(
                "authentication failed: the peer's proof does not match our cluster secret",
                code=ERROR_AUTH,
            )
