"""mDNS discovery with zeroconf (``mdns``, ``mdns:SERVICE``, ``mdns:SERVICE@ADDR,ADDR``).

How it works: every daemon registers one DNS-SD service of type ``_p2pd._tcp.local.``:
SRV gives its peer port and a host name of its own (``p2pd-<id>-<hash>.local.``), A/AAAA
its advertised IP, TXT ``id=<node id>`` and ``v=1``. It browses the same type; a
service's member is ``Member(TXT id, "IP:SRV port")``. Its own service shows up in the
browse too and is left out like in every discovery (by node id). A daemon that stops
withdraws its service (see :func:`withdraw`) and peers drop it at the goodbye; a crashed
one goes when its records expire (``ttl``: two minutes, instead of zeroconf's 75).

Answers the leaving node sent before its goodbye can be taken in after it: zeroconf
reads each multicast packet on more than one socket, one datagram per socket per turn,
so two packets sent in the same millisecond may swap. Records without a pointer are an
update to the browser, and a resolve from the cache would succeed: the service counts
as back only while its pointer is cached. A pointer that comes back within
:data:`RETURN_GRACE` of the goodbye is doubted: the service is asked for its SRV record
with a one-shot query (RFC 6762, section 5.1: from a port of our own, answered at once
by unicast to it, with the question's id, so no stale packet can pass for the answer),
up to :data:`RETURN_ASKS` times, :data:`RETURN_ASK_EVERY` apart, and taken back only if
it answers. A node that really returned answers; a stale answer does not, and its
pointer is then dropped from zeroconf's cache, so that the node's real return later is
a new service again. (Waiting for the pointer to be announced again does not tell them
apart: zeroconf drops a packet identical to the last one within a second, which each of
its three announcements is; nor does a multicast question, whose answer a responder may
hold back for a second after its last announcement, and whose records a stale packet
may carry too.)

Bridging to trio: zeroconf runs its own asyncio loop in a thread, and a
``ServiceBrowser`` calls its handlers in a thread of its own. The handler resolves the
service there (blocking is allowed in that thread) and posts ``(instance name, member or
None)`` to the trio task with ``TrioToken.run_sync_soon``, which never blocks the
browser thread and is harmless once the trio task is gone; the trio task keeps the
``instance -> member`` map. Zeroconf is created, registered and closed (goodbyes sent,
threads joined) through ``trio.to_thread``, shielded on the way out, so a cancelled
``run`` leaves no thread or announcement behind.

Questions are multicast-only (QM; zeroconf asks QU first by default): every responder
on a host binds port 5353 with SO_REUSEPORT, so a unicast answer to 127.0.0.1:5353 may
reach another responder than the one that asked, while multicast answers reach all.

Loopback: with ``interfaces=["127.0.0.1"]`` zeroconf joins 224.0.0.251 on ``lo`` and
sends with ``IP_MULTICAST_IF=127.0.0.1``; Linux delivers those packets back through
``lo`` with no route, interface flag or ``IP_MULTICAST_LOOP`` needed, and nothing leaves
the host. IPv6 loopback does not work: ``lo`` lacks the MULTICAST flag, so sending to
``ff02::fb`` there fails with ENETUNREACH (zeroconf documents ``::1`` as unsupported).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
import random
import re
import select
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import ifaddr
import trio
from zeroconf import (
    BadTypeInNameException,
    DNSQuestionType,
    InterfaceChoice,
    IPVersion,
    NonUniqueNameException,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf import Error as ZeroconfError
from zeroconf._dns import DNSQuestion
from zeroconf._protocol.incoming import DNSIncoming
from zeroconf._protocol.outgoing import DNSOutgoing
from zeroconf._utils.name import service_type_name  # exported, but not in __all__
from zeroconf._utils.time import current_time_millis  # zeroconf's clock for ``created``
from zeroconf.const import _CLASS_IN, _FLAGS_QR_QUERY, _MDNS_ADDR, _MDNS_PORT, _TYPE_SRV

from p2pd.core.membership import Member
from p2pd.errors import ConfigError
from p2pd.io.discovery.base import NODE_ID, MemberFeed, OnMembers, format_addr, split_addr

log = logging.getLogger(__name__)

DEFAULT_SERVICE = "_p2pd._tcp.local."
DEFAULT_SETTLE = 1.0
DEFAULT_TTL = 120
DEFAULT_RESOLVE_TIMEOUT = 3.0
RETURN_GRACE = 3.0
"""Seconds after a service's goodbye in which its pointer's return is doubted (see the
module docstring). A daemon that restarts takes longer than a second (probing its name
alone takes 0.75 s); a stale answer comes within milliseconds, or a loaded host's
scheduling delays."""
RETURN_ASKS = 3
RETURN_ASK_EVERY = 1.0
"""Seconds between the questions that ask a doubted service whether it is there."""
_POLL = 0.05  # seconds: how soon a check waiting for its answer sees that we close

_Item = tuple[str, Member | None] | BaseException
"""What the browser thread posts: an instance's member (``None``: gone), or a crash."""


