"""GET /metrics in Prometheus text format.

Every family but `sluice_http_*` and `process_*` answers for the whole deployment, from
any web node: gauges of work in flight are read at scrape time (indexed queries over
active rows only, and Redis), and the counters and histograms of ended jobs are the ones
the workers maintain in Redis (`app.telemetry`), observed once per job where it ends.
`sluice_http_*` and `process_*` are the answering web process's own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from flask import Blueprint, Response, current_app, g, request
from flask.typing import ResponseReturnValue
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from app import telemetry
from app.dashboard import queries
from app.extensions import redis_store
from app.models import utcnow
from app.models.job import ACTIVE
from app.providers import providers
from app.services import capacity
from app.services.costs import CostCollector

log = logging.getLogger(__name__)
bp = Blueprint("metrics", __name__)


class SystemCollector(Collector):
    """Gauges computed from the database and Redis when scraped (inside a request)."""

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        errors = GaugeMetricFamily(
            "sluice_scrape_source_up", "1 if the source answered this scrape", labels=["source"]
        )
        try:
            yield from self._database()
            errors.add_metric(["database"], 1)
        except Exception as exc:
            log.warning("metrics: database unavailable: %s", type(exc).__name__)
            errors.add_metric(["database"], 0)
        try:
            yield from self._redis()
            errors.add_metric(["redis"], 1)
        except Exception as exc:
            log.warning("metrics: redis unavailable: %s", type(exc).__name__)
            errors.add_metric(["redis"], 0)
        yield errors
        yield GaugeMetricFamily(
            "sluice_scrape_duration_seconds",
            "Time spent reading the database and Redis for this scrape",
            value=time.perf_counter() - started,
        )

    def _database(self) -> Iterator[Metric]:
        counts = queries.job_counts()
        batches = queries.batch_status_counts()
        ages = queries.oldest_queued_age(utcnow())
        jobs = GaugeMetricFamily(
            "sluice_jobs", "Jobs in flight (queued, running) by mode", labels=["mode", "status"]
        )
        for mode, by_status in counts.items():
            for status, count in by_status.items():
                jobs.add_metric([mode, status], count)
        batch_family = GaugeMetricFamily(
            "sluice_batches", "Batches not yet ended, by status", labels=["status"]
        )
        for status, count in batches.items():
            batch_family.add_metric([status], count)
        in_flight = sum(counts.get("stream", {}).get(s, 0) for s in ACTIVE)
        oldest = GaugeMetricFamily(
            "sluice_oldest_queued_job_age_seconds",
            "How long the oldest queued job of each mode has waited (0 when none)",
            labels=["mode"],
        )
        for mode, age in ages.items():
            oldest.add_metric([mode], age)
        yield jobs
        yield batch_family
        yield GaugeMetricFamily(
            "sluice_streams_in_flight",
            "Stream-mode jobs queued or running",
            value=in_flight,
        )
        yield oldest

    def _redis(self) -> Iterator[Metric]:
        client = redis_store.client
        max_age = current_app.config["WORKER_HEARTBEAT_SECONDS"] * 3
        workers = queries.workers_by_mode(queries.workers(client, max_age))
        depths = queries.queue_depths(client)
        live = GaugeMetricFamily(
            "sluice_workers_live", "Workers with a recent heartbeat, by mode", labels=["mode"]
        )
        for mode, count in workers.items():
            live.add_metric([mode], count)
        depth = GaugeMetricFamily(
            "sluice_queue_depth", "Tasks waiting in each Celery queue", labels=["queue"]
        )
        for queue, count in depths.items():
            depth.add_metric([queue], count)
        yield live
        yield depth
        yield from capacity_families(capacity.current(providers().names()))
        yield from counter_families(telemetry.totals(client))


def capacity_families(splits: list[capacity.Split]) -> Iterator[Metric]:
    """Each provider's calls in flight by mode, its shared capacity where one is set, and
    (with per-minute limits) this window's requests and tokens by mode, and the limits."""
    calls = GaugeMetricFamily(
        "sluice_provider_calls_in_flight",
        "Provider calls holding capacity: stream jobs admitted and not ended, batch calls",
        labels=["provider", "mode"],
    )
    shared = GaugeMetricFamily(
        "sluice_provider_capacity",
        "Concurrent calls a provider's capacity allows, shared by streams and batch",
        labels=["provider"],
    )
    used = {
        kind: GaugeMetricFamily(
            f"sluice_provider_window_{kind}",
            f"Provider {kind} counted in the current minute's window, by mode",
            labels=["provider", "mode"],
        )
        for kind in ("requests", "tokens")
    }
    limits = {
        kind: GaugeMetricFamily(
            f"sluice_provider_{kind}_per_minute",
            f"{kind.capitalize()} per minute a provider's capacity allows, shared by both modes",
            labels=["provider"],
        )
        for kind in ("requests", "tokens")
    }
    paused = GaugeMetricFamily(
        "sluice_provider_batch_paused_seconds",
        "Seconds a provider's batch calls stay held back after an upstream 429",
        labels=["provider"],
    )
    for split in splits:
        calls.add_metric([split.provider, "stream"], split.stream)
        calls.add_metric([split.provider, "batch"], split.batch)
        if split.capacity is not None:
            shared.add_metric([split.provider], split.capacity)
        for kind, window in (
            ("requests", split.requests_per_minute),
            ("tokens", split.tokens_per_minute),
        ):
            if window is not None:
                used[kind].add_metric([split.provider, "stream"], window.stream)
                used[kind].add_metric([split.provider, "batch"], window.batch)
                limits[kind].add_metric([split.provider], window.limit)
        paused.add_metric([split.provider], split.batch_paused_for)
    yield calls
    yield shared
    yield from used.values()
    yield from limits.values()
    yield paused


