"""What every job cost, tenants' spend per day, and the totals `/metrics` shows.

A job's cost comes from its usage, its model's price (`app.pricing`) and its executor
(the provider executor pays the batch price). The provider executor records it as it
writes each result; the sweeper's `settle` step prices every other ended job (streams
and worker-run batch items) within a sweep, so no runner needs to know about prices.
Each job is priced once (`cost_usd IS NULL` guards the write), its cost added first to
the totals below (`charge`; a Redis failure leaves the job unpriced for a later `settle`),
once: the same script marks the job charged (`sluice:costs:charged:<job id>`, kept a day),
so two writers of one job (two sweepers, two pollers, a retried task) add it once:

- `sluice:costs:totals`, a Redis hash `tenant|mode|executor` -> USD, exposed by
  `/metrics` as `sluice_cost_usd_total{tenant,mode,executor}`;
- `sluice:costs:day:<YYYY-MM-DD>`, tenant id -> USD spent that UTC day (kept 3 days):
  the spend a `budget_left_below` policy condition routes on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import replace
from datetime import datetime

from flask import current_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select, update

from app.extensions import db, redis_store
from app.models import Job, Tenant, utcnow
from app.models.job import TERMINAL, jobs_t
from app.policy import RouteRequest
from app.pricing import budget_for, job_cost
from app.redis_scripts import run_script

log = logging.getLogger(__name__)

TOTALS_KEY = "sluice:costs:totals"
DAY_KEY = "sluice:costs:day:{}"
DAY_SPLIT_KEY = "sluice:costs:day:{}:split"  # field "mode|executor": USD this UTC day
DAY_TTL = 3 * 86400
CHARGED_KEY = "sluice:costs:charged:{}"  # a job already added to the totals
CHARGED_TTL = 86400  # longer than any writer's read -> charge -> price
SETTLE_LIMIT = 500  # jobs priced per sweep (one short write transaction)

# KEYS: totals, day, day split, then each job's charged marker. ARGV: the day keys' TTL,
# then per job: totals field, tenant id, split field, USD. Adds the jobs not charged yet.
RECORD = f"""
for i = 4, #KEYS do
  local a = 2 + (i - 4) * 4
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', {CHARGED_TTL}) then
    redis.call('HINCRBYFLOAT', KEYS[1], ARGV[a], ARGV[a + 3])
    redis.call('HINCRBYFLOAT', KEYS[2], ARGV[a + 1], ARGV[a + 3])
    redis.call('HINCRBYFLOAT', KEYS[3], ARGV[a + 2], ARGV[a + 3])
  end
end
redis.call('EXPIRE', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[3], ARGV[1])
return 1
"""

Priced = tuple[str, str, str, str | None, float]  # job id, tenant id, mode, executor, USD


def job_cost_usd(job: Job) -> float | None:
    """The job's recorded cost; for an ended job not yet settled, what it will be; else None."""
    if job.cost_usd is not None:
        return round(job.cost_usd, 8)
    if job.status not in TERMINAL:
        return None
    return round(job_cost(job.model, job.usage, job.executor, current_app.config), 8)


def day_of(at: datetime | None = None) -> str:
    return (at or utcnow()).strftime("%Y-%m-%d")


def record(entries: Iterable[Priced]) -> None:
    """Add priced jobs to the totals, all or none (one script), each job once however often
    it is recorded; raises when Redis does."""
    items = [e for e in entries if e[4]]
    if not items:
        return
    names = _tenant_names({e[1] for e in items})
    keys = [TOTALS_KEY, DAY_KEY.format(day_of()), DAY_SPLIT_KEY.format(day_of())]
    args: list[object] = [DAY_TTL]
    for job_id, tenant_id, mode, executor, usd in items:
        keys.append(CHARGED_KEY.format(job_id))
        label = f"{names.get(tenant_id, tenant_id)}|{mode}|{executor or 'workers'}"
        args += [label, tenant_id, f"{mode}|{executor or 'workers'}", usd]
    run_script(redis_store.client, RECORD, len(keys), *keys, *args)


def charge(priced: Iterable[Priced]) -> bool:
    """Add jobs about to be priced (job id, tenant id, mode, executor, usd) to the totals,
    before their cost_usd is written; False if Redis failed: then write them unpriced (NULL),
    and the sweeper's `settle` charges them later, so no spend is lost to a Redis outage.

    Call it outside any transaction (no database lock held across Redis). A job charged
    already (by another writer meanwhile, or by a process cut before its write committed)
    is not added again.
    """
    entries = list(priced)
    try:
        record(entries)
    except Exception as exc:
        log.warning("could not add %d job cost(s) to the Redis totals (%s): left to settle",
                    len(entries), type(exc).__name__)  # fmt: skip
        return False
    return True