def service_type(name: str) -> str:
    """The DNS-SD type for ``name``: ``p2pd`` -> ``_p2pd._tcp.local.``; full types kept."""
    full = name if name.startswith("_") else f"_{name}._tcp.local."
    if full.endswith(".local"):
        full += "."
    try:
        checked = service_type_name(full, strict=True)
    except BadTypeInNameException as exc:
        raise ConfigError(f"mdns service {name!r}: {exc}") from None
    if checked != full:
        raise ConfigError(f"mdns service {name!r} is not a service type like "
                          f"{DEFAULT_SERVICE!r}")
    return full


def _hash8(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def instance_label(node_id: str) -> str:
    """The DNS-SD instance name for ``node_id``: the id itself when it is one clean label."""
    if len(node_id) <= 63 and re.fullmatch(r"[A-Za-z0-9_-]+", node_id):
        return node_id
    return f"{re.sub(r'[^A-Za-z0-9_-]', '-', node_id)[:54]}-{_hash8(node_id)}"


class MdnsDiscovery:
    """Announce this node and find the others with multicast DNS.

    ``interfaces`` restricts zeroconf to the interfaces with these IP addresses (default:
    all IPv4 interfaces). ``settle`` is how long after browsing starts ``run`` waits
    before its first list, so that members already present are in it; registering
    (probing that the name is unique) takes about as long anyway.
    """

    def __init__(
        self,
        self_member: Member,
        *,
        service: str = DEFAULT_SERVICE,
        interfaces: Sequence[str] | None = None,
        settle: float = DEFAULT_SETTLE,
        ttl: int = DEFAULT_TTL,
        resolve_timeout: float = DEFAULT_RESOLVE_TIMEOUT,
    ) -> None:
        host, port = split_addr(self_member.addr)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"mdns discovery announces an IP address; {self_member.addr!r} "
                              "has a host name") from None
        if ip.is_unspecified or ip.is_multicast:
            raise ConfigError(f"mdns discovery cannot announce {self_member.addr!r}: "
                              "advertise an address other nodes can reach")
        for addr in interfaces or ():
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                raise ConfigError(f"mdns interface {addr!r} is not an IP address") from None
        if not NODE_ID.fullmatch(self_member.node_id):
            raise ConfigError(f"node id {self_member.node_id!r} breaks the node id grammar")
        self.self_member = self_member
        self.service_type = service_type(service)
        self.interfaces = list(interfaces) if interfaces is not None else None
        self.settle = settle
        self.resolve_timeout = resolve_timeout
        # the browser's thread and the timers that check doubted returns share these
        self._lock = threading.Lock()
        self._gone_at: dict[str, float] = {}  # instance -> its goodbye (zeroconf's ms)
        self._doubted: dict[str, float] = {}  # instance -> its doubted pointer's receipt
        self._checks: set[threading.Thread] = set()
        self._closing = threading.Event()  # the checks give up
        label = instance_label(self_member.node_id)
        hostname = re.sub(r"[^A-Za-z0-9-]", "-", self_member.node_id)[:40]
        self.info = ServiceInfo(
            self.service_type,
            f"{label}.{self.service_type}",
            port=port,
            addresses=[ip.packed],
            properties={"id": self_member.node_id, "v": "1"},
            server=f"p2pd-{hostname}-{_hash8(self_member.node_id)}.local.",
            host_ttl=ttl,
            other_ttl=ttl,
        )

    @classmethod
    def from_spec(
        cls, rest: str | None, *, self_member: Member, interfaces: Sequence[str] | None = None
    ) -> MdnsDiscovery:
        """Parse what follows ``mdns`` (``None``, ``SERVICE``, ``SERVICE@ADDR,...``, ``@ADDR``).

        Interfaces in the spec win over ``interfaces``.
        """
        service = DEFAULT_SERVICE
        if rest:
            name, sep, addrs = rest.partition("@")
            service = name or DEFAULT_SERVICE
            if sep:
                interfaces = [addr.strip() for addr in addrs.split(",")]
                if not all(interfaces):
                    raise ConfigError(f"mdns:{rest}: expected @ADDR,ADDR after the service")
        return cls(self_member, service=service, interfaces=interfaces)

    async def run(
        self,
        on_members: OnMembers,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Register, browse, deliver members until cancelled; then say goodbye and close."""
        feed = MemberFeed(on_members, self.self_member, f"mdns {self.service_type}")
        send, receive = trio.open_memory_channel[_Item](math.inf)
        post = partial(_post, trio.lowlevel.current_trio_token(), send)
        zc = await trio.to_thread.run_sync(self._open)
        browser: ServiceBrowser | None = None
        announcing: Awaitable[Any] | None = None
        registered = False
        found: dict[str, Member] = {}
        try:
            browser = ServiceBrowser(zc, self.service_type, question_type=DNSQuestionType.QM,
                                     handlers=[partial(self._on_change, post)])
            browsing_since = trio.current_time()
            announcing = await trio.to_thread.run_sync(self._register, zc)
            registered = True
            log.info("mdns discovery: announcing %s at %s as %s", self.self_member.node_id,
                     self.self_member.addr, self.info.name)
            await trio.sleep_until(browsing_since + self.settle)
            _drain(receive, found)
            feed.offer(found.values())
            task_status.started()
            async for item in receive:
                _apply(item, found)
                _drain(receive, found)
                feed.offer(found.values())
        finally:
            receive.close()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_close, zc, browser,
                                              self.info if registered else None, announcing,
                                              self._stop_checks)

    def _stop_checks(self) -> None:
        """Make the checks under way give up, and wait for them to end."""
        self._closing.set()
        with self._lock:
            checks = list(self._checks)
        for check in checks:
            check.join()

    def _open(self) -> Zeroconf:
        if self.interfaces is None:
            return Zeroconf(interfaces=InterfaceChoice.All)
        return Zeroconf(interfaces=list(self.interfaces))

    def _register(self, zc: Zeroconf) -> Awaitable[Any]:
        """Probe and register (in a worker thread); returns the announcements' task."""
        assert zc.loop is not None

        async def register() -> Awaitable[Any]:
            return await zc.async_register_service(self.info)

        try:
            return asyncio.run_coroutine_threadsafe(register(), zc.loop).result()
        except NonUniqueNameException:
            raise ConfigError(f"mdns: another node already announces {self.info.name!r}; "
                              "node ids must be unique") from None

    def _on_change(
        self,
        post: Callable[[_Item], None],
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        """ServiceBrowser handler, in the browser's thread: resolve, then post to trio."""
        if state_change is ServiceStateChange.Removed:
            with self._lock:
                self._gone_at[name] = current_time_millis()
                self._doubted.pop(name, None)
            post((name, None))
            return
        try:
            info = zeroconf.get_service_info(service_type, name,
                                             timeout=int(self.resolve_timeout * 1000),
                                             question_type=DNSQuestionType.QM)
        except ZeroconfError as exc:  # zeroconf's own: e.g. its loop blocked at shutdown
            log.warning("mdns discovery: resolving %s failed: %r", name, exc)
            return
        except BaseException as exc:  # not ours to swallow: re-raised in the trio task
            post(exc)
            return
        if info is None:
            log.info("mdns discovery: %s did not resolve within %.1f s", name,
                     self.resolve_timeout)
            return
        pointer = zeroconf.cache.current_entry_with_name_and_alias(service_type, name)
        if pointer is None:
            # Its pointer is gone: it said goodbye (or expired) and was removed. Records
            # that come after the goodbye (an answer the leaving node had already sent)
            # are an update to the browser, and resolve from the cache: not a return.
            post((name, None))
            return
        if self._doubt(pointer.created, post, zeroconf, service_type, name):
            return
        post((name, member_from_info(info)))

    def _doubt(self, received: float, post: Callable[[_Item], None], zeroconf: Zeroconf,
               service_type: str, name: str) -> bool:
        """Whether to hold back a service whose pointer was ``received`` (zeroconf's
        ms): it came within :data:`RETURN_GRACE` of the service's goodbye (a check then
        asks the service whether it is there), or a check of it is under way."""
        with self._lock:
            if name in self._doubted:
                return True  # the check under way decides
            gone_at = self._gone_at.get(name)
            if gone_at is None or received - gone_at >= RETURN_GRACE * 1000:
                self._gone_at.pop(name, None)
                return False
            self._doubted[name] = received
            check = threading.Thread(target=self._check, name=f"p2pd-mdns-check {name}",
                                     args=(post, zeroconf, service_type, name), daemon=True)
            self._checks.add(check)
        log.info("mdns discovery: %s is back %.0f ms after its goodbye; asking it whether "
                 "it is there", name, received - gone_at)
        check.start()
        return True

    def _check(self, post: Callable[[_Item], None], zeroconf: Zeroconf, service_type: str,
               name: str) -> None:
        """A doubted service's check (in a thread of its own): ask for its SRV record;
        answered, it is back; else its stale pointer goes."""
        try:
            there = _answers(name, self.interfaces, self._closing)
        except OSError as exc:  # no route for multicast, say: not doubted
            log.warning("mdns discovery: could not ask %s whether it is there: %r", name, exc)
            there = True
        with self._lock:
            self._checks.discard(threading.current_thread())
            doubted = self._doubted.pop(name, None)
            if there:
                self._gone_at.pop(name, None)  # back: not doubted again
        if there is None or doubted is None:
            return  # closed, or it said goodbye again meanwhile
        if there:
            log.info("mdns discovery: %s answered: back", name)
            self._on_change(post, zeroconf, service_type, name, ServiceStateChange.Updated)
            return
        log.info("mdns discovery: %s did not answer: a stale answer from before its "
                 "goodbye, ignored", name)
        pointer = zeroconf.cache.current_entry_with_name_and_alias(service_type, name)
        if pointer is not None and zeroconf.loop is not None:
            zeroconf.loop.call_soon_threadsafe(zeroconf.cache.async_remove_records, [pointer])


def _answers(name: str, interfaces: Sequence[str] | None,
             closing: threading.Event) -> bool | None:
    """Whether service instance ``name`` answers one of :data:`RETURN_ASKS` questions
    for its SRV record, :data:`RETURN_ASK_EVERY` apart (``None``: ``closing`` was set
    first). Blocking: call it from a thread of its own.

    The question is a one-shot query (RFC 6762, section 5.1): multicast from a port of
    our own, so the responder answers it at once, by unicast, to that port, with the
    question's id; packets on the mDNS port, stale ones included, never count."""
    query_id = random.randrange(1, 1 << 16)
    out = DNSOutgoing(_FLAGS_QR_QUERY, multicast=False, id_=query_id)
    out.add_question(DNSQuestion(name, _TYPE_SRV, _CLASS_IN))
    packet = out.packets()[0]
    if interfaces is None:  # zeroconf's choice "all": every IPv4 interface
        interfaces = sorted({ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips
                             if ip.is_IPv4 and isinstance(ip.ip, str)})
    addrs = [addr for addr in interfaces if ipaddress.ip_address(addr).version == 4]
    if not addrs:
        return True  # no IPv4 interface to ask on: not doubted
    wanted = name.lower()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
        sock.bind(("", 0))
        for _ in range(RETURN_ASKS):
            for addr in addrs:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                                socket.inet_aton(addr))
                sock.sendto(packet, (_MDNS_ADDR, _MDNS_PORT))
            deadline = time.monotonic() + RETURN_ASK_EVERY
            while (left := deadline - time.monotonic()) > 0:
                if closing.is_set():
                    return None
                if not select.select([sock], [], [], min(left, _POLL))[0]:
                    continue
                data = sock.recv(1 << 16)
                answer = DNSIncoming(data)
                if answer.valid and answer.id == query_id and not answer.is_query() and any(
                        record.type == _TYPE_SRV and record.name.lower() == wanted
                        for record in answer.answers()):
                    return True
    return False


def member_from_info(info: ServiceInfo) -> Member | None:
    """The member a resolved service stands for, or ``None`` if it is unusable."""
    raw = info.properties.get(b"id")
    node_id = raw.decode("utf-8", "replace") if raw else ""
    if not NODE_ID.fullmatch(node_id):
        log.warning("mdns discovery: %s has no valid id in its TXT record; ignored", info.name)
        return None
    if not info.port:
        log.warning("mdns discovery: %s has no port; ignored", info.name)
        return None
    v4, v6 = [], []
    for ip in info.ip_addresses_by_version(IPVersion.All):
        if isinstance(ip, ipaddress.IPv4Address):
            v4.append(ip)
        elif not ip.is_link_local and not ip.scope_id:
            v6.append(ip)
    # Deterministic choice, IPv4 first: every node must compute the same address.
    chosen: list[Any] = sorted(v4) or sorted(v6)
    if not chosen:
        log.warning("mdns discovery: %s has no usable address; ignored", info.name)
        return None
    return Member(node_id, format_addr(chosen[0].compressed, info.port))


def _post(token: trio.lowlevel.TrioToken, send: trio.MemorySendChannel[_Item],
          item: _Item) -> None:
    """Hand ``item`` to the trio task from any thread, without blocking."""

    def deliver() -> None:
        try:
            send.send_nowait(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # run() is over; the browser is about to be cancelled

    try:
        token.run_sync_soon(deliver)
    except trio.RunFinishedError:
        pass


def _apply(item: _Item, found: dict[str, Member]) -> None:
    if isinstance(item, BaseException):
        raise item
    name, member = item
    if member is None:
        found.pop(name, None)
    else:
        found[name] = member


def _drain(receive: trio.MemoryReceiveChannel[_Item], found: dict[str, Member]) -> None:
    """Apply every item already queued, so a burst becomes one list."""
    while True:
        try:
            item = receive.receive_nowait()
        except trio.WouldBlock:
            return
        _apply(item, found)


def withdraw(zc: Zeroconf, info: ServiceInfo, announcing: Awaitable[Any] | None) -> None:
    """Take ``info`` off the network for good (blocking: call it from a worker thread).

    ``Zeroconf.close`` alone sends goodbyes but keeps answering queries until it is
    closed, and multicast answers it queued earlier (zeroconf delays them up to about a
    second) can go out after the goodbyes: peers would then keep a stopped node for a
    whole TTL. So: stop the registration's announcements, leave the registry (nothing
    more is answered), drop the queued answers, then say goodbye.
    """
    assert zc.loop is not None

    async def withdraw_on_loop() -> None:
        if isinstance(announcing, asyncio.Future):
            announcing.cancel()
        goodbyes = await zc.async_unregister_service(info)
        for name in ("out_queue", "out_delay_queue"):  # zeroconf internals: tolerate change
            pending = getattr(getattr(zc, name, None), "queue", None)
            if pending is not None:
                pending.clear()  # only our answers: this Zeroconf serves one service
        await goodbyes

    asyncio.run_coroutine_threadsafe(withdraw_on_loop(), zc.loop).result()


def _close(zc: Zeroconf, browser: ServiceBrowser | None, info: ServiceInfo | None,
           announcing: Awaitable[Any] | None, stop_checks: Callable[[], None]) -> None:
    """Stop browsing and the doubted services' checks, withdraw, close (in a worker
    thread: it blocks and joins threads)."""
    if browser is not None:
        browser.cancel()
    stop_checks()
    if info is not None:
        withdraw(zc, info, announcing)
    zc.close()  # joins zeroconf's loop thread