def _histogram(
    name: str,
    doc: str,
    labels: list[str],
    bounds: tuple[float, ...],
    counts: dict[tuple[str, ...], list[float]],
    sums: dict[tuple[str, ...], float],
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for key, per_bucket in sorted(counts.items()):
        cumulative, buckets = 0.0, []
        for bound, n in zip([*bounds, float("inf")], per_bucket, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        family.add_metric(list(key), buckets, sum_value=sums.get(key, 0.0))
    return family


def counter_families(totals: dict[str, float]) -> Iterator[Metric]:
    """The workers' maintained totals (`telemetry.TOTALS_KEY`) as Prometheus families."""
    ended = CounterMetricFamily(
        "sluice_jobs_ended", "Jobs ended, by mode and final status", labels=["mode", "status"]
    )
    tokens = CounterMetricFamily(
        "sluice_tokens", "Tokens of ended jobs, by mode and direction", labels=["mode", "direction"]
    )
    errors = CounterMetricFamily(
        "sluice_provider_errors",
        "Jobs failed by a provider's error, by provider and error kind (code or type)",
        labels=["provider", "kind"],
    )
    ttft: dict[tuple[str, ...], list[float]] = {}
    duration: dict[tuple[str, ...], list[float]] = {}
    sums: dict[str, dict[tuple[str, ...], float]] = {"ttft_sum": {}, "dur_sum": {}}
    for field, n in totals.items():
        kind, _, rest = field.partition("|")
        parts = rest.split("|")
        if kind == "jobs" and len(parts) == 2:
            ended.add_metric(parts, n)
        elif kind == "tok" and len(parts) == 2:
            tokens.add_metric(parts, n)
        elif kind == "perr" and len(parts) == 2:
            errors.add_metric(parts, n)
        elif kind == "ttft" and len(parts) == 3 and parts[2].isdigit():
            slots = ttft.setdefault((parts[0], parts[1]), [0.0] * (len(telemetry.TTFT_BUCKETS) + 1))
            if int(parts[2]) < len(slots):
                slots[int(parts[2])] += n
        elif kind == "dur" and len(parts) == 2 and parts[1].isdigit():
            slots = duration.setdefault((parts[0],), [0.0] * (len(telemetry.DURATION_BUCKETS) + 1))
            if int(parts[1]) < len(slots):
                slots[int(parts[1])] += n
        elif kind in sums:
            sums[kind][tuple(parts)] = n
    yield ended
    yield tokens
    yield errors
    yield _histogram(
        "sluice_ttft_seconds",
        "Time from a job's creation to its first token, by mode and provider",
        ["mode", "provider"],
        telemetry.TTFT_BUCKETS,
        ttft,
        sums["ttft_sum"],
    )
    yield _histogram(
        "sluice_job_duration_seconds",
        "Time from a succeeded job's creation to its end, by mode",
        ["mode"],
        telemetry.DURATION_BUCKETS,
        duration,
        sums["dur_sum"],
    )


REGISTRY = CollectorRegistry(auto_describe=False)
REGISTRY.register(SystemCollector())
REGISTRY.register(CostCollector())  # #13: sluice_cost_usd_total (app/services/costs.py)
ProcessCollector(registry=REGISTRY)
HTTP_REQUESTS = Counter(
    "sluice_http_requests",
    "HTTP requests answered by this web process, by route and status code",
    ["method", "route", "code"],
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "sluice_http_request_duration_seconds",
    "Time to produce the response (headers, for streams) in this web process, by route",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)


@bp.before_app_request
def _start_timer() -> None:
    g.metrics_started = time.perf_counter()


@bp.after_app_request
def _count(response: Response) -> Response:
    """Count every request; the route template keeps label cardinality bounded."""
    try:
        route = request.url_rule.rule if request.url_rule else "unmatched"
        HTTP_REQUESTS.labels(request.method, route, str(response.status_code)).inc()
        started = g.get("metrics_started")
        if started is not None:
            HTTP_LATENCY.labels(route).observe(time.perf_counter() - started)
    except Exception:
        pass
    return response


@bp.get("/metrics")
def metrics() -> ResponseReturnValue:
    """Prometheus text (or OpenMetrics when the scraper asks for it in Accept)."""
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encoder(REGISTRY), content_type=content_type)
