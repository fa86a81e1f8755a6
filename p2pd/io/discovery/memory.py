"""In-memory discovery for tests: a :class:`MemoryNetwork` that members join and leave.

Several daemons in one process share one network; each daemon's
:class:`MemoryDiscovery` joins it while running (as an mDNS daemon announces itself),
and a test can add or remove members by hand with :meth:`MemoryNetwork.join` and
:meth:`MemoryNetwork.leave`.
"""

from __future__ import annotations

import trio

from p2pd.core.membership import Member
from p2pd.io.discovery.base import MemberFeed, OnMembers


class MemoryNetwork:
    """The members present on a pretend network, by node id.

    Use it from one trio run (watchers wait on trio events).
    """

    def __init__(self, members: list[Member] | None = None) -> None:
        self._members: dict[str, Member] = {}
        self._changed = trio.Event()
        self._watchers = 0
        for member in members or ():
            self.join(member)

    def join(self, member: Member) -> None:
        """Add ``member`` (replacing a member with the same node id)."""
        if self._members.get(member.node_id) != member:
            self._members[member.node_id] = member
            self._notify()

    def leave(self, member: Member | str) -> None:
        """Remove a member, given as a :class:`Member` or a node id; absent ones are ignored."""
        node_id = member.node_id if isinstance(member, Member) else member
        if self._members.pop(node_id, None) is not None:
            self._notify()

    def members(self) -> list[Member]:
        """Every member present, sorted by node id."""
        return sorted(self._members.values(), key=lambda member: member.node_id)

    @property
    def watchers(self) -> int:
        """How many :class:`MemoryDiscovery` runs are watching (0 once all stopped)."""
        return self._watchers

    def discovery(self, self_member: Member, *, join: bool = True) -> MemoryDiscovery:
        """A discovery on this network for the node ``self_member``."""
        return MemoryDiscovery(self, self_member, join=join)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


class MemoryDiscovery:
    """Discovery over a :class:`MemoryNetwork`.

    With ``join`` (the default) ``self_member`` is on the network while :meth:`run`
    runs, and leaves when it stops.
    """

    def __init__(self, network: MemoryNetwork, self_member: Member, *, join: bool = True) -> None:
        self.network = network
        self.self_member = self_member
        self.join = join

    async def run(
        self,
        on_members: OnMembers,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Deliver the network's members now and after every change, until cancelled."""
        network = self.network
        feed = MemberFeed(on_members, self.self_member, "memory")
        network._watchers += 1
        try:
            if self.join:
                network.join(self.self_member)
            changed = network._changed  # taken first: on_members may change the network
            feed.offer(network.members())
            task_status.started()
            while True:
                await changed.wait()
                changed = network._changed
                feed.offer(network.members())
        finally:
            network._watchers -= 1
            if self.join and network._members.get(self.self_member.node_id) == self.self_member:
                network.leave(self.self_member)
