"""Discovery: the conformance suite for every implementation, then what is particular to each.

Only loopback is used: static and DNS members are 127.0.0.x addresses that nobody
connects to, DNS answers come from a fake resolver (one test resolves ``localhost``),
and the mDNS tests run real zeroconf instances restricted to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from discovery_conformance import (
    DiscoveryConformance,
    Harness,
    Recorder,
    by_id,
    foreign_threads,
    running,
)
from hypothesis import given
from hypothesis import strategies as st
from zeroconf import DNSOutgoing, ServiceInfo, Zeroconf
from zeroconf.const import _FLAGS_AA, _FLAGS_QR_RESPONSE

from p2pd.core.membership import Member
from p2pd.core.messages import PROTOCOL_VERSION, Hello
from p2pd.errors import ConfigError
from p2pd.io.discovery import (
    Discovery,
    DnsDiscovery,
    MdnsDiscovery,
    MemoryNetwork,
    StaticDiscovery,
    canonical_members,
    discovery_from_spec,
    member_for_addr,
    names_members_by_address,
    node_id_for_addr,
    normalize_addr,
)
from p2pd.io.discovery.mdns import (
    RETURN_ASK_EVERY,
    RETURN_ASKS,
    member_from_info,
    service_type,
    withdraw,
)

LOOPBACK = "127.0.0.1"
PORT = 7070
SVC = "p2pd.test.svc"


# -- harnesses -------------------------------------------------------------------------


class MemoryHarness:
    within = 1.0
    quiet = 5.0

    def __init__(self) -> None:
        self.network = MemoryNetwork()
        self.self_member = Member("self", "127.0.0.1:7000")

    def member(self, index: int) -> Member:
        return Member(f"node-{index}", f"127.0.0.1:{7001 + index}")

    async def add(self, member: Member) -> None:
        self.network.join(member)

    async def remove(self, member: Member) -> None:
        self.network.leave(member)

    def discovery(self, node: Member | None = None) -> Discovery:
        return discovery_from_spec("memory", self_member=node or self.self_member,
                                   memory_network=self.network)


class StaticHarness:
    within = 1.0
    quiet = 5.0

    def __init__(self) -> None:
        self.self_member = member_for_addr(f"127.0.0.1:{PORT}")
        self.addrs = [self.self_member.addr]  # the same list on every node includes self

    def member(self, index: int) -> Member:
        return member_for_addr(f"127.0.0.{index + 2}:{PORT}")

    async def add(self, member: Member) -> None:
        self.addrs.append(member.addr)

    async def remove(self, member: Member) -> None:
        raise AssertionError("static lists are fixed")

    def discovery(self, node: Member | None = None) -> Discovery:
        spec = "static:" + ",".join(self.addrs)
        return discovery_from_spec(spec, self_member=node or self.self_member)


class FakeDns:
    """A resolver whose records and failures the test sets; it records when it is asked."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.failure: OSError | None = None
        self.hang = False
        self.asked: list[float] = []

    async def resolve(self, name: str, port: int) -> list[str]:
        self.asked.append(trio.current_time())
        await trio.sleep(0)
        if self.hang:
            await trio.sleep_forever()
        if self.failure is not None:
            raise self.failure
        if not self.records.get(name):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.records[name])


class DnsHarness:
    within = 11.0  # the next resolution (virtual time)
    quiet = 60.0

    def __init__(self) -> None:
        self.dns = FakeDns()
        self.self_member = member_for_addr(f"127.0.0.1:{PORT}")
        self.dns.records[SVC] = [LOOPBACK]  # a headless Service lists this pod too

    def member(self, index: int) -> Member:
        return member_for_addr(f"127.0.0.{index + 2}:{PORT}")

    async def add(self, member: Member) -> None:
        self.dns.records[SVC].append(member.addr.rpartition(":")[0])

    async def remove(self, member: Member) -> None:
        ip = member.addr.rpartition(":")[0]
        self.dns.records[SVC] = [addr for addr in self.dns.records[SVC] if addr != ip]

    def discovery(self, node: Member | None = None) -> Discovery:
        return discovery_from_spec(f"dns:{SVC}:{PORT}", self_member=node or self.self_member,
                                   dns_interval=10.0, resolver=self.dns.resolve)


