"""The conformance suite every :class:`~p2pd.io.discovery.Discovery` must pass.

In the style of spegel's ``storetest``: one set of behaviours, run against each
implementation through a :class:`Harness` that knows how to make members appear and
disappear for that implementation. Use it by subclassing :class:`DiscoveryConformance`
in a test module (the class name does not start with ``Test``, so it is collected only
through its subclasses) and defining a ``harness`` fixture::

    class TestMemory(DiscoveryConformance):
        @pytest.fixture
        def harness(self) -> Harness:
            return MemoryHarness()

        @pytest.fixture
        def clock(self, autojump_clock: Clock) -> Clock | None:
            return autojump_clock

A kind that cannot do something sets ``dynamic = False`` or ``announces = False`` on its
class, and the tests that need it are skipped with the reason (see
:class:`DiscoveryConformance`).

Times are in the trio clock the ``clock`` fixture gives (pytest-trio only uses a clock
that the test function itself asks for, hence the fixture): virtual time with
``autojump_clock``, real time by default (mDNS, whose zeroconf threads know no trio
clock).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, ClassVar, Protocol, TypeVar

import pytest
import trio
from trio.abc import Clock

from p2pd.core.membership import Member
from p2pd.io.discovery import Discovery

_F = TypeVar("_F", bound=Callable[..., Any])


class Harness(Protocol):
    """What the suite needs to know about one implementation."""

    self_member: Member
    """The node the discovery under test runs for; announced as its kind does it
    (in the static list, in DNS, on the network), so the suite checks it is left out."""
    within: float
    """Seconds within which a change must show up in the member list."""
    quiet: float
    """Seconds to watch for a list that should not come."""

    def member(self, index: int) -> Member:
        """A member other than ``self_member``, a different one for each index."""
        ...

    async def add(self, member: Member) -> None:
        """Make ``member`` present (before or while discovery runs)."""
        ...

    async def remove(self, member: Member) -> None:
        """Make ``member`` absent."""
        ...

    def discovery(self, node: Member | None = None) -> Discovery:
        """A discovery for ``node`` (default ``self_member``) over the present members."""
        ...


def foreign_threads() -> int:
    """Live threads other than trio's idle worker-thread cache (which lingers ~10 s)."""
    return sum(1 for thread in threading.enumerate()
               if not thread.name.startswith("Trio thread"))


class Recorder:
    """The ``on_members`` callback: keeps every list and checks the contract on each call."""

    def __init__(self, node: Member) -> None:
        self.node = node
        self.lists: list[list[Member]] = []
        self._changed = trio.Event()

    def __call__(self, members: list[Member]) -> None:
        assert isinstance(members, list)
        ids = [member.node_id for member in members]
        assert ids == sorted(ids), f"not sorted by node id: {members}"
        assert len(set(ids)) == len(ids), f"duplicate node ids: {members}"
        assert len(set(members)) == len(members)
        assert self.node.node_id not in ids, f"self listed: {members}"
        assert self.node.addr not in [member.addr for member in members]
        assert not self.lists or members != self.lists[-1], f"unchanged list repeated: {members}"
        self.lists.append(members)
        self._changed.set()
        self._changed = trio.Event()

    @property
    def latest(self) -> list[Member] | None:
        """The last list delivered."""
        return self.lists[-1] if self.lists else None

    async def wait_for(self, expected: list[Member], within: float) -> None:
        """Wait (at most ``within`` seconds) until the latest list is ``expected``."""
        with trio.fail_after(within):
            while self.latest != expected:
                await self._changed.wait()


@asynccontextmanager
async def running(discovery: Discovery, recorder: Recorder) -> AsyncIterator[None]:
    """Run ``discovery`` (started) for the body of the ``async with``; cancel it after."""
    async with trio.open_nursery() as nursery:
        await nursery.start(discovery.run, recorder)
        yield
        nursery.cancel_scope.cancel()


def by_id(*members: Member) -> list[Member]:
    """``members`` as a canonical list: sorted by node id."""
    return sorted(members, key=lambda member: member.node_id)


_REASONS = {
    "dynamic": "this kind's members are fixed",
    "announces": "running this kind of discovery does not announce the node",
}


def needs(*capabilities: str) -> Callable[[_F], _F]:
    """Mark a test as needing capabilities (class attributes of the conformance class)."""

    def mark(test: _F) -> _F:
        test.needs = capabilities  # type: ignore[attr-defined]
        return test

    return mark


