"""Dashboard routes: the page, its JSON endpoints, the live SSE feed, login and logout."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

from flask import (
    Blueprint,
    current_app,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.typing import ResponseReturnValue
from flask_sse import Message

from app import sse, telemetry
from app.dashboard import access, charts, queries
from app.errors import APIError, error_response
from app.extensions import db, redis_store
from app.models import job as job_model
from app.models import utcnow
from app.models.job import ACTIVE
from app.providers import providers
from app.services import capacity, sweeper
from app.streams.hub import StreamHub, current_hub

bp = Blueprint(
    "dashboard",
    __name__,
    url_prefix="/dashboard",
    template_folder="templates",
    static_folder="static",
)

OPEN_ENDPOINTS = {"dashboard.static", "dashboard.login", "dashboard.login_link"}
API_ENDPOINTS = {
    "dashboard.api_summary",
    "dashboard.api_jobs",
    "dashboard.api_batches",
    "dashboard.api_charts",
    "dashboard.stream",
}
FEED_MAX_SECONDS = 300.0  # the browser's EventSource reconnects by itself
MAX_LIMIT = 500


@bp.before_request
def _require_admin() -> ResponseReturnValue | None:
    """An admin session is required; a key in the URL neither signs in nor out."""
    if request.endpoint in OPEN_ENDPOINTS:
        return None
    if "key" in request.args:  # keys in URLs end up in proxy logs and history: never used
        rest = {k: v for k, v in request.args.items(multi=True) if k != "key"}
        target = request.path + ("?" + urlencode(rest) if rest else "")
        if access.current_admin() is not None:
            return redirect(target)  # drop the key from the address bar
        return _login_page(KEY_IN_URL, target, 400)
    if access.current_admin() is not None:
        return None
    if request.endpoint in API_ENDPOINTS or request.path.startswith("/dashboard/api/"):
        return error_response(APIError(401, "Dashboard needs an admin key.", code="unauthorized"))
    return redirect(url_for("dashboard.login", next=request.full_path.rstrip("?")))


def _safe_next(target: str | None) -> str:
    if target and target.startswith("/dashboard") and "//" not in target and "\\" not in target:
        return target
    return url_for("dashboard.index")


def _login_page(error: str | None, next_url: str | None, status: int = 200) -> ResponseReturnValue:
    return render_template("login.html", error=error, next=_safe_next(next_url)), status


KEY_IN_URL = (
    "Keys are not accepted in the address (they end up in proxy logs and history): "
    "sign in with the form, or open a one-time link from POST /dashboard/login-link."
)


@bp.route("/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    """The form (POST) or a one-time link (`?token=`); a bad one never signs anyone out."""
    if request.method == "GET":
        if "token" in request.args:
            if access.login_with_link(request.args["token"]):
                return redirect(_safe_next(request.args.get("next")))
            return _login_page("That sign-in link is used up or expired.", None, 401)
        return _login_page(None, request.args.get("next"))
    next_url = request.form.get("next")
    if access.login(request.form.get("key", "")):
        return redirect(_safe_next(next_url))
    return _login_page("That key is not a live admin key.", next_url, 401)


@bp.post("/login-link")
def login_link() -> ResponseReturnValue:
    """A sign-in link for a browser, good once for LINK_SECONDS (`Authorization: Bearer`)."""
    token = access.create_login_link(request.headers.get("Authorization", ""))
    if token is None:
        return error_response(APIError(401, "An admin API key is required.", code="unauthorized"))
    next_url = _safe_next(request.args.get("next"))
    url = url_for("dashboard.login", token=token, next=next_url)
    return jsonify(url=url, expires_in=access.LINK_SECONDS)


@bp.post("/logout")
def logout() -> ResponseReturnValue:
    access.logout()
    return redirect(url_for("dashboard.login"))


@bp.get("/")
def index() -> ResponseReturnValue:
    initial = {
        "summary": summary(),
        "jobs": queries.recent_jobs(50),
        "batches": queries.recent_batches(20),
    }
    return render_template(
        "dashboard.html",
        initial=initial,
        refresh_ms=int(current_app.config.get("DASHBOARD_REFRESH_SECONDS", 5) * 1000),
        chart_windows=list(charts.WINDOWS),
    )


def summary() -> dict[str, Any]:
    max_age = current_app.config["WORKER_HEARTBEAT_SECONDS"] * 3
    client = redis_store.client
    found = queries.workers(client, max_age)
    counts = queries.job_counts()  # in flight, plus those ended within the last hour
    ended = queries.ended_counts([h for _, h in telemetry.minutes(3600, client)])
    return {
        "generated_at": utcnow().isoformat(),
        "workers": found,
        "workers_by_mode": queries.workers_by_mode(found),
        "queues": queries.queue_depths(client),
        "jobs": {mode: by | ended.get(mode, {}) for mode, by in counts.items()},
        "batches": queries.batch_status_counts(),
        "streams_in_flight": sum(counts.get("stream", {}).get(s, 0) for s in ACTIVE),
        "oldest_queued_seconds": queries.oldest_queued_age(utcnow()),
        "sweeper": {
            "state": sweeper.state(client),
            "last_pass_at": sweeper.last_runs(client).get(sweeper.PASS),
        },
        "cost": queries.cost_today(),  # #13: spend today by mode, executor and tenant
    }


@bp.get("/api/summary")
def api_summary() -> ResponseReturnValue:
    return jsonify(summary())


def _limit(default: int) -> int:
    try:
        return max(1, min(MAX_LIMIT, int(request.args.get("limit", default))))
    except ValueError:
        return default


@bp.get("/api/capacity")
def api_capacity() -> ResponseReturnValue:
    """Each provider's capacity split by mode (the capacity card: static/capacity.js)."""
    return jsonify(data=[split.as_dict() for split in capacity.current(providers().names())])