@functools.cache
def loopback_multicast_problem() -> str | None:
    """Why IPv4 multicast on loopback does not work here, or ``None`` if it does."""
    group = "224.0.0.251"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            rx.bind(("", 0))
            rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                          socket.inet_aton(group) + socket.inet_aton(LOOPBACK))
            rx.settimeout(2)
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(LOOPBACK))
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, struct.pack("B", 1))
            tx.sendto(b"p2pd", (group, rx.getsockname()[1]))
            rx.recvfrom(16)
    except OSError as exc:
        return f"IPv4 multicast on loopback does not work here: {exc!r}"
    return None


def _zc_run(zc: Zeroconf, coro: Any) -> Any:
    """Run a coroutine on zeroconf's own event loop and wait for it (from a worker thread)."""
    assert zc.loop is not None
    return asyncio.run_coroutine_threadsafe(coro, zc.loop).result()


class MdnsHarness:
    """Other members are real zeroconf responders on 127.0.0.1, one per member."""

    within = 5.0
    quiet = 1.5

    def __init__(self) -> None:
        self.tag = secrets.token_hex(4)
        # A service type of our own, so that concurrent test runs never meet.
        self.service = f"_p2pdt{self.tag}._tcp.local."
        self.self_member = Member(f"self-{self.tag}", "127.0.0.1:7000")
        self.responders: dict[str, tuple[Zeroconf, ServiceInfo, Any]] = {}

    def member(self, index: int) -> Member:
        return Member(f"peer{index}-{self.tag}", f"127.0.0.1:{7001 + index}")

    async def add(self, member: Member) -> None:
        if member.node_id in self.responders:
            return  # one responder announces a member once
        info = MdnsDiscovery(member, service=self.service, interfaces=[LOOPBACK]).info
        zc = await trio.to_thread.run_sync(lambda: Zeroconf(interfaces=[LOOPBACK]))

        async def register() -> Any:
            # Our names are unique: skip the probing (the discovery under test probes).
            return await zc.async_register_service(info, cooperating_responders=True)

        announcing = await trio.to_thread.run_sync(_zc_run, zc, register())
        self.responders[member.node_id] = (zc, info, announcing)

    async def remove(self, member: Member) -> None:
        zc, info, announcing = self.responders.pop(member.node_id)

        def stop() -> None:
            withdraw(zc, info, announcing)  # as a stopping daemon does
            zc.close()

        await trio.to_thread.run_sync(stop)

    def discovery(self, node: Member | None = None) -> Discovery:
        return discovery_from_spec(f"mdns:{self.service}@{LOOPBACK}",
                                   self_member=node or self.self_member)

    async def aclose(self) -> None:
        for node_id in list(self.responders):
            await self.remove(Member(node_id, ""))


# -- the conformance suite, per implementation -------------------------------------------


class TestMemoryConformance(DiscoveryConformance):
    @pytest.fixture
    def harness(self) -> Harness:
        return MemoryHarness()

    @pytest.fixture
    def clock(self, autojump_clock: trio.abc.Clock) -> trio.abc.Clock:
        return autojump_clock


class TestStaticConformance(DiscoveryConformance):
    dynamic = False
    announces = False

    @pytest.fixture
    def harness(self) -> Harness:
        return StaticHarness()

    @pytest.fixture
    def clock(self, autojump_clock: trio.abc.Clock) -> trio.abc.Clock:
        return autojump_clock


class TestDnsConformance(DiscoveryConformance):
    announces = False  # Kubernetes publishes the records

    @pytest.fixture
    def harness(self) -> Harness:
        return DnsHarness()

    @pytest.fixture
    def clock(self, autojump_clock: trio.abc.Clock) -> trio.abc.Clock:
        return autojump_clock


@pytest.fixture
def loopback_multicast() -> None:
    """Skip (with the reason) where IPv4 multicast on loopback cannot work.

    A sync fixture: pytest-trio drops the reason of a skip raised in async code.
    """
    problem = loopback_multicast_problem()
    if problem is not None:
        pytest.skip(problem)


@pytest.mark.usefixtures("loopback_multicast")
class TestMdnsConformance(DiscoveryConformance):
    @pytest.fixture
    async def harness(self) -> AsyncIterator[Harness]:
        harness = MdnsHarness()
        try:
            yield harness
        finally:
            await harness.aclose()


# -- specs ---------------------------------------------------------------------------------

ME = member_for_addr("127.0.0.1:7070")


