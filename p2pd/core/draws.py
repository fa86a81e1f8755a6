"""Random draws for the scheduler and the coordinator: ``random.Random``'s, compiled.

:func:`sample` and :func:`shuffle` give what ``rng.sample`` and ``rng.shuffle`` give,
item for item, from the same state of ``rng``, and leave it in the same state (they
follow CPython's algorithms: a test checks them against the two methods). Why not call
those: they are Python code in ``random.py``, and the compiled simulation
(:mod:`simulations.compiled`) compiles this module with its callers. Called from
compiled code, the interpreted methods took 5 % (a coordinator's draw per lookup) and
1.4 % (a scheduler's tie-break order per download) of a run.
"""

from __future__ import annotations

import math
import random
from typing import TypeVar

T = TypeVar("T")


def sample(rng: random.Random, population: list[T], k: int) -> list[T]:
    """``k`` distinct items of ``population`` at random: ``rng.sample(population, k)``.

    Small populations: the first ``k`` steps of a Fisher-Yates shuffle of a copy; large
    ones: positions drawn until ``k`` distinct ones are found."""
    n = len(population)
    if not 0 <= k <= n:
        raise ValueError("sample larger than population or is negative")
    setsize = 21  # the largest population copied (random.sample's rule)
    if k > 5:
        setsize += 4 ** math.ceil(math.log(k * 3, 4))
    result: list[T] = []
    if n <= setsize:
        pool = list(population)
        for i in range(k):
            j = _below(rng, n - i)
            result.append(pool[j])
            pool[j] = pool[n - i - 1]
        return result
    selected: set[int] = set()
    for _ in range(k):
        j = _below(rng, n)
        while j in selected:
            j = _below(rng, n)
        selected.add(j)
        result.append(population[j])
    return result


def shuffle(rng: random.Random, items: list[T]) -> None:
    """Put ``items`` in random order, in place: ``rng.shuffle(items)`` (Fisher-Yates,
    from the end)."""
    for i in range(len(items) - 1, 0, -1):
        j = _below(rng, i + 1)
        items[i], items[j] = items[j], items[i]


def _below(rng: random.Random, n: int) -> int:
    """A random int in ``[0, n)``, ``n > 0``: ``Random._randbelow``'s draw."""
    bits = n.bit_length()
    r = rng.getrandbits(bits)
    while r >= n:
        r = rng.getrandbits(bits)
    return r
