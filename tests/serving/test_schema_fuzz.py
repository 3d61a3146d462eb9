"""schemathesis against the service's own OpenAPI schema: for every operation, generated valid
and invalid inputs get no 5xx and answers that match the schema (status, content type, body).

The service runs for real (uvicorn on a port, SQLite, the log writer, the registry) on the fake
engine, in development mode, with the admin routes on and the admin token sent, so the fuzzer
reaches every route."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from loopchat.settings import Settings
from serving.app import create_app
from tests.conftest import ADMIN_TOKEN
from tests.utils.fake_engine import FakeEngine
from tests.utils.processes import serve_in_thread


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.BaseSchema]:
    folder: Path = tmp_path_factory.mktemp("fuzz")
    app = create_app(
        Settings(data_dir=folder, admin_token=ADMIN_TOKEN, base_model=folder / "fake-base"),
        engine=FakeEngine(max_model_len=256),
        exit_on_engine_failure=False,
    )
    with serve_in_thread(app, "fuzz-server") as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


def fuzz(operation, headers: dict[str, str]):
    """A Hypothesis test of one operation: generated cases, each sent and its answer checked."""

    @given(case=operation.as_strategy())
    @settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        # Schema-valid input may still be refused (400) on rules a JSON schema cannot state:
        # the context length, at least one rating field, an adapter folder that exists.
        case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance])

    return check


def test_no_server_error_and_no_schema_violation(api_schema) -> None:
    failures: dict[str, str] = {}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    for operation in operations:
        # The admin token on admin routes; /v1 routes run without a key (development mode).
        admin = operation.path.startswith("/admin")
        try:
            fuzz(operation, {"Authorization": f"Bearer {ADMIN_TOKEN}"} if admin else {})()
        except (Exception, BaseExceptionGroup) as exc:  # all operations run; failures reported together
            failures[operation.label] = f"{type(exc).__name__}: {exc}"[:3000]
    assert len(operations) >= 20
    assert not failures, "\n\n".join(f"{label}\n{error}" for label, error in failures.items())
