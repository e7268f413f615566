"""GET /metrics in Prometheus text format.

System state (jobs, batches, workers, queues) is read from the database and Redis at
scrape time, so any web process answers for the whole deployment. Counters named
`sluice_http_*` and the `process_*` families are this web process's own.
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
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from app.dashboard import queries
from app.extensions import redis_store
from app.models import utcnow
from app.models.job import ACTIVE

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
            "sluice_jobs", "Jobs in the database by mode and status", labels=["mode", "status"]
        )
        for mode, by_status in counts.items():
            for status, count in by_status.items():
                jobs.add_metric([mode, status], count)
        batch_family = GaugeMetricFamily(
            "sluice_batches", "Batches in the database by status", labels=["status"]
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


REGISTRY = CollectorRegistry(auto_describe=False)
REGISTRY.register(SystemCollector())
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
