"""Benchmark of a blob's coordinator: the CPU one lookup and one announcement cost it.

Run with ``python -m benchmarks.bench_coordinator [--holders 16,256,4096]
[--size-mb 64,256,1536] [--seconds 2] [--json FILE]``. Nothing is started and no
socket is opened: this is the daemon's own code path for a message on its peer port, on
one core, minus the socket reads and writes — decode the frame
(:class:`p2pd.core.protocol.FrameReader`), answer it (:meth:`p2pd.io.swarm.Swarm.on_lookup`
/ ``on_announce``, inside ``trio.run`` as the daemon calls them), encode the answer
(:func:`p2pd.core.protocol.encode_frame`).

For each number of holders and blob size (its pieces by the daemon's size rule): a swarm
where that many nodes announced a random half of the pieces (and their hashes), then,
for ``--seconds`` each: lookups from 16 of them in turn (the rarest holders for each
asker); lookups from all of them in turn (with more than
:data:`p2pd.core.tuning.SAMPLE_ABOVE` askers: holders drawn at random); announcements of
one more piece from them in turn (with that piece's hash: the daemon sends a coordinator
only the hashes it has not sent it). Reported: microseconds per lookup of either kind
and per announcement, the lookups per second one core can answer, the size of a
lookup's answer, and how many nodes a coordinator could serve at one lookup per
:data:`p2pd.core.tuning.LOOKUP_INTERVAL` each (per blob being pulled).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import trio

from p2pd.core.bitfield import pack_bitfield
from p2pd.core.membership import Membership
from p2pd.core.messages import Announce, Lookup, Peers
from p2pd.core.pieces import PieceLayout
from p2pd.core.protocol import FrameReader, encode_frame
from p2pd.core.tuning import LOOKUP_INTERVAL, SAMPLE_ABOVE
from p2pd.io.swarm import Swarm

DIGEST = "sha256:" + "5a" * 32


def _roundtrip(frame: bytes) -> object:
    reader = FrameReader()
    reader.feed(frame)
    return reader.next_message()


async def _measure(holders: int, size: int, seconds: float, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    layout = PieceLayout.for_size(size)
    piece_size, pieces = layout.piece_size, layout.count
    membership = Membership("coordinator", suspect_after=5.0, drop_after=30.0,
                            self_addr="127.0.0.1:1")
    async with trio.open_nursery() as nursery:
        swarm = Swarm(node_id="coordinator", addr="127.0.0.1:1", secret=None,
                      membership=membership, rng=random.Random(seed), nursery=nursery)
        names = [f"node-{i}" for i in range(holders)]
        held: dict[str, set[int]] = {}
        for i, name in enumerate(names):
            mine = held[name] = set(rng.sample(range(pieces), pieces // 2))
            bits = pack_bitfield(mine, pieces)
            announce = Announce(DIGEST, size, piece_size, bits, False,
                                f"127.0.0.{1 + i % 250}:{7000 + i // 250}", bits,
                                b"".join(bytes([j % 251]) * 32 for j in sorted(mine)))
            swarm.on_announce(name, announce)
        # lookups from 16 holders in turn (the rarest holders for each asker), then from
        # all of them in turn (more than SAMPLE_ABOVE: holders drawn at random)
        lookup, answer_bytes = _lookups(swarm, names[:16], size, seconds)
        sampled = _lookups(swarm, names, size, seconds)[0] \
            if holders > SAMPLE_ABOVE else float("nan")
        # announcements of one more piece each (a bitfield and the new piece's hash)
        done = 0
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            name = names[done % holders]
            mine = held[name]
            missing = [j for j in range(pieces) if j not in mine]
            new = missing[:1]
            mine.update(new)
            frame = encode_frame(Announce(
                DIGEST, size, piece_size, pack_bitfield(mine, pieces), len(mine) == pieces,
                f"127.0.0.{1 + done % 250}:7000", pack_bitfield(new, pieces),
                b"".join(bytes([j % 251]) * 32 for j in new)))
            message = _roundtrip(frame)
            assert isinstance(message, Announce)
            swarm.on_announce(name, message)
            done += 1
        announce_cost = (time.perf_counter() - began) / done
        nursery.cancel_scope.cancel()
    return {"holders": holders, "pieces": pieces, "lookup_us": lookup * 1e6,
            "sampled_lookup_us": sampled * 1e6, "announce_us": announce_cost * 1e6,
            "lookups_per_s": 1 / lookup, "answer_bytes": answer_bytes,
            "nodes_served": LOOKUP_INTERVAL / (lookup if holders <= SAMPLE_ABOVE
                                               else sampled)}


def _lookups(swarm: Swarm, names: list[str], size: int, seconds: float) -> tuple[float, int]:
    """Seconds per lookup from ``names`` in turn, and the size of an answer."""
    count, answer_bytes = 0, 0
    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        for name in names:
            asked = _roundtrip(encode_frame(Lookup(count, DIGEST, size)))
            assert isinstance(asked, Lookup)
            answer = swarm.on_lookup(name, asked)
            assert isinstance(answer, Peers) and answer.holders
            answer_bytes = len(encode_frame(answer))
            count += 1
    return (time.perf_counter() - began) / count, answer_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--holders", default="16,256,4096")
    parser.add_argument("--size-mb", default="64,256,1536")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    print("holders  pieces  lookup us  sampled us  announce us  lookups/s/core  answer B  "
          "nodes per coordinator at one lookup per interval")
    for size_mb in map(float, args.size_mb.split(",")):
        for holders in map(int, args.holders.split(",")):
            row = trio.run(_measure, holders, round(size_mb * (1 << 20)), args.seconds,
                           args.seed)
            rows.append(row)
            print(f"{holders:7d}  {row['pieces']:6.0f}  {row['lookup_us']:9.0f}  "
                  f"{row['sampled_lookup_us']:9.0f}  "
                  f"{row['announce_us']:11.0f}  {row['lookups_per_s']:14.0f}  "
                  f"{row['answer_bytes']:8d}  {row['nodes_served']:6.0f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
