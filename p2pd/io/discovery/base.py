"""The discovery seam: the :class:`Discovery` protocol and what every implementation shares.

A discovery service tells the daemon *who* is in the cluster; liveness is the business of
:class:`p2pd.core.membership.Membership`. Every implementation hands full member lists to
a plain callback, so feeding the membership is one line::

    await nursery.start(discovery.run, lambda ms: membership.update(ms, trio.current_time()))

Lists are canonical (see :func:`canonical_members`): sorted by node id, one member per
node id, this node left out (the membership keeps itself through ``self_addr``, and mDNS
never lists itself anyway), and delivered only when they differ from the previous one.

Node ids of address-named members: a static list or a DNS answer gives addresses, never
node ids, yet every node must compute the same rendezvous hash over the same ids. So
those members are *named by their address*: :func:`node_id_for_addr` turns ``HOST:PORT``
into an id that the peer wire grammar accepts (``[A-Za-z0-9][A-Za-z0-9._-]*``: a raw
``HOST:PORT`` is not a valid wire node id). A daemon using static or DNS discovery must
use ``node_id_for_addr(advertised address)`` as its own node id; mDNS carries each
node's configured id in its TXT record instead.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable, Iterable
from typing import Protocol

import trio

from p2pd.core.membership import Member
from p2pd.errors import ConfigError

log = logging.getLogger(__name__)

OnMembers = Callable[[list[Member]], None]
"""Receives the full, canonical member list each time it changes."""

MAX_NODE_ID = 128
NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""The wire grammar of a node id (see :mod:`p2pd.core.messages`)."""
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_PORT = re.compile(r"[0-9]{1,5}")


class Discovery(Protocol):
    """Finds the other members of the cluster.

    A callback rather than a channel of member sets: the consumer (a
    :class:`~p2pd.core.membership.Membership`) is synchronous, each list is the whole
    state (so nothing is lost if a consumer only looks at the last one), and the daemon
    needs no extra task to pump a channel.
    """

    async def run(
        self,
        on_members: OnMembers,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until cancelled.

        Calls ``on_members`` once with the members known at start before
        ``task_status.started()``, then again whenever the list changes. The lists are
        canonical (sorted by node id, deduplicated, this node excluded). Cancelling
        ``run`` releases everything it set up (threads, sockets, announcements).
        """
        ...


def split_addr(text: str) -> tuple[str, int]:
    """Parse a member address ``HOST:PORT`` (``[v6]:PORT`` for IPv6) strictly.

    ``HOST`` is an IPv4 or bracketed IPv6 literal (no zone) or a host name; ``PORT`` is in
    1..65535. Returns the host (without brackets) and the port; raises
    :class:`~p2pd.errors.ConfigError` otherwise.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{text!r} is not HOST:PORT with a port in 1..65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            if "%" in host:
                raise ValueError("zone")
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ConfigError(f"{text!r}: {host} is not an IPv6 address "
                              "(zones like %eth0 are not allowed)") from None
        return host[1:-1], int(port)
    if ":" in host and "[" not in host:
        raise ConfigError(f"{text!r}: write an IPv6 address in brackets, [{host}]:{port}")
    if len(host) > 253 or not _HOSTNAME.fullmatch(host):
        raise ConfigError(f"{text!r}: {host!r} is not an IP address or host name")
    return host, int(port)


def format_addr(host: str, port: int) -> str:
    """``HOST:PORT`` in canonical form: IPs normalised, IPv6 in brackets, names lower-case."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"{host.lower()}:{port}"
    return f"[{ip.compressed}]:{port}" if ip.version == 6 else f"{ip.compressed}:{port}"


def normalize_addr(text: str) -> str:
    """Check ``HOST:PORT`` with :func:`split_addr` and return it in canonical form."""
    return format_addr(*split_addr(text))


def node_id_for_addr(addr: str) -> str:
    """The node id of a member known only by its address (static and DNS discovery).

    ``10.0.0.1:7000`` becomes ``10.0.0.1_7000``, ``node-a.svc:7000`` becomes
    ``node-a.svc_7000`` and ``[fd00::2]:7000`` becomes ``fd00_0_0_0_0_0_0_2_7000`` (all
    eight groups, so the mapping stays one-to-one: host names never contain ``_``). The
    result satisfies the wire grammar of node ids; raises
    :class:`~p2pd.errors.ConfigError` for a host name too long to fit in 128 characters.
    """
    host, port = split_addr(addr)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.lower()
    else:
        if ip.version == 6:
            name = "_".join(f"{int(group, 16):x}" for group in ip.exploded.split(":"))
        else:
            name = ip.compressed
    node_id = f"{name}_{port}"
    if len(node_id) > MAX_NODE_ID:
        raise ConfigError(f"{addr!r}: host name too long to name a node (node ids are at most "
                          f"{MAX_NODE_ID} characters)")
    return node_id


def member_for_addr(addr: str) -> Member:
    """The member at ``addr``, named by :func:`node_id_for_addr` (address normalised)."""
    addr = normalize_addr(addr)
    return Member(node_id_for_addr(addr), addr)


def canonical_members(members: Iterable[Member], *, exclude: Member) -> list[Member]:
    """Sorted by node id, one member per node id, without ``exclude``.

    ``exclude`` (this node) is left out by node id and by address: whoever claims our
    address is a stale record of ourselves. If two entries share a node id, the one with
    the smallest address wins, so every node settles the same conflict the same way.
    """
    chosen: dict[str, Member] = {}
    for member in members:
        if member.node_id == exclude.node_id or member.addr == exclude.addr:
            continue
        other = chosen.get(member.node_id)
        if other is not None and other.addr != member.addr:
            log.warning("discovery: node id %s announced at both %s and %s; using %s",
                        member.node_id, other.addr, member.addr, min(other.addr, member.addr))
        if other is None or member.addr < other.addr:
            chosen[member.node_id] = member
    return sorted(chosen.values(), key=lambda member: member.node_id)


class MemberFeed:
    """Passes canonical member lists to ``on_members``, only when they change.

    The first :meth:`offer` is always passed on, even an empty list, so that ``run`` can
    keep its promise of one call before ``started``.
    """

    def __init__(self, on_members: OnMembers, self_member: Member, what: str) -> None:
        self._on_members = on_members
        try:
            self._self = Member(self_member.node_id, normalize_addr(self_member.addr))
        except ConfigError:
            self._self = self_member  # not an address we could meet in a list anyway
        self._what = what
        self.current: list[Member] | None = None

    @property
    def delivered(self) -> bool:
        """Whether a list went out yet."""
        return self.current is not None

    def offer(self, members: Iterable[Member]) -> None:
        """Hand ``members`` on (made canonical) if they differ from the last list."""
        listed = canonical_members(members, exclude=self._self)
        if listed == self.current:
            return
        before = set(self.current or ())
        after = set(listed)
        log.info("discovery %s: %d members (%d joined, %d left)", self._what, len(listed),
                 len(after - before), len(before - after))
        self.current = listed
        self._on_members(list(listed))


def check_self_named_by_addr(self_member: Member, kind: str) -> None:
    """Refuse a self member whose id is not :func:`node_id_for_addr` of its address.

    Static and DNS discovery name members by address; a node that called itself
    anything else would rank blobs differently from every other node (each would see a
    different set of ids), and nothing would say so.
    """
    expected = node_id_for_addr(self_member.addr)
    if self_member.node_id != expected:
        raise ConfigError(
            f"{kind} discovery names every member by its address, so this node's id must be "
            f"{expected!r} (from its address {self_member.addr!r}), not "
            f"{self_member.node_id!r}"
        )
