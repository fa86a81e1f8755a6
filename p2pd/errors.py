"""The exception hierarchy of p2pd.

Every error the project raises on purpose derives from :class:`P2PError`, so callers
can tell our own refusals from bugs. Errors about a client's request carry the OCI
error code that the mirror answers with.
"""

from __future__ import annotations


class P2PError(Exception):
    """Base class of every error p2pd raises on purpose."""


class InvalidRequest(P2PError):
    """A client's request is malformed; answered with an OCI error.

    ``code`` is the OCI distribution error code (``NAME_INVALID``, ``DIGEST_INVALID``,
    ...) and ``status`` the HTTP status to answer with.
    """

    code = "UNSUPPORTED"
    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DigestInvalid(InvalidRequest):
    """A digest string does not follow ``sha256:<64 lowercase hex>``."""

    code = "DIGEST_INVALID"


class NameInvalid(InvalidRequest):
    """A repository name breaks the OCI name grammar."""

    code = "NAME_INVALID"


class ReferenceInvalid(InvalidRequest):
    """A manifest reference is neither a valid tag nor a valid digest."""

    code = "MANIFEST_INVALID"


class RangeInvalid(InvalidRequest):
    """A ``Range`` header cannot be parsed."""

    code = "RANGE_INVALID"


class RangeNotSatisfiable(InvalidRequest):
    """A ``Range`` starts at or beyond the end of the blob (HTTP 416)."""

    code = "RANGE_INVALID"
    status = 416

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


class RegistryInvalid(InvalidRequest):
    """The ``ns`` parameter does not name a registry host."""

    code = "NAME_INVALID"


class NotFound(InvalidRequest):
    """The request path is not part of the OCI pull API."""

    code = "UNSUPPORTED"
    status = 404


class DigestMismatch(P2PError):
    """Bytes do not hash to the digest they were promised to have."""


class CorruptPiece(DigestMismatch):
    """A piece read back from the cache does not match its recorded sha256."""


class UpstreamError(P2PError):
    """The upstream registry could not be reached or answered unusably."""


class ConfigError(P2PError):
    """The configuration (flags, file or environment) is invalid."""


class ProtocolError(P2PError):
    """The peer wire protocol was broken (the split follows h11).

    ``code`` is the machine-readable code to put in the ``ERROR`` message that tells the
    other side why the connection ends (``protocol-error``, ``unsupported-version``,
    ``auth-failed``, ...).
    """

    code = "protocol-error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids; the connection is unusable."""


class LocalProtocolError(ProtocolError):
    """We tried to send or build something the protocol forbids (a bug on our side)."""
