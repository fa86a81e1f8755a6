"""Peer discovery: who else is in the cluster, behind one :class:`Discovery` protocol.

Implementations, each built from a spec string by :func:`discovery_from_spec`:

==========================================  =============================================
``static:HOST:PORT,HOST:PORT,...``          a fixed list (:mod:`.static`)
``dns:NAME:PORT``                           A/AAAA records of a headless Service, every
                                            ``dns_interval`` seconds (:mod:`.dns`)
``mdns``, ``mdns:SERVICE[@ADDR,...]``       zeroconf announce + browse, optionally on the
                                            interfaces with these addresses (:mod:`.mdns`)
``memory``                                  a :class:`MemoryNetwork` for tests (:mod:`.memory`)
==========================================  =============================================

Static and DNS members are named by address (:func:`node_id_for_addr`), and so must
this node be with those two; see :mod:`p2pd.io.discovery.base` for why.
"""

from __future__ import annotations

from collections.abc import Sequence

from p2pd.core.membership import Member
from p2pd.errors import ConfigError
from p2pd.io.discovery.base import (
    Discovery,
    OnMembers,
    canonical_members,
    format_addr,
    member_for_addr,
    node_id_for_addr,
    normalize_addr,
    split_addr,
)
from p2pd.io.discovery.dns import (
    DEFAULT_INTERVAL,
    DnsDiscovery,
    Resolver,
    getaddrinfo_resolver,
)
from p2pd.io.discovery.mdns import DEFAULT_SERVICE, MdnsDiscovery
from p2pd.io.discovery.memory import MemoryDiscovery, MemoryNetwork
from p2pd.io.discovery.static import StaticDiscovery

__all__ = [
    "DEFAULT_SERVICE",
    "Discovery",
    "DnsDiscovery",
    "MdnsDiscovery",
    "MemoryDiscovery",
    "MemoryNetwork",
    "OnMembers",
    "Resolver",
    "StaticDiscovery",
    "canonical_members",
    "discovery_from_spec",
    "format_addr",
    "getaddrinfo_resolver",
    "member_for_addr",
    "names_members_by_address",
    "node_id_for_addr",
    "normalize_addr",
    "split_addr",
]

_KINDS = ("static", "dns", "mdns", "memory")


def _kind(spec: str) -> tuple[str, str | None]:
    kind, sep, rest = spec.strip().partition(":")
    if kind.startswith("mdns@"):  # mdns@ADDR: default service on given interfaces
        kind, rest, sep = "mdns", spec.strip()[4:], ":"
    if kind not in _KINDS:
        raise ConfigError(f"discovery {spec!r}: unknown kind {kind!r}; expected one of "
                          "static:HOST:PORT,..., dns:NAME:PORT, mdns[:SERVICE][@ADDR,...], "
                          "memory")
    return kind, rest if sep else None


def names_members_by_address(spec: str) -> bool:
    """Whether ``spec``'s members are named by address (static and DNS discovery).

    Then this node's id must be ``node_id_for_addr(advertised address)``.
    """
    return _kind(spec)[0] in ("static", "dns")


def discovery_from_spec(
    spec: str,
    *,
    self_member: Member,
    dns_interval: float = DEFAULT_INTERVAL,
    resolver: Resolver = getaddrinfo_resolver,
    mdns_interfaces: Sequence[str] | None = None,
    memory_network: MemoryNetwork | None = None,
) -> Discovery:
    """Build the discovery that ``spec`` describes, for the node ``self_member``.

    ``self_member`` is this node: its id and the address other nodes reach its peer port
    at. It is left out of every list. Raises :class:`~p2pd.errors.ConfigError` for a spec
    that does not parse, or a ``self_member`` the kind cannot work with.
    """
    kind, rest = _kind(spec)
    if kind == "static":
        if not rest:
            raise ConfigError(f"discovery {spec!r}: expected static:HOST:PORT,HOST:PORT,...")
        return StaticDiscovery.from_spec(rest, self_member=self_member)
    if kind == "dns":
        if not rest:
            raise ConfigError(f"discovery {spec!r}: expected dns:NAME:PORT")
        return DnsDiscovery.from_spec(rest, self_member=self_member, interval=dns_interval,
                                      resolver=resolver)
    if kind == "mdns":
        return MdnsDiscovery.from_spec(rest, self_member=self_member,
                                       interfaces=mdns_interfaces)
    if rest:
        raise ConfigError(f"discovery {spec!r}: memory takes no arguments")
    if memory_network is None:
        raise ConfigError("memory discovery needs a MemoryNetwork (memory_network=...)")
    return memory_network.discovery(self_member)