def _tenant_names(ids: set[str]) -> dict[str, str]:
    rows = db.session.execute(select(Tenant.id, Tenant.name).where(Tenant.id.in_(ids))).all()
    return {row.id: row.name for row in rows}


def settle(limit: int = SETTLE_LIMIT) -> int:
    """The sweeper step: price ended jobs that have no cost yet; returns how many."""
    config = current_app.config
    with db.engine.connect() as conn:
        rows = conn.execute(
            select(
                jobs_t.c.id, jobs_t.c.tenant_id, jobs_t.c.mode, jobs_t.c.executor,
                jobs_t.c.model, jobs_t.c.usage,
            )
            .where(jobs_t.c.cost_usd.is_(None), jobs_t.c.finished_at.is_not(None))
            .limit(limit)
        ).all()  # fmt: skip
    usd = {row.id: job_cost(row.model, row.usage, row.executor, config) for row in rows}
    if not charge((row.id, row.tenant_id, row.mode, row.executor, usd[row.id]) for row in rows):
        return len(rows)  # all left unpriced: the next sweep charges them
    with db.engine.begin() as conn:
        for job_id, cost in usd.items():
            conn.execute(
                update(jobs_t)
                .where(jobs_t.c.id == job_id, jobs_t.c.cost_usd.is_(None))
                .values(cost_usd=cost)
            )
    return len(rows)


def spent_today(tenant_id: str) -> float:
    """USD the tenant spent this UTC day (jobs priced today)."""
    raw = redis_store.client.hget(DAY_KEY.format(day_of()), tenant_id)
    return float(raw) if raw is not None else 0.0


def with_budget(req: RouteRequest) -> RouteRequest:
    """The request with `budget_left` filled in when the tenant has a daily budget."""
    budget = budget_for(req.tenant_name, req.tenant_id, current_app.config)
    if budget is None:
        return req
    return replace(req, budget_left=round(budget - spent_today(req.tenant_id), 6))


def totals() -> dict[tuple[str, str, str], float]:
    """USD spent since Redis began keeping it, by (tenant name, mode, executor): for /metrics
    and the dashboard."""
    out: dict[tuple[str, str, str], float] = {}
    for field, value in redis_store.client.hgetall(TOTALS_KEY).items():
        parts = str(field).split("|")
        if len(parts) == 3:
            out[(parts[0], parts[1], parts[2])] = float(value)
    return out


def spend_today() -> dict[str, float]:
    """USD spent this UTC day, by tenant name."""
    spend = redis_store.client.hgetall(DAY_KEY.format(day_of()))
    names = _tenant_names({str(k) for k in spend}) if spend else {}
    return {names.get(str(k), str(k)): float(v) for k, v in spend.items()}


def today_by_mode_and_executor() -> dict[tuple[str, str], float]:
    """USD spent this UTC day, by (mode, executor), all tenants: for the dashboard."""
    out: dict[tuple[str, str], float] = {}
    for field, value in redis_store.client.hgetall(DAY_SPLIT_KEY.format(day_of())).items():
        mode, _, executor = str(field).partition("|")
        out[(mode, executor or "workers")] = float(value)
    return out


class CostCollector(Collector):
    """`sluice_cost_usd_total{tenant,mode,executor}` and today's spend per tenant, from Redis."""

    def collect(self) -> Iterator[Metric]:
        total = CounterMetricFamily(
            "sluice_cost_usd",
            "USD spent on ended jobs (usage x model price; batch price on the provider executor)",
            labels=["tenant", "mode", "executor"],
        )
        today = GaugeMetricFamily(
            "sluice_tenant_spend_today_usd", "USD spent this UTC day, by tenant", labels=["tenant"]
        )
        try:
            for labels, usd in sorted(totals().items()):
                total.add_metric(list(labels), usd)
            for tenant, usd in sorted(spend_today().items()):
                today.add_metric([tenant], usd)
        except Exception as exc:
            log.warning("metrics: cost totals unavailable: %s", type(exc).__name__)
        yield total
        yield today


def batch_cost_usd(batch_id: str) -> float:
    """What a batch cost so far: the sum of its items' recorded costs."""
    with db.engine.connect() as conn:
        total = conn.scalar(
            select(func.sum(jobs_t.c.cost_usd)).where(jobs_t.c.batch_id == batch_id)
        )
    return round(float(total or 0.0), 8)
