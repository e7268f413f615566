"""Prices, budgets and the policy keys of cost-aware routing (#13): pure logic; and the
cost counters the dashboard's cost cards read, on the real Redis."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import redis
from flask import Flask

from app.config import ConfigError, load_config
from app.extensions import db
from app.models import Job, new_id
from app.policy import RouteRequest, evaluate, parse_policy
from app.pricing import (
    DEFAULT_PRICES,
    Price,
    budget_for,
    job_cost,
    parse_budgets,
    parse_prices,
    price_for,
)
from app.providers import Completion, Usage
from app.services import costs
from app.services.provider_batches import rows
from app.services.provider_batches.apis import Outcome
from tests.helpers import insert_job, tenant_of


def test_cost_from_usage_and_executor() -> None:
    price = Price(input=2.0, output=8.0, cached_input=1.0)
    usage = {"prompt_tokens": 1000, "completion_tokens": 500}
    assert price.cost(usage, "workers") == pytest.approx((1000 * 2 + 500 * 8) / 1e6)
    assert price.cost(usage, "provider") == pytest.approx((1000 * 1 + 500 * 4) / 1e6)
    cached = {**usage, "prompt_tokens_details": {"cached_tokens": 400}}
    assert price.cost(cached, None) == pytest.approx((600 * 2 + 400 * 1 + 500 * 8) / 1e6)
    assert price.cost(None, "provider") == 0.0
    explicit = Price(input=2.0, output=8.0, batch_input=1.5, batch_output=6.0)
    assert explicit.cost(usage, "provider") == pytest.approx((1000 * 1.5 + 500 * 6) / 1e6)


def test_price_table_matches_exact_names_then_the_longest_glob() -> None:
    table = parse_prices(
        {"openai/*": {"input": 1, "output": 2}, "openai/gpt-4o*": {"input": 3, "output": 4},
         "openai/gpt-4o-mini": {"input": 5, "output": 6}}
    )  # fmt: skip
    assert price_for("openai/gpt-4o-mini", table) == Price(5.0, 6.0)
    assert price_for("openai/gpt-4o", table) == Price(3.0, 4.0)
    assert price_for("openai/o3", table) == Price(1.0, 2.0)
    assert price_for("anthropic/claude", table) is None
    assert price_for("mock/demo", table) == DEFAULT_PRICES["mock/*"]  # defaults for the mock


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ({"m": {"input": 1}}, "prices.'m'.output is required"),
        ({"m": {"input": 1, "output": -1}}, "prices.'m'.output must be a non-negative"),
        ({"m": {"input": 1, "output": 1, "cheap": 1}}, "prices.'m'.cheap is not a price"),
        ({"m": 3}, "prices.'m' must be a table"),
    ],
)
def test_bad_prices_name_the_field(table: dict[str, object], named: str) -> None:
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        parse_prices(table)


def test_bad_prices_stop_the_start(tmp_path: object) -> None:
    path = tmp_path / "sluice.toml"  # type: ignore[operator]
    path.write_text('[prices."openai/x"]\ninput = "cheap"\noutput = 1\n')
    with pytest.raises(ConfigError, match=r"prices.'openai/x'.input must be a non-negative"):
        load_config({"SLUICE_CONFIG": str(path)})


def test_budgets_by_tenant_name_id_then_default() -> None:
    config = {"BUDGETS": {"default": 10, "tenants": {"acme": 25, "t_1": 5}}}
    assert budget_for("acme", "t_9", config) == 25.0
    assert budget_for("other", "t_1", config) == 5.0
    assert budget_for("other", "t_2", config) == 10.0
    assert budget_for("x", "y", {}) is None
    with pytest.raises(ValueError, match=r"budgets\.tenants\.acme"):
        parse_budgets({"tenants": {"acme": "lots"}})


def _policy() -> object:
    return parse_policy(
        {
            "rules": [
                {"name": "broke", "when": {"budget_left_below": 5}, "route": "reject"},
                {"name": "cheap", "when": {"endpoint": "/v1/batches"}, "route": "batch",
                 "executor": "provider"},
                {"name": "rest", "route": "stream"},
            ]
        }
    )  # fmt: skip


def test_budget_left_below_routes_and_says_why() -> None:
    policy = _policy()
    req = RouteRequest("/v1/jobs", "t1", "acme", "openai/x", budget_left=2.5)
    route = evaluate(policy, req)  # type: ignore[arg-type]
    assert route.rule == "broke" and "budget left $2.50 < $5" in route.reason
    rich = RouteRequest("/v1/jobs", "t1", "acme", "openai/x", budget_left=50.0)
    assert evaluate(policy, rich).rule == "rest"  # type: ignore[arg-type]
    unlimited = RouteRequest("/v1/jobs", "t1", "acme", "openai/x")  # no budget: never "below"
    assert evaluate(policy, unlimited).rule == "rest"  # type: ignore[arg-type]


def test_executor_is_carried_on_the_route_and_checked() -> None:
    req = RouteRequest("/v1/batches", "t1", "acme", "openai/x", budget_left=50.0)
    assert evaluate(_policy(), req).executor == "provider"  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="executor must be one of"):
        parse_policy({"rules": [{"name": "r", "route": "batch", "executor": "cheap"}]})
    with pytest.raises(ConfigError, match='executor only applies to route = "batch"'):
        parse_policy({"rules": [{"name": "r", "route": "stream", "executor": "provider"}]})
    with pytest.raises(ConfigError, match="budget_left_below must be a number"):
        parse_policy(
            {"rules": [{"name": "r", "when": {"budget_left_below": "5"}, "route": "batch"}]}
        )


def _resolve(providers: dict[str, object], executor: str | None, names: list[str], **kw: object):  # type: ignore[no-untyped-def]
    from flask import Flask

    from app.policy import Route
    from app.services.provider_batches.choice import resolve

    app = Flask(__name__)
    app.config.update(PROVIDERS=providers, PRICES={})
    route = Route("batch", "r", "batch endpoint", executor=executor)
    with app.app_context():
        return resolve(route, names, [f"{n}/m" for n in names], kw.get("window", 86400.0),  # type: ignore[arg-type]
                       kw.get("metadata"))  # type: ignore[arg-type]  # fmt: skip


def test_executor_choice_rule_default_and_capability() -> None:
    assert _resolve({}, None, ["openai"]).executor == "workers"  # the default default
    assert _resolve({"openai": {"batch_executor": "provider"}}, None, ["openai"]).executor == (
        "provider"
    )
    local = {"local": {"kind": "openai", "base_url": "http://x"}}
    route = _resolve(local, "provider", ["local"])
    assert route.executor == "workers" and "provider local has no batch API" in route.reason
    capable = {"local": {"kind": "openai", "base_url": "http://x", "batch_api": True}}
    assert _resolve(capable, "provider", ["local"]).executor == "provider"
    mixed = {"openai": {"batch_executor": "provider"}}
    assert _resolve(mixed, None, ["openai", "anthropic"]).executor == "workers"


def test_auto_executor_by_completion_window_or_deadline() -> None:
    route = _resolve({}, "auto", ["anthropic"])
    assert route.executor == "provider"
    assert route.reason.endswith(
        "executor provider: completion_window 24h allows provider batch at 50 %"
    )
    short = _resolve({}, "auto", ["anthropic"], window=3600.0)
    assert short.executor == "workers" and "completion_window 1h is shorter" in short.reason
    late = _resolve({}, "auto", ["anthropic"], window=3600.0, metadata={"deadline": "2d"})
    assert late.executor == "provider" and "deadline 2d allows" in late.reason


def test_cost_today_by_mode_executor_and_tenant(app_ctx: Flask, api_key: str) -> None:
    from app.dashboard import queries
    from app.models import Tenant

    tenant = tenant_of(api_key)
    name = db.session.get(Tenant, tenant).name  # type: ignore[union-attr]
    before = queries.cost_today(top=10_000)
    costs.record([(new_id("job_"), tenant, "batch", "provider", 0.5),
                  (new_id("job_"), tenant, "stream", None, 0.25),
                  (new_id("job_"), tenant, "batch", "workers", 0.0)])  # fmt: skip
    after = queries.cost_today(top=10_000)
    assert after["today_usd"] == pytest.approx(before["today_usd"] + 0.75)
    assert after["by_mode"]["batch"] == pytest.approx(before["by_mode"]["batch"] + 0.5)
    assert after["by_mode"]["stream"] == pytest.approx(before["by_mode"]["stream"] + 0.25)
    assert after["by_executor"]["provider"] == pytest.approx(
        before["by_executor"]["provider"] + 0.5
    )
    assert after["by_executor"]["workers"] == pytest.approx(before["by_executor"]["workers"] + 0.25)
    assert after["all_time_by_executor"]["provider"] == pytest.approx(
        before["all_time_by_executor"].get("provider", 0.0) + 0.5
    )
    assert {t["tenant"]: t["usd"] for t in after["by_tenant"]}[name] == pytest.approx(0.75)
    assert after["tenants"] == before["tenants"] + 1


def _redis_down(*args: object, **kwargs: object) -> None:
    raise redis.ConnectionError("Redis is down")


def _job(job_id: str) -> Job:
    db.session.expire_all()
    job = db.session.get(Job, job_id)
    assert job is not None
    return job


def test_spend_settled_during_a_redis_outage_is_recorded_once_after_it(
    app_ctx: Flask, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant = tenant_of(api_key)
    job = insert_job(tenant, "stream", "succeeded")
    usd = job_cost(job.model, job.usage, None, app_ctx.config)
    assert usd > 0
    with monkeypatch.context() as down:
        down.setattr(redis.client.Pipeline, "execute", _redis_down)
        down.setattr(redis.Redis, "execute_command", _redis_down)
        costs.settle()
    assert _job(job.id).cost_usd is None  # left to be settled again, not lost
    assert costs.spent_today(tenant) == 0.0
    costs.settle()
    assert _job(job.id).cost_usd == pytest.approx(usd)
    assert costs.spent_today(tenant) == pytest.approx(usd)
    costs.settle()  # priced: never again
    assert costs.spent_today(tenant) == pytest.approx(usd)


def _provider_job(app: Flask, tenant: str) -> tuple[SimpleNamespace, Job, Completion, float]:
    """A queued provider-executor job, the provider's answer for it and what it costs."""
    pb = SimpleNamespace(id=new_id("pbatch_"), provider="mock", remote_id="mock_1",
                         model="mock/demo", batch_id=None, submitted_at=None)  # fmt: skip
    job = insert_job(tenant, "batch", "queued", executor="provider", provider_batch_id=pb.id)
    answer = Completion.of_text("hi", "stop", Usage(prompt_tokens=1000, completion_tokens=500))
    return pb, job, answer, job_cost(pb.model, answer.usage.as_dict(), "provider", app.config)


