"""The OpenAPI document says what the service answers: our error body on every error status,
the keys as security schemes, binary images, zips and CSV, the headers clients rely on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from imgsvc.app import create_app
from imgsvc.config import Settings
from imgsvc.routes.errors import STATUS

METERED = ("/v1/remove-background", "/v1/upscale", "/v1/inpaint")
ERROR_REF = "#/components/schemas/ErrorBody"


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("openapi")
    settings = Settings(database_url=f"sqlite:///{tmp / 'db'}", weights_dir=Path(tmp / "w"))
    spec: dict[str, Any] = create_app(settings).openapi()
    return spec


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, item in document["paths"].items()
        for method, op in item.items()
    ]


def json_schema(response: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = response["content"]["application/json"]["schema"]
    return schema


def test_fastapi_validation_error_is_gone(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    assert "ValidationError" not in schemas
    detail = schemas["ErrorDetail"]
    assert set(detail["required"]) == {"code", "message", "request_id"}
    assert schemas["ErrorBody"]["required"] == ["error"]


def test_every_error_has_the_error_body_and_a_request_id(document: dict[str, Any]) -> None:
    for method, path, op in operations(document):
        for status, response in op["responses"].items():
            if int(status) < 400:
                continue
            where = f"{method} {path} {status}"
            assert response["headers"]["X-Request-Id"]["required"] is True, where
            ref = json_schema(response).get("$ref")
            if path == "/v1.0/removebg":
                assert ref == "#/components/schemas/RemoveBgErrors", where
            elif path == "/readyz" and status == "503":
                assert ref == "#/components/schemas/ReadyStatus", where
            else:
                assert ref == ERROR_REF, where


def test_a_key_is_a_security_scheme_and_401(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearerKey"] == {**schemes["bearerKey"], "type": "http", "scheme": "bearer"}
    assert schemes["apiKeyHeader"]["name"] == "X-API-Key"
    keyed = [(m, p, op) for m, p, op in operations(document) if "security" in op]
    assert len(keyed) > 20
    for method, path, op in keyed:
        where = f"{method} {path}"
        assert "401" in op["responses"], where
        assert "503" in op["responses"], where  # the database being down
        names = {p["name"].lower() for p in op.get("parameters", []) if p["in"] == "header"}
        assert not names & {"authorization", "x-api-key"}, where
        if path.startswith("/v1/admin/"):
            assert op["security"] == [{"adminToken": []}], where
            assert "404" in op["responses"], where  # the admin API disabled
        else:
            assert op["security"] == [{"bearerKey": []}, {"apiKeyHeader": []}], where
    for path in ("/healthz", "/readyz", "/v1/models"):
        assert "security" not in document["paths"][path]["get"]


@pytest.mark.parametrize("path", METERED)
def test_a_metered_call_documents_its_answers(document: dict[str, Any], path: str) -> None:
    op = document["paths"][path]["post"]
    responses = op["responses"]
    expected = {"400", "401", "402", "403", "409", "413", "415", "422", "429", "503", "507"}
    assert expected <= set(responses)
    content = responses["200"]["content"]
    for media_type in ("image/png", "image/jpeg", "image/webp"):
        assert content[media_type]["schema"] == {"type": "string", "format": "binary"}
    assert json_schema(responses["200"]) == {"$ref": "#/components/schemas/DryRunQuote"}
    headers = responses["200"]["headers"]
    for name in ("X-Credits-Charged", "X-Credits-Remaining", "X-Model", "X-Width"):
        assert headers[name]["required"] is False  # absent from a dry run's quote
    assert headers["RateLimit"]["required"] is True
    assert json_schema(responses["202"]) == {"$ref": "#/components/schemas/JobView"}
    assert responses["202"]["headers"]["Location"]["required"] is True
    assert responses["429"]["headers"]["Retry-After"]["required"] is True
    assert responses["402"]["headers"]["X-Credits-Required"]["required"] is True
    assert "multipart/form-data" in op["requestBody"]["content"]


def test_removebg_answers_json_or_its_image(document: dict[str, Any]) -> None:
    responses = document["paths"]["/v1.0/removebg"]["post"]["responses"]
    any_of = json_schema(responses["200"])["anyOf"]
    assert {"$ref": "#/components/schemas/RemoveBgResult"} in any_of
    assert "202" not in responses  # no Prefer: respond-async there
    assert responses["200"]["content"]["application/zip"]["schema"]["format"] == "binary"


def test_csv_and_zip_bodies(document: dict[str, Any]) -> None:
    paths = document["paths"]
    for path in ("/v1/usage", "/v1/statements/{month}", "/v1/admin/usage"):
        assert paths[path]["get"]["responses"]["200"]["content"]["text/csv"] == {
            "schema": {"type": "string"}
        }
    result = paths["/v1/jobs/{job_id}/result"]["get"]["responses"]
    assert result["200"]["content"]["application/zip"]["schema"]["format"] == "binary"
    assert {"404", "409"} <= set(result)


def test_jobs_document_their_bodies(document: dict[str, Any]) -> None:
    submit = document["paths"]["/v1/jobs"]["post"]
    body = submit["requestBody"]["content"]
    form = body["multipart/form-data"]["schema"]
    assert form["required"] == ["operation"]
    assert form["properties"]["files"]["items"]["format"] == "binary"
    assert body["application/json"]["schema"]["required"] == ["operation", "urls"]
    assert json_schema(submit["responses"]["202"]) == {"$ref": "#/components/schemas/JobView"}
    assert json_schema(submit["responses"]["200"]) == {"$ref": "#/components/schemas/JobQuote"}
    assert {"402", "409", "413", "415", "507"} <= set(submit["responses"])
    job = document["paths"]["/v1/jobs/{job_id}"]
    assert json_schema(job["get"]["responses"]["200"])["$ref"] == "#/components/schemas/JobView"
    assert "404" in job["delete"]["responses"]


def test_no_error_status_without_a_reason(document: dict[str, Any]) -> None:
    """422 only where something can be invalid; no body statuses on a route without a body."""
    account = document["paths"]["/v1/account"]["get"]["responses"]
    assert set(account) == {"200", "401", "431", "503"}
    assert set(document["paths"]["/healthz"]["get"]["responses"]) == {"200", "431"}


def test_every_status_of_a_domain_error_is_documented(document: dict[str, Any]) -> None:
    """Each status a domain error maps to (but 499: nobody reads it, 500: a bug) appears."""
    documented = {int(s) for _, _, op in operations(document) for s in op["responses"]}
    mapped = set(STATUS.values()) - {499, 500}
    assert mapped <= documented