class DiscoveryConformance:
    """The behaviours every discovery implementation shares.

    Subclasses say what their kind can do: ``dynamic`` (members join and leave while
    discovery runs; not static lists) and ``announces`` (running a discovery makes its
    node visible to other nodes' discovery: memory and mDNS, not static or DNS, where
    the list or Kubernetes does that).
    """

    dynamic: ClassVar[bool] = True
    announces: ClassVar[bool] = True

    @pytest.fixture(autouse=True)
    def _skip_unless_capable(self, request: pytest.FixtureRequest) -> None:
        # A sync fixture: pytest-trio loses the reason of a skip raised inside a test.
        for capability in getattr(request.function, "needs", ()):
            if not getattr(self, capability):
                pytest.skip(f"{type(self).__name__}: {_REASONS[capability]}")

    @pytest.fixture
    def clock(self) -> Clock | None:
        """The trio clock of each test: real time unless a subclass says otherwise."""
        return None

    async def test_the_first_list_comes_before_started(
        self, harness: Harness, clock: Clock | None
    ) -> None:
        a, b = harness.member(0), harness.member(1)
        await harness.add(a)
        await harness.add(b)
        recorder = Recorder(harness.self_member)
        async with running(harness.discovery(), recorder):
            assert recorder.lists == [by_id(a, b)], recorder.lists

    async def test_alone_the_first_list_is_empty(
        self, harness: Harness, clock: Clock | None
    ) -> None:
        recorder = Recorder(harness.self_member)
        async with running(harness.discovery(), recorder):
            assert recorder.lists == [[]], recorder.lists

    async def test_self_is_left_out(
        self, harness: Harness, clock: Clock | None
    ) -> None:
        # The harness announces self_member the way its kind does (see Harness); the
        # Recorder fails the test if it ever shows up.
        a = harness.member(0)
        await harness.add(a)
        recorder = Recorder(harness.self_member)
        async with running(harness.discovery(), recorder):
            assert recorder.lists == [[a]], recorder.lists

    async def test_lists_are_sorted_and_deduplicated(
        self, harness: Harness, clock: Clock | None
    ) -> None:
        members = [harness.member(i) for i in (3, 0, 2, 1)]
        for member in [*members, members[0], members[2]]:
            await harness.add(member)
        recorder = Recorder(harness.self_member)
        async with running(harness.discovery(), recorder):
            assert recorder.lists == [by_id(*members)], recorder.lists

    @needs("dynamic")
    async def test_a_member_joining_appears(
        self, harness: Harness, clock: Clock | None
    ) -> None:
        a, b = harness.member(0), harness.member(1)
        await harness.add(a)
        recorder = Recorder(harness.self_member)
        async with running(harness.discovery(), recorder):
            await harness.add(b)
            await recorder.wait_for(by_id(a, b), harness.within)
        assert recorder.lists == [[a], by_id(a, b)], recorder.lists

    @needs("dynamic")
    async def test_a_member_leaving_disappears(
        self, harness: Harness, clock: Clock | None
    ) -> None:
        a, b = harness.member(0), harness.member(1)
        await harness.add(a)
        await harness.add(b)
        recorder = Recorder(harness.self_member)
        async with running(harness.discovery(), recorder):
            await harness.remove(a)
            await recorder.wait_for([b], harness.within)
        assert recorder.lists == [by_id(a, b), [b]], recorder.lists

    async def test_nothing_is_delivered_while_nothing_changes(
        self, harness: Harness, clock: Clock | None
    ) -> None:
        a = harness.member(0)
        await harness.add(a)
        recorder = Recorder(harness.self_member)
        async with running(harness.discovery(), recorder):
            if self.dynamic:
                await harness.add(a)  # present already: no change
            await trio.sleep(harness.quiet)
        assert recorder.lists == [[a]], recorder.lists

    @needs("announces")
    async def test_two_nodes_see_each_other_and_a_stopped_one_leaves(
        self, harness: Harness, clock: Clock | None
    ) -> None:
        other = harness.member(0)
        mine, theirs = Recorder(harness.self_member), Recorder(other)
        async with running(harness.discovery(), mine):
            async with running(harness.discovery(other), theirs):
                await mine.wait_for([other], harness.within)
                await theirs.wait_for([harness.self_member], harness.within)
            await mine.wait_for([], harness.within)
        assert mine.lists == [[], [other], []], mine.lists

    async def test_cancelling_stops_cleanly(
        self, harness: Harness, clock: Clock | None
    ) -> None:
        a = harness.member(0)
        await harness.add(a)
        baseline = foreign_threads()
        recorder = Recorder(harness.self_member)
        with trio.fail_after(harness.within):
            async with running(harness.discovery(), recorder):
                pass
        assert foreign_threads() == baseline
        if self.dynamic:
            await harness.remove(a)
        await trio.sleep(harness.quiet)  # a late callback would land here
        assert recorder.lists == [[a]], recorder.lists