@bp.get("/api/jobs")
def api_jobs() -> ResponseReturnValue:
    mode = request.args.get("mode") or None
    status = request.args.get("status") or None
    if mode not in (None, *job_model.MODES):
        mode = None
    if status not in (None, *job_model.STATUSES):
        status = None
    jobs = queries.recent_jobs(
        _limit(50), mode=mode, status=status, before=request.args.get("before") or None
    )
    return jsonify(data=jobs)


@bp.get("/api/batches")
def api_batches() -> ResponseReturnValue:
    return jsonify(data=queries.recent_batches(_limit(20)))


@bp.get("/api/charts")
def api_charts() -> ResponseReturnValue:
    """Every chart's series over ?window=15m|1h|24h, from the per-minute rollup."""
    return jsonify(charts.series(request.args.get("window") or charts.DEFAULT_WINDOW))


@bp.get("/stream")
def stream() -> ResponseReturnValue:
    """Relay the broadcast channel as SSE, with pings while idle; no DB session held."""
    ping = max(0.2, current_app.config["STREAM_PING_SECONDS"])
    retry = current_app.config["STREAM_RETRY_MS"]
    hub = current_hub()
    db.session.remove()
    return sse.response(_feed(hub, ping, retry))


def _feed(hub: StreamHub, ping: float, retry: int) -> Iterator[str]:
    """The process's one subscription to the broadcast channel, as this client's feed."""
    feed = hub.feed()
    try:
        yield sse.retry(retry) + sse.comment("connected")
        deadline = time.monotonic() + FEED_MAX_SECONDS
        while time.monotonic() < deadline:
            messages = feed.wait(ping)
            if not messages:
                yield sse.comment()
                continue
            yield "".join(_frame(m) for m in messages)  # a burst in one write
    finally:
        hub.unfeed(feed)


def _frame(message: str) -> str:
    try:
        return str(Message(**json.loads(message)))
    except (TypeError, ValueError):
        return ""