def test_provider_results_written_during_a_redis_outage_are_settled_later(
    app_ctx: Flask, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider executor's results are kept; their cost goes to the sweeper's settle."""
    tenant = tenant_of(api_key)
    pb, job, answer, usd = _provider_job(app_ctx, tenant)
    assert usd > 0
    with monkeypatch.context() as down:
        down.setattr(redis.client.Pipeline, "execute", _redis_down)
        down.setattr(redis.Redis, "execute_command", _redis_down)
        assert rows.write(pb, [(job.id, Outcome("succeeded", answer))]) == 1
    written = _job(job.id)
    assert written.status == "succeeded" and written.output == "hi"  # the result is kept
    assert written.cost_usd is None and costs.spent_today(tenant) == 0.0
    costs.settle()
    assert _job(job.id).cost_usd == pytest.approx(usd)  # the batch price, as the writer's
    assert costs.spent_today(tenant) == pytest.approx(usd)
    costs.settle()
    assert costs.spent_today(tenant) == pytest.approx(usd)


def _charge_then(monkeypatch: pytest.MonkeyPatch, race: object) -> None:
    """The first charge runs `race` right after it, before its writer prices the rows: a
    second writer that read the same unpriced rows meanwhile (another sweeper, a redelivered
    task)."""
    real = costs.record
    raced: list[bool] = []

    def record(entries: object) -> None:
        real(entries)  # type: ignore[arg-type]
        if not raced:
            raced.append(True)
            race()  # type: ignore[operator]

    monkeypatch.setattr(costs, "record", record)


def test_two_settles_of_one_job_charge_it_once(
    app_ctx: Flask, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant = tenant_of(api_key)
    job = insert_job(tenant, "stream", "succeeded")
    usd = job_cost(job.model, job.usage, None, app_ctx.config)
    _charge_then(monkeypatch, costs.settle)
    costs.settle()
    assert _job(job.id).cost_usd == pytest.approx(usd)
    assert costs.spent_today(tenant) == pytest.approx(usd)


def test_a_charge_whose_answer_was_lost_is_not_added_again_by_the_next_settle(
    app_ctx: Flask, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis ran the charge but its answer never came back: the job is left unpriced, and
    the next settle prices it without adding it again."""
    tenant = tenant_of(api_key)
    job = insert_job(tenant, "stream", "succeeded")
    usd = job_cost(job.model, job.usage, None, app_ctx.config)

    def lost() -> None:
        raise redis.ConnectionError("connection lost")

    with monkeypatch.context() as cut:
        _charge_then(cut, lost)
        costs.settle()
    assert _job(job.id).cost_usd is None and costs.spent_today(tenant) == pytest.approx(usd)
    costs.settle()
    assert _job(job.id).cost_usd == pytest.approx(usd)
    assert costs.spent_today(tenant) == pytest.approx(usd)


def test_two_writers_of_one_provider_result_charge_it_once(
    app_ctx: Flask, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant = tenant_of(api_key)
    pb, job, answer, usd = _provider_job(app_ctx, tenant)
    outcomes = [(job.id, Outcome("succeeded", answer))]
    _charge_then(monkeypatch, lambda: rows.write(pb, outcomes))  # a second poller
    rows.write(pb, outcomes)
    assert _job(job.id).cost_usd == pytest.approx(usd)
    assert costs.spent_today(tenant) == pytest.approx(usd)
