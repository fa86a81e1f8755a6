"""``p2pd status``: one node's daemon as people read it (``--json`` prints the daemon's
``/_p2pd/status`` document itself)."""

from __future__ import annotations

import time
from typing import Any

from p2pd.client.progress import human_size as size

RECENT_SHOWN = 15


def render(status: dict[str, Any], now: float | None = None) -> str:
    """The status document as text."""
    now = time.time() if now is None else now
    cache = status["cache"]
    lines = [
        f"p2pd {status['version']}  node {status['node_id']}  mirror {status['mirror']}  "
        f"peer port {status['peer_addr'] or '-'}  up {_duration(status['uptime_seconds'])}",
        f"cache      {cache['dir']}: {cache['blobs']} blobs, {size(cache['used_bytes'])} of "
        f"{size(cache['limit_bytes'])}" + ("" if cache["writable"] else
                                           f"  NOT WRITABLE: {cache['error']}"),
    ]
    for blob in cache["largest"][:5]:
        lines.append(f"             {blob['digest'][:19]}  {size(blob['size']):>10}")
    if cache["blobs"] > 5:
        lines.append(f"             ... {cache['blobs'] - 5} more (--json lists the largest "
                     f"{len(cache['largest'])})")
    members = status["members"]
    others = [m for m in members if not m["self"]]
    counts = {state: sum(1 for m in others if m["state"] == state)
              for state in ("alive", "suspect", "down")}
    lines.append(f"peers      {len(others)} others: " +
                 ", ".join(f"{n} {state}" for state, n in counts.items()))
    lines += [f"             {m['addr']:<28} {m['state']}" for m in others[:20]]
    if len(others) > 20:
        lines.append(f"             ... {len(others) - 20} more (--json lists all)")
    downloads = status["downloads"]
    lines.append(f"in flight  {len(downloads)} blobs")
    for dl in downloads:
        lines.append(f"             {dl['digest'][:19]}  {size(dl['size']):>10}  peers "
                     f"{size(dl['peers'])}, upstream {size(dl['upstream'])}, "
                     f"{dl['seconds']:.1f} s")
    totals = status["totals"]
    lines.append(
        f"served     {totals['responses']} blob responses, {size(totals['sent'])}: cache "
        f"{size(totals['cache'])}, peers {size(totals['peers'])}, upstream "
        f"{size(totals['upstream'])}; registry egress saved {size(totals['egress_saved'])}")
    recent = status["recent"][:RECENT_SHOWN]
    if recent:
        lines.append(f"recent     {'when':>10}  {'blob':<19}  {'sent':>10}  {'cache':>10}  "
                     f"{'peers':>10}  {'upstream':>10}  repository")
        for r in recent:
            lines.append(
                f"           {_ago(now - r['at']):>10}  {r['digest'][:19]}  "
                f"{size(r['sent']):>10}  {size(r['cache']):>10}  {size(r['peers']):>10}  "
                f"{size(r['upstream']):>10}  {r['registry']}/{r['name']}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _ago(seconds: float) -> str:
    return f"{_duration(max(0.0, seconds))} ago"
