"""A bounded schemathesis run against the app: requests generated from the OpenAPI spec
(fixed seed, a bounded number of examples per operation), each authenticated as the
route expects, and not one 5xx among the replies."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings

# A bounded run for every CI build; FITNAS_SCHEMATHESIS_EXAMPLES=200 for a longer one.
EXAMPLES_PER_OPERATION = int(os.environ.get("FITNAS_SCHEMATHESIS_EXAMPLES", "12"))


@pytest.fixture
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture
def auth(user_key, make_worker_token):
    _, user = user_key
    _, worker = make_worker_token()
    return {"user": user, "worker": worker}


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
          database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_no_5xx(case, auth):
    worker_route = case.path.startswith("/v1/tasks") or case.path.startswith(
        "/v1/workers/register") or case.path.endswith("/heartbeat")
    headers = dict(case.headers or {})
    headers.update(auth["worker"] if worker_route else auth["user"])
    response = case.call(headers=headers)
    assert response.status_code < 500, (case.method, case.path, response.status_code,
                                        response.text[:300])
