"""The API's own documentation works without a network: /docs and /redoc load their
assets from this server, and the OpenAPI document declares the bearer scheme that
"Authorize" and "Try it out" use."""

from __future__ import annotations

import re

EXTERNAL = re.compile(r"""(?:src|href|url)\s*[=(]\s*["']?\s*(?:https?:)?//""", re.I)


def _assets(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)


def test_docs_and_redoc_reference_no_external_host(client):
    for page in ("/docs", "/redoc"):
        r = client.get(page)
        assert r.status_code == 200
        assert not EXTERNAL.search(r.text), (page, EXTERNAL.search(r.text))
        assets = _assets(r.text) + re.findall(r"""url:\s*['"]([^'"]+)['"]""", r.text)
        scripts = [a for a in assets if a.endswith((".js", ".css"))]
        assert scripts, page
        for asset in scripts:
            assert asset.startswith("/"), asset
            got = client.get(asset)
            assert got.status_code == 200 and len(got.content) > 10_000, asset


def test_openapi_declares_bearer_auth_and_error_responses(client):
    doc = client.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearer"]["description"]}
    create = doc["paths"]["/v1/jobs"]["post"]
    assert create["security"] == [{"bearer": []}]
    assert {"401", "403", "409", "413", "422"} <= set(create["responses"])
    result = doc["paths"]["/v1/tasks/{task_id}/result"]["post"]
    assert {"401", "403", "404", "409", "413", "422"} <= set(result["responses"])
    assert "security" not in doc["paths"]["/healthz"]["get"]
    assert "create-worker-token" in doc["components"]["schemas"]["JobCreate"]["description"]
