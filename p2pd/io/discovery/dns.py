"""DNS discovery: the A/AAAA records of a Kubernetes headless Service (``dns:NAME:PORT``).

How it works: every ``interval`` seconds the name is resolved; each address is a member
at ``PORT``, named by address (see :func:`~p2pd.io.discovery.base.node_id_for_addr`).
A name that does not exist (NXDOMAIN, no records) is an answer, an empty list: a
headless Service without ready pods has no records, and members whose records are gone
must go. Any other failure (timeout, SERVFAIL, no DNS server) is not an answer: the last
known list stays, and the failure is logged.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence

import trio

from p2pd.core.membership import Member
from p2pd.errors import ConfigError
from p2pd.io.discovery.base import (
    MemberFeed,
    OnMembers,
    check_self_named_by_addr,
    format_addr,
    member_for_addr,
    split_addr,
)

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""Resolves ``(name, port)`` to IP address strings; raises ``OSError`` on failure.

``socket.gaierror`` with ``EAI_NONAME`` (or ``EAI_NODATA``) means the name has no
records; any other ``OSError`` is a failure to get an answer.
"""

DEFAULT_INTERVAL = 10.0
DEFAULT_TIMEOUT = 5.0
_NO_RECORDS = frozenset(
    code for code in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None))
    if code is not None
)


async def getaddrinfo_resolver(name: str, port: int) -> list[str]:
    """The system resolver, through ``trio.socket.getaddrinfo`` (A and AAAA records)."""
    infos = await trio.socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class DnsDiscovery:
    """Members from re-resolving ``name`` every ``interval`` seconds."""

    def __init__(
        self,
        name: str,
        port: int,
        *,
        self_member: Member,
        interval: float = DEFAULT_INTERVAL,
        timeout: float = DEFAULT_TIMEOUT,
        resolver: Resolver = getaddrinfo_resolver,
    ) -> None:
        check_self_named_by_addr(self_member, "dns")
        split_addr(format_addr(name, port))  # the same checks as any member address
        if not interval > 0 or not timeout > 0:
            raise ConfigError("dns discovery needs a positive interval and timeout")
        self.name = name
        self.port = port
        self.self_member = self_member
        self.interval = interval
        self.timeout = timeout
        self._resolver = resolver

    @classmethod
    def from_spec(
        cls,
        rest: str,
        *,
        self_member: Member,
        interval: float = DEFAULT_INTERVAL,
        resolver: Resolver = getaddrinfo_resolver,
    ) -> DnsDiscovery:
        """Parse the part of ``dns:NAME:PORT`` after ``dns:``."""
        name, sep, port = rest.rpartition(":")
        if not sep or not name:
            raise ConfigError(f"dns:{rest}: expected dns:NAME:PORT, e.g. "
                              "dns:p2pd.kube-system.svc.cluster.local:7070")
        try:
            host, number = split_addr(f"{name}:{port}")
        except ConfigError as exc:
            raise ConfigError(f"dns:{rest}: {exc}") from None
        return cls(host, number, self_member=self_member, interval=interval,
                   resolver=resolver)

    async def run(
        self,
        on_members: OnMembers,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Resolve now and then every ``interval`` seconds until cancelled.

        If the first resolution fails, the first list is empty.
        """
        feed = MemberFeed(on_members, self.self_member, f"dns {self.name}")
        members = await self.resolve()
        feed.offer(members or [])
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            members = await self.resolve()
            if members is not None:
                feed.offer(members)

    async def resolve(self) -> list[Member] | None:
        """The members the name lists now, or ``None`` if DNS gave no answer."""
        addrs: Sequence[str] = ()
        with trio.move_on_after(self.timeout) as scope:
            try:
                addrs = await self._resolver(self.name, self.port)
            except socket.gaierror as exc:
                if exc.errno in _NO_RECORDS:
                    log.warning("dns discovery: %s has no records (%s): no members",
                                self.name, exc)
                    return []
                log.warning("dns discovery: resolving %s failed (%s); keeping the last "
                            "members", self.name, exc)
                return None
            except OSError as exc:
                log.warning("dns discovery: resolving %s failed (%s); keeping the last "
                            "members", self.name, exc)
                return None
        if scope.cancelled_caught:
            log.warning("dns discovery: resolving %s took over %.1f s; keeping the last "
                        "members", self.name, self.timeout)
            return None
        members = []
        for addr in addrs:
            member = self._member(addr)
            if member is not None:
                members.append(member)
        return members

    def _member(self, addr: str) -> Member | None:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            log.warning("dns discovery: %s resolved to %r, not an IP address; ignored",
                        self.name, addr)
            return None
        if isinstance(ip, ipaddress.IPv6Address) and (ip.is_link_local or ip.scope_id):
            # A zone is local to one node: no address other nodes could use.
            log.debug("dns discovery: %s: link-local %s ignored", self.name, ip)
            return None
        return member_for_addr(format_addr(ip.compressed, self.port))
