"""Prometheus metrics of one daemon, on a registry of its own (several daemons may share a
process in tests)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# The *_created series double the exposition for no use on a node daemon.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    """Every metric p2pd exports. Names, types and labels are documented in README.md."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.blob_bytes_fetched = Counter(
            "p2pd_blob_bytes_fetched", "Blob bytes brought into this node, by source",
            ["source"], registry=r)
        self.blob_bytes_served = Counter(
            "p2pd_blob_bytes_served", "Blob bytes sent to local clients (containerd), by "
            "where they were read from", ["source"], registry=r)
        self.blob_requests = Counter(
            "p2pd_blob_requests", "Blob GET/HEAD requests from clients by answer status",
            ["method", "code"], registry=r)
        self.manifest_requests = Counter(
            "p2pd_manifest_requests", "Manifest requests from clients by answer status",
            ["method", "code"], registry=r)
        self.cache_hits = Counter(
            "p2pd_cache_hits", "Blob GETs answered from the complete local cache", registry=r)
        self.cache_misses = Counter(
            "p2pd_cache_misses", "Blob GETs that needed a fetch (or joined one)", registry=r)
        self.upstream_requests = Counter(
            "p2pd_upstream_requests", "Requests p2pd sent to upstream registries, by kind and "
            "status (\"error\" when no answer came)", ["kind", "code"], registry=r)
        self.upstream_fetches = Counter(
            "p2pd_upstream_blob_fetches", "Blob downloads started from upstream (one per blob "
            "no matter how many clients wait for it)", registry=r)
        self.corrupt_pieces = Counter(
            "p2pd_corrupt_pieces", "Cached pieces whose bytes no longer matched their sha256",
            registry=r)
        self.digest_mismatches = Counter(
            "p2pd_digest_mismatches", "Blob downloads discarded because the whole blob did not "
            "match its digest", registry=r)
        self.aborted_responses = Counter(
            "p2pd_aborted_responses", "Blob responses cut short because their bytes could not "
            "be verified", registry=r)
        self.cache_bytes = Gauge(
            "p2pd_cache_bytes", "Bytes of complete blobs in the cache", registry=r)
        self.cache_blobs = Gauge(
            "p2pd_cache_blobs", "Complete blobs in the cache", registry=r)
        self.cache_evictions = Counter(
            "p2pd_cache_evictions", "Blobs evicted from the cache", registry=r)
        self.blobs_in_flight = Gauge(
            "p2pd_blobs_in_flight", "Blob downloads in progress", registry=r)
        self.pieces_fetched = Counter(
            "p2pd_pieces_fetched", "Pieces brought into this node, by source", ["source"],
            registry=r)
        self.blamed_peers = Counter(
            "p2pd_blamed_pieces", "Pieces from peers that failed their sha256 (the peer is "
            "blamed)", registry=r)
        self.peer_bytes_uploaded = Counter(
            "p2pd_peer_bytes_uploaded", "Piece bytes sent to other daemons", registry=r)
        self.peer_protocol_errors = Counter(
            "p2pd_peer_protocol_errors", "Peer connections closed for breaking the protocol",
            registry=r)
        self.peers = Gauge(
            "p2pd_peers", "Other daemons this node knows of, by liveness", ["state"],
            registry=r)
        self.coordinated_blobs = Gauge(
            "p2pd_coordinated_blobs", "Blobs this node is the coordinator of (soft state)",
            registry=r)
        self.coordinator_requests = Counter(
            "p2pd_coordinator_requests", "Coordinator messages this node answered, by kind",
            ["kind"], registry=r)
        self.leases_granted = Gauge(
            "p2pd_leases_granted", "Upstream leases this node granted as coordinator "
            "(since start)", registry=r)
        self.lease_takeovers = Gauge(
            "p2pd_lease_takeovers", "Leases granted over pieces whose previous fetcher went "
            "quiet (since start)", registry=r)
        self.replications = Counter(
            "p2pd_replications", "Preheat replicas this node was asked to hold, by outcome "
            "(held, fetched, failed, unsupported)", ["reason"], registry=r)
        self.blob_duration = Histogram(
            "p2pd_blob_serve_seconds", "Time to serve a blob GET to a client", ["source"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r)
        for source in ("upstream", "peer"):
            self.blob_bytes_fetched.labels(source)
        for source in ("cache", "download"):
            self.blob_bytes_served.labels(source)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
