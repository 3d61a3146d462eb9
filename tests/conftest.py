"""Shared fixtures: a fake-engine app for fast unit tests, a real vLLM server for integration."""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from loopchat.local_server import ServerProcess, free_port, loopchat_serve_command
from loopchat.settings import Settings
from serving.app import create_app
from tests.utils.db import postgres_schema_url, skip_or_fail_without_postgres
from tests.utils.fake_engine import FakeEngine
from tests.utils.model import data_dir, embedded_model_path

REPO = Path(__file__).resolve().parents[1]
# Every engine the suite starts (in process or as a server) runs in float32 and eager: greedy
# output comparable with transformers' float32, the same on every CPU, and no compilation at
# each start. The hardware defaults (bf16 where native, compiled) are the benchmark's to measure.
os.environ.setdefault("LOOPCHAT_ENGINE__DTYPE", "float32")
os.environ.setdefault("LOOPCHAT_ENGINE__ENFORCE_EAGER", "true")
ADMIN_TOKEN = "test-admin-token-" + "x" * 16


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # The fake engine's adapters hold no weights to merge: versions stay adapters over the base.
    return Settings(
        data_dir=tmp_path,
        admin_token=ADMIN_TOKEN,
        base_model=tmp_path / "fake-base",
        engine={"merge_active": False},
    )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each database test runs twice: on SQLite (WAL, in tmp_path) and on the local PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'loopchat.db'}"
        return
    skip_or_fail_without_postgres()
    url, drop = postgres_schema_url()
    try:
        yield url
    finally:
        drop()


@pytest.fixture
def db_settings(settings: Settings, database_url: str) -> Settings:
    return settings.model_copy(update={"database_url": database_url})


@pytest.fixture
def db_client(db_settings: Settings, fake_engine: FakeEngine) -> Iterator[TestClient]:
    """The fake-engine app on each database (SQLite and PostgreSQL)."""
    app = create_app(db_settings, engine=fake_engine, exit_on_engine_failure=False)
    with TestClient(app) as test_client:
        wait_ready(test_client)
        yield test_client


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


def wait_ready(client: TestClient, timeout: float = 30.0) -> None:
    # The fake engine builds vLLM's config and renderer for the embedded model (seconds, once).
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError("app did not become ready")
        time.sleep(0.01)


@pytest.fixture
def client(settings: Settings, fake_engine: FakeEngine) -> Iterator[TestClient]:
    app = create_app(settings, engine=fake_engine, exit_on_engine_failure=False)
    with TestClient(app) as test_client:
        wait_ready(test_client)
        yield test_client


@pytest.fixture
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


# --- the real engine -------------------------------------------------------------------------


@pytest.fixture
def engine(database_url: str):
    """A migrated engine on each database of `database_url` (SQLite and PostgreSQL)."""
    from feedback.db import make_engine, migrate

    migrate(database_url)
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def base_model_path() -> Path:
    """The embedded model, converted once (`make test` has normally done it already)."""
    return embedded_model_path()


class LiveServer:
    """A `loopchat serve` subprocess the tests talk to (see `start_server`)."""

    def __init__(self, url: str, admin_token: str, server: ServerProcess, database_url: str) -> None:
        self.url = url
        self.admin_token = admin_token
        self.server = server
        self.process = server.process
        self.log = server.log_path
        self.database_url = database_url

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM (SIGKILL to its process group after `timeout`); its exit status."""
        return self.server.stop(timeout)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics/", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)


def start_server(workdir: Path, base_model: Path, *args: str, **settings: str) -> LiveServer:
    """`loopchat serve` on the embedded model in its own session (its engine processes too),
    with its own SQLite database; `args` are extra `serve` options, `settings` extra environment
    variables (LOOPCHAT_*)."""
    port = free_port()
    token = secrets.token_urlsafe(24)
    log = workdir / "server.log"
    database_url = f"sqlite:///{workdir / 'loopchat.db'}"
    env = {
        **os.environ,
        "LOOPCHAT_DATA_DIR": str(data_dir()),
        "LOOPCHAT_BASE_MODEL": str(base_model),
        "LOOPCHAT_ADMIN_TOKEN": token,
        "LOOPCHAT_ENGINE__MAX_MODEL_LEN": "2048",
        "LOOPCHAT_ENGINE__MAX_LORA_RANK": "16",
        "LOOPCHAT_DATABASE_URL": database_url,
        **settings,
    }
    process = ServerProcess(
        loopchat_serve_command(sys.executable, port, *args), log_path=log, env=env, cwd=REPO, name="loopchat"
    ).start()
    server = LiveServer(f"http://127.0.0.1:{port}", token, process, database_url)
    try:
        process.wait_ready(f"{server.url}/readyz", timeout=400)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def live_server(base_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """`loopchat serve` on the embedded model, started once per test session (it takes ~40 s)."""
    # Retraining runs and A/B decisions reach /metrics within 2 s (tests/test_loop.py).
    server = start_server(
        tmp_path_factory.mktemp("live-server"), base_model_path, LOOPCHAT_MONITORING__DATABASE_REFRESH_S="2"
    )
    try:
        yield server
    finally:
        server.stop()
