"""Content digests as the OCI image spec defines them.

Only ``sha256`` is accepted: it is what every registry and containerd use, and one
algorithm keeps the cache layout and the piece tables simple.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from p2pd.errors import DigestInvalid

_SHA256_HEX = re.compile(r"[a-f0-9]{64}")
_ALGORITHM = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*")


@dataclass(frozen=True, slots=True)
class Digest:
    """A validated ``sha256:<hex>`` digest."""

    hex: str

    algorithm = "sha256"

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``text``; raise :class:`DigestInvalid` with the reason if it is not valid."""
        algorithm, sep, encoded = text.partition(":")
        if not sep:
            raise DigestInvalid(f"digest {text[:80]!r} has no algorithm prefix")
        if not _ALGORITHM.fullmatch(algorithm):
            raise DigestInvalid(f"digest algorithm {algorithm[:20]!r} is malformed")
        if algorithm != "sha256":
            raise DigestInvalid(f"digest algorithm {algorithm!r} is not supported (only sha256)")
        if not _SHA256_HEX.fullmatch(encoded):
            raise DigestInvalid("sha256 digest must be 64 lowercase hexadecimal characters")
        return cls(encoded)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Digest:
        """The digest whose hash value is the 32 bytes ``raw``."""
        if len(raw) != 32:
            raise DigestInvalid("a sha256 value is 32 bytes")
        return cls(raw.hex())

    @property
    def short(self) -> str:
        """A 12-character prefix of the hex, for log lines."""
        return self.hex[:12]

    def __str__(self) -> str:
        return f"sha256:{self.hex}"
