"""Static discovery: a fixed list of peer addresses (``static:HOST:PORT,HOST:PORT``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from p2pd.core.membership import Member
from p2pd.errors import ConfigError
from p2pd.io.discovery.base import (
    MemberFeed,
    OnMembers,
    check_self_named_by_addr,
    member_for_addr,
)

log = logging.getLogger(__name__)


class StaticDiscovery:
    """The members of a fixed address list, named by address.

    The same list can be given to every node: the entry for this node itself is left
    out. Host names are kept as written (lower-cased), not resolved: the peer layer
    resolves them when it connects.
    """

    def __init__(self, addrs: Sequence[str], *, self_member: Member) -> None:
        check_self_named_by_addr(self_member, "static")
        if not addrs:
            raise ConfigError("static discovery needs at least one HOST:PORT")
        self.self_member = self_member
        self.members = [member_for_addr(addr) for addr in addrs]

    @classmethod
    def from_spec(cls, rest: str, *, self_member: Member) -> StaticDiscovery:
        """Parse the part of ``static:HOST:PORT,...`` after ``static:``."""
        addrs = [part.strip() for part in rest.split(",")]
        if any(not addr for addr in addrs):
            raise ConfigError(f"static:{rest}: empty entry (expected "
                              "static:HOST:PORT,HOST:PORT,...)")
        return cls(addrs, self_member=self_member)

    async def run(
        self,
        on_members: OnMembers,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Deliver the list once, then wait until cancelled."""
        feed = MemberFeed(on_members, self.self_member, "static")
        feed.offer(self.members)
        task_status.started()
        await trio.sleep_forever()