@pytest.mark.parametrize(("spec", "message"), [
    ("", "unknown kind"),
    ("consul:x", "unknown kind"),
    ("static", "expected static:HOST:PORT"),
    ("static:", "expected static:HOST:PORT"),
    ("static:127.0.0.2", "not HOST:PORT"),
    ("static:127.0.0.2:0", "port in 1..65535"),
    ("static:127.0.0.2:70000", "port in 1..65535"),
    ("static:127.0.0.2:7070,,127.0.0.3:7070", "empty entry"),
    ("static:::1:7070", "in brackets"),
    ("static:[::1:7070", "not an IP address or host name"),
    ("static:[fe80::1%eth0]:7070", "zones"),
    ("static:bad_host:7070", "not an IP address or host name"),
    ("dns:", "expected dns:NAME:PORT"),
    ("dns:p2pd.svc", "expected dns:NAME:PORT"),
    ("dns::7070", "expected dns:NAME:PORT"),
    ("dns:p2pd.svc:http", "port in 1..65535"),
    ("dns:p2pd svc:7070", "not an IP address or host name"),
    ("mdns:this-name-is-too-long", "<= 15 bytes"),
    ("mdns:_p2pd._tcp.local.@eth0", "not an IP address"),
    ("mdns:p2pd@", "expected @ADDR"),
    ("mdns:a._p2pd._tcp.local.", "mdns service"),
    ("mdns:_a._p2pd._tcp.local.", "mdns service"),
    ("memory", "needs a MemoryNetwork"),
    ("memory:x", "takes no arguments"),
])
def test_bad_specs_are_config_errors(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        discovery_from_spec(spec, self_member=ME)


def test_static_spec() -> None:
    found = discovery_from_spec("static: 127.0.0.1:7070, [0::1]:7071,Node-B.Example:7072",
                                self_member=ME)
    assert isinstance(found, StaticDiscovery)
    assert found.members == [
        Member("127.0.0.1_7070", "127.0.0.1:7070"),
        Member("0_0_0_0_0_0_0_1_7071", "[::1]:7071"),
        Member("node-b.example_7072", "node-b.example:7072"),
    ]


def test_dns_spec() -> None:
    found = discovery_from_spec("dns:p2pd.kube-system.svc.cluster.local:7070", self_member=ME,
                                dns_interval=3)
    assert isinstance(found, DnsDiscovery)
    assert (found.name, found.port, found.interval) == (
        "p2pd.kube-system.svc.cluster.local", 7070, 3)


@pytest.mark.parametrize(("spec", "service", "interfaces"), [
    ("mdns", "_p2pd._tcp.local.", None),
    ("mdns:myapp", "_myapp._tcp.local.", None),
    ("mdns:_myapp._tcp.local", "_myapp._tcp.local.", None),
    ("mdns@127.0.0.1", "_p2pd._tcp.local.", ["127.0.0.1"]),
    ("mdns:_x._udp.local.@127.0.0.1, ::1", "_x._udp.local.", ["127.0.0.1", "::1"]),
])
def test_mdns_spec(spec: str, service: str, interfaces: list[str] | None) -> None:
    found = discovery_from_spec(spec, self_member=Member("node-a", "127.0.0.1:7000"))
    assert isinstance(found, MdnsDiscovery)
    assert (found.service_type, found.interfaces) == (service, interfaces)
    assert service_type(service) == service


@pytest.mark.parametrize("addr", ["node-a:7000", "0.0.0.0:7000", "[::]:7000"])
def test_mdns_announces_a_reachable_ip(addr: str) -> None:
    with pytest.raises(ConfigError, match="mdns"):
        discovery_from_spec("mdns", self_member=Member("node-a", addr))


@pytest.mark.parametrize("kind", ["static:127.0.0.2:7070", "dns:p2pd.svc:7070"])
def test_address_named_kinds_insist_on_an_address_named_self(kind: str) -> None:
    with pytest.raises(ConfigError, match=r"must be '127\.0\.0\.1_7070'"):
        discovery_from_spec(kind, self_member=Member("node-a", "127.0.0.1:7070"))
    assert names_members_by_address(kind)


def test_other_kinds_take_any_node_id() -> None:
    assert not names_members_by_address("mdns")
    assert not names_members_by_address("memory")


# -- addresses and node ids ----------------------------------------------------------------


@pytest.mark.parametrize(("addr", "normal", "node_id"), [
    ("10.0.0.1:7000", "10.0.0.1:7000", "10.0.0.1_7000"),
    ("[FD00:0::2]:7000", "[fd00::2]:7000", "fd00_0_0_0_0_0_0_2_7000"),
    ("[::1]:1", "[::1]:1", "0_0_0_0_0_0_0_1_1"),
    ("Node-A.svc:65535", "node-a.svc:65535", "node-a.svc_65535"),
])
def test_node_ids_from_addresses(addr: str, normal: str, node_id: str) -> None:
    assert normalize_addr(addr) == normal
    assert node_id_for_addr(addr) == node_id
    assert member_for_addr(addr) == Member(node_id, normal)


def test_a_host_name_too_long_for_a_node_id() -> None:
    name = ".".join(["a" * 60] * 3)
    with pytest.raises(ConfigError, match="too long"):
        node_id_for_addr(f"{name}:7000")


@given(st.lists(st.tuples(st.ip_addresses(), st.integers(1, 65535)), min_size=2, max_size=8,
                unique=True))
def test_address_node_ids_are_valid_on_the_wire_and_one_to_one(
    addrs: list[tuple[Any, int]]
) -> None:
    texts = [f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}" for ip, port in addrs]
    ids = [node_id_for_addr(text) for text in texts]
    assert len(set(ids)) == len(ids)
    for node_id in ids:
        Hello(PROTOCOL_VERSION, node_id, bytes(16))  # raises if the wire refuses the id


def test_canonical_members_settle_id_conflicts_the_same_way_everywhere() -> None:
    me = Member("me", "127.0.0.1:7000")
    a1, a2, b = Member("a", "127.0.0.3:1"), Member("a", "127.0.0.2:1"), Member("b", "127.0.0.4:1")
    stale_me = Member("old-me", "127.0.0.1:7000")
    for order in ([a1, a2, b, me, stale_me], [stale_me, b, me, a2, a1]):
        assert canonical_members(order, exclude=me) == [a2, b]


# -- DNS -----------------------------------------------------------------------------------


class Timeline:
    """An ``on_members`` that records when each list arrived (virtual time)."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, list[str]]] = []

    def __call__(self, members: list[Member]) -> None:
        self.seen.append((trio.current_time(), [member.addr for member in members]))


async def test_dns_reresolves_every_interval(autojump_clock: trio.abc.Clock) -> None:
    harness = DnsHarness()
    dns, timeline = harness.dns, Timeline()
    async with trio.open_nursery() as nursery:
        await nursery.start(harness.discovery().run, timeline)
        await trio.sleep(15)
        dns.records[SVC] += ["127.0.0.2", "::1"]
        await trio.sleep(20)
        dns.records[SVC] = [LOOPBACK, "::1"]
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert dns.asked == [0, 10, 20, 30, 40]
    assert timeline.seen == [
        (0, []),
        (20, ["[::1]:7070", "127.0.0.2:7070"]),  # by node id: 0_0_0_0_0_0_0_1_7070 first
        (40, ["[::1]:7070"]),
    ]


async def test_dns_failures_keep_the_last_members(autojump_clock: trio.abc.Clock) -> None:
    harness = DnsHarness()
    dns, timeline = harness.dns, Timeline()
    dns.records[SVC].append("127.0.0.2")
    async with trio.open_nursery() as nursery:
        await nursery.start(harness.discovery().run, timeline)
        dns.failure = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        await trio.sleep(15)
        dns.failure = ConnectionRefusedError("no DNS server")
        await trio.sleep(10)
        dns.failure = None
        dns.hang = True  # the resolver never answers: 5 s timeout, then the interval
        await trio.sleep(10)
        dns.hang = False
        dns.records[SVC] = [LOOPBACK, "127.0.0.3"]
        await trio.sleep(15)
        nursery.cancel_scope.cancel()
    assert dns.asked == [0, 10, 20, 30, 45]
    assert timeline.seen == [(0, ["127.0.0.2:7070"]), (45, ["127.0.0.3:7070"])]


async def test_dns_no_such_name_means_no_members(autojump_clock: trio.abc.Clock) -> None:
    harness = DnsHarness()
    harness.dns.records[SVC].append("127.0.0.2")
    timeline = Timeline()
    async with trio.open_nursery() as nursery:
        await nursery.start(harness.discovery().run, timeline)
        del harness.dns.records[SVC]  # the Service has no ready pods: NXDOMAIN
        await trio.sleep(15)
        nursery.cancel_scope.cancel()
    assert timeline.seen == [(0, ["127.0.0.2:7070"]), (10, [])]


async def test_dns_failing_at_start_gives_an_empty_list(autojump_clock: trio.abc.Clock) -> None:
    harness = DnsHarness()
    harness.dns.records[SVC].append("127.0.0.2")
    harness.dns.failure = socket.gaierror(socket.EAI_AGAIN, "Temporary failure")
    timeline = Timeline()
    async with trio.open_nursery() as nursery:
        await nursery.start(harness.discovery().run, timeline)
        assert timeline.seen == [(0, [])]
        harness.dns.failure = None
        await trio.sleep(15)
        nursery.cancel_scope.cancel()
    assert timeline.seen == [(0, []), (10, ["127.0.0.2:7070"])]


async def test_dns_ignores_answers_that_are_no_usable_address(
    autojump_clock: trio.abc.Clock
) -> None:
    harness = DnsHarness()
    harness.dns.records[SVC] += ["not-an-ip", "fe80::1", "fe80::1%lo", "127.0.0.2", "::1"]
    timeline = Timeline()
    async with trio.open_nursery() as nursery:
        await nursery.start(harness.discovery().run, timeline)
        nursery.cancel_scope.cancel()
    assert timeline.seen == [(0, ["[::1]:7070", "127.0.0.2:7070"])]


async def test_dns_resolves_localhost_for_real() -> None:
    me = member_for_addr(f"127.0.0.2:{PORT}")
    recorder = Recorder(me)
    async with running(discovery_from_spec(f"dns:localhost:{PORT}", self_member=me),
                       recorder):
        pass
    assert recorder.latest is not None
    assert member_for_addr(f"127.0.0.1:{PORT}") in recorder.latest
    assert {member.addr for member in recorder.latest} <= {"127.0.0.1:7070", "[::1]:7070"}


# -- memory --------------------------------------------------------------------------------


async def test_memory_network_bookkeeping(autojump_clock: trio.abc.Clock) -> None:
    a, a_moved = Member("a", "127.0.0.1:1"), Member("a", "127.0.0.1:2")
    network = MemoryNetwork([a])
    me = Member("me", "127.0.0.1:7000")
    recorder = Recorder(me)
    async with trio.open_nursery() as nursery:
        await nursery.start(network.discovery(me).run, recorder)
        assert network.members() == [a, me]
        assert network.watchers == 1
        network.join(a_moved)  # same id, new address: a restarted node
        await recorder.wait_for([a_moved], 1)
        network.leave("a")
        await recorder.wait_for([], 1)
        nursery.cancel_scope.cancel()
    assert network.members() == []
    assert network.watchers == 0
    assert recorder.lists == [[a], [a_moved], []]


async def test_memory_discovery_without_joining(autojump_clock: trio.abc.Clock) -> None:
    network = MemoryNetwork()
    me = Member("me", "127.0.0.1:7000")
    async with running(network.discovery(me, join=False), Recorder(me)):
        assert network.members() == []


# -- mDNS ----------------------------------------------------------------------------------


def test_mdns_instance_and_txt() -> None:
    info = MdnsDiscovery(Member("node.a_1", "127.0.0.1:7000")).info
    assert info.type == "_p2pd._tcp.local."
    assert info.name.endswith("._p2pd._tcp.local.")
    assert "." not in info.name.removesuffix("._p2pd._tcp.local.")
    assert info.properties == {b"id": b"node.a_1", b"v": b"1"}
    assert info.port == 7000
    assert member_from_info(info) == Member("node.a_1", "127.0.0.1:7000")


@pytest.mark.parametrize(("properties", "addresses", "port"), [
    ({}, ["127.0.0.1"], 7000),
    ({"id": "-bad"}, ["127.0.0.1"], 7000),
    ({"id": "ok"}, [], 7000),
    ({"id": "ok"}, ["fe80::1"], 7000),
    ({"id": "ok"}, ["127.0.0.1"], 0),
])
def test_mdns_ignores_unusable_services(
    properties: dict[str, str], addresses: list[str], port: int
) -> None:
    info = ServiceInfo("_p2pd._tcp.local.", "x._p2pd._tcp.local.", port=port,
                       properties=properties, parsed_addresses=addresses,
                       server="x.local.")
    assert member_from_info(info) is None


def test_mdns_prefers_ipv4_then_the_lowest_address() -> None:
    info = ServiceInfo("_p2pd._tcp.local.", "x._p2pd._tcp.local.", port=7000,
                       properties={"id": "x"}, server="x.local.",
                       parsed_addresses=["::1", "127.0.0.9", "127.0.0.2"])
    assert member_from_info(info) == Member("x", "127.0.0.2:7000")


@pytest.mark.usefixtures("loopback_multicast")
async def test_mdns_refuses_a_node_id_already_announced() -> None:
    harness = MdnsHarness()
    twin = Member(harness.self_member.node_id, "127.0.0.1:7999")
    await harness.add(twin)
    baseline = foreign_threads()
    try:
        with pytest.raises(ConfigError, match="node ids must be unique"):
            await harness.discovery().run(Recorder(harness.self_member))
    finally:
        await harness.aclose()
    assert foreign_threads() == baseline - 1  # the twin's zeroconf closed too


@asynccontextmanager
async def _two_members() -> AsyncIterator[tuple[MdnsHarness, Member, Member, Recorder]]:
    """Members a and b, both listed by a running discovery (its recorder); the harness
    closed after."""
    harness = MdnsHarness()
    a, b = harness.member(0), harness.member(1)
    await harness.add(a)
    await harness.add(b)
    recorder = Recorder(harness.self_member)
    try:
        async with running(harness.discovery(), recorder):
            await recorder.wait_for(by_id(a, b), harness.within)
            yield harness, a, b, recorder
    finally:
        await harness.aclose()


async def _late_answer_after_a_goodbye(*, pointer: bool, wait: float) -> tuple[Recorder, Member]:
    """Members a and b; a says goodbye (its responder withdraws but stays open), then
    sends its SRV, TXT and address records (and its pointer, if ``pointer``) as an
    answer already on the wire would; ``wait`` seconds later, the recorder and b."""
    async with _two_members() as (harness, a, b, recorder):
        zc, info, announcing = harness.responders[a.node_id]
        await trio.to_thread.run_sync(withdraw, zc, info, announcing)  # goodbye, still open
        await recorder.wait_for([b], harness.within)

        def late_answer() -> None:
            out = DNSOutgoing(_FLAGS_QR_RESPONSE | _FLAGS_AA)
            records = (info.dns_service(), info.dns_text(), *info.dns_addresses())
            for record in (info.dns_pointer(), *records) if pointer else records:
                out.add_answer_at_time(record, 0)
            zc.send(out)

        await trio.to_thread.run_sync(late_answer)
        await trio.sleep(wait)
    return recorder, b


async def test_mdns_a_late_answer_after_a_goodbye_does_not_bring_a_member_back() -> None:
    # A leaving node's answer already on the wire can come in after its goodbye: fresh
    # SRV, TXT and address records but no pointer. The browser calls that an update,
    # and a resolve from the cache would succeed; the member must stay gone.
    recorder, b = await _late_answer_after_a_goodbye(pointer=False, wait=MdnsHarness.quiet)
    assert recorder.latest == [b], recorder.lists


async def test_mdns_a_late_pointer_after_a_goodbye_does_not_bring_a_member_back() -> None:
    # An answer with the pointer, sent before the goodbye and taken in after it (two
    # packets of one millisecond read in the other order): the pointer is new to the
    # browser's cache again, which makes it an "added" service. One stale answer is not
    # a return: the member must stay gone past the check, which asks it in vain.
    recorder, b = await _late_answer_after_a_goodbye(
        pointer=True, wait=RETURN_ASKS * RETURN_ASK_EVERY + MdnsHarness.quiet)  # past the check
    since_gone = recorder.lists[recorder.lists.index([b]):]
    assert all(members == [b] for members in since_gone), recorder.lists


async def test_mdns_a_member_that_leaves_and_comes_back_at_once_is_back() -> None:
    # The other side of the doubt: a node that really returns right after its goodbye
    # answers the check's question, and is taken back.
    async with _two_members() as (harness, a, b, recorder):
        await harness.remove(a)
        await recorder.wait_for([b], harness.within)
        await harness.add(a)
        await recorder.wait_for(by_id(a, b), harness.within + RETURN_ASKS * RETURN_ASK_EVERY)
