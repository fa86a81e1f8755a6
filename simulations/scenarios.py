"""Published large-cluster pull results, as scenarios the simulator reruns.

Each :class:`Study` is one published experiment: where it comes from, the published
figures, the assumptions made where the write-up leaves parameters out, and one
:class:`Case` per published point. ``python -m simulations run NAME`` runs every case
in every mode of the study (p2pd, and the baselines on the same network) and writes
``simulations/results/NAME.json`` and a Markdown table beside the published figures.

Units: sizes in bytes (MB = 10^6, as the write-ups use; the image sizes are nominal),
rates in bytes/s.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from simulations.cluster import Scenario

MB = 1_000_000
GB = 1_000_000_000
Gbit = 1e9 / 8


@dataclass(frozen=True)
class Case:
    """One published point: the scenario and what was published for it."""

    label: str
    scenario: Scenario
    published: dict[str, str] = field(default_factory=dict)  # figure name -> as published


@dataclass(frozen=True)
class Study:
    """A published experiment: its cases, the modes to run, and what was assumed."""

    name: str
    title: str
    source: str
    cases: tuple[Case, ...]
    modes: tuple[str, ...] = ("p2p", "direct")
    assumptions: tuple[str, ...] = ()


def free_coordinators(study: Study) -> Study:
    """``study`` with coordinators that answer at once, however many nodes ask (the model
    before their CPU was: ``Scenario.coordinator_cpu``)."""
    return replace(study, cases=tuple(
        replace(case, scenario=replace(case.scenario, coordinator_cpu=False))
        for case in study.cases))


def _image(total: int, layers: int) -> tuple[int, ...]:
    size, extra = divmod(total, layers)
    return tuple([size] * (layers - 1) + [size + extra])


def _scenario(nodes: int, total: int, layers: int, *, up: float, down: float,
              registry: float, **extra: object) -> Scenario:
    return Scenario(nodes=nodes, image_bytes=total, layer_sizes=_image(total, layers),
                    node_up=up, node_down=down, registry_up=registry, seed=1,
                    **extra)  # type: ignore[arg-type]


def _kraken() -> Study:
    scenario = _scenario(2600, 3 * GB, 2, up=300 * MB, down=300 * MB, registry=1500 * MB)
    return Study(
        "kraken", "Kraken: 2,600 hosts pull a 3 GB image (2 layers) at once",
        "github.com/uber/kraken README, 'Benchmark'",
        (Case("2600 hosts", scenario,
              {"p50": "10 s", "p99": "18 s", "p99.9": "22 s"}),),
        assumptions=(
            "per-host limit 300 MB/s applied to upload and download",
            "origin (registry) egress 1.5 GB/s: five origin hosts at the same 300 MB/s",
            "layers of 1.5 GB each; p2pd's piece rule gives 4 MiB pieces (Kraken's default)",
        ),
    )


def _volcano() -> Study:
    sweep = (50, 100, 200, 500)
    plain = {(500 * MB, n): p for n, p in zip(sweep, (35, 65, 135, 1020), strict=True)}
    plain |= {(3 * GB, n): p for n, p in zip(sweep, (260, 1380, 4245, 10800), strict=True)}
    p2p = {(500 * MB, n): p for n, p in zip(sweep, (10, 10, 15, 25), strict=True)}
    p2p |= {(3 * GB, n): p for n, p in zip(sweep, (40, 40, 50, 55), strict=True)}
    cases = tuple(
        Case(f"{size // MB} MB, {n} nodes",
             _scenario(n, size, 4, up=6 * Gbit, down=6 * Gbit, registry=10 * Gbit),
             {"direct": f"{plain[(size, n)]} s", "p2p": f"{p2p[(size, n)]} s"})
        for size in (500 * MB, 3 * GB) for n in (50, 100, 200, 500)
    )
    return Study(
        "dragonfly-volcano", "Dragonfly on Volcano Engine: plain pull vs P2P, 50-500 nodes",
        "Dragonfly blog/CNCF talk, Volcano Engine image distribution benchmark",
        cases,
        assumptions=(
            "registry egress 10 Gbit/s, nodes 6 Gbit/s up and down (as published)",
            "4 layers of equal size (not published); times are until the last node is done",
        ),
    )


def _dfget() -> Study:
    one = {200 * MB: "4.1 s", 1 * GB: "11.7 s", 10 * GB: "103 s"}
    many = {200 * MB: "9.2 s", 1 * GB: "28.5 s", 10 * GB: "388 s"}
    cases = []
    for size in (200 * MB, 1 * GB, 10 * GB):
        for nodes, published in ((1, one[size]), (990, many[size])):
            cases.append(Case(
                f"{size // MB} MB, {nodes} node{'s' if nodes > 1 else ''}",
                _scenario(nodes, size, 1, up=125 * MB, down=125 * MB, registry=125 * MB),
                {"p2p": published}))
    return Study(
        "dragonfly-dfget", "Dragonfly dfget: one file to 1 and to 990 nodes",
        "Dragonfly documentation, dfget performance test",
        tuple(cases), modes=("p2p",),
        assumptions=(
            "nodes and the source at 1 Gbit/s (125 MB/s): the one-node times (4.1 s for "
            "200 MB ... 103 s for 10 GB, 49-97 MB/s) fit a 1 Gbit/s source",
            "one file = one blob",
        ),
    )


def _spegel() -> Study:
    cases = []
    for size in (10 * MB, 100 * MB, 1 * GB):
        for layers in (1, 4):
            base = _scenario(50, size, layers, up=12.5 * Gbit, down=12.5 * Gbit,
                             registry=1 * Gbit, disk=250 * MB)
            cases.append(Case(f"{size // MB} MB in {layers}, rolling 20 %",
                              replace(base, arrival="rolling", batch=0.2),
                              {"spegel": "faster than the baseline (graphs only)"}))
            cases.append(Case(f"{size // MB} MB in {layers}, all at once", base,
                              {"spegel": "no gain: nothing shared before a node has "
                                         "the whole image"}))
    return Study(
        "spegel", "Spegel: 50 nodes, rolling update and all at once",
        "spegel.dev/docs/benchmark (AKS, 50 Standard_D4ds_v5)",
        tuple(cases), modes=("p2p", "direct", "spegel"),
        assumptions=(
            "Standard_D4ds_v5: 12.5 Gbit/s network, local disk ~250 MB/s (caps serving and "
            "receiving)",
            "registry (ghcr.io) at 1 Gbit/s per pull site, not published",
            "rolling update: 20 % of the pods at a time, the next batch when the previous "
            "is pulled",
        ),
    )


def _hundred() -> Study:
    scenario = _scenario(100, 1 * GB, 4, up=1 * Gbit, down=1 * Gbit, registry=139 * MB)
    return Study(
        "hundred-nodes", "100 nodes: plain pull 12 minutes, P2P 3 minutes",
        "the field's write-ups on P2P image distribution (commonly quoted figure)",
        (Case("100 nodes, 1 GB", scenario, {"direct": "12 min", "p2p": "3 min"}),),
        modes=("p2p", "direct", "spegel"),
        assumptions=(
            "image 1 GB in 4 layers and 1 Gbit/s nodes (not published)",
            "registry egress 139 MB/s, chosen so the plain pull takes 12 minutes "
            "(100 x 1 GB / 720 s)",
        ),
    )


STUDIES: dict[str, Study] = {s.name: s for s in (_kraken(), _volcano(), _dfget(), _spegel(),
                                                  _hundred())}
