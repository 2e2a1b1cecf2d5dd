"""The API description against the real API: the dispatcher serves the committed
docs/openapi.json, every answer the client reads validates against the schema the document
gives for it, and the fields the client's code reads are ones the document defines."""

from __future__ import annotations

import json
from typing import Any, Dict

import httpx
import jsonschema
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from conftest import REPO

DOC_PATH = REPO / "docs" / "openapi.json"


@pytest.fixture(scope="module")
def doc() -> Dict[str, Any]:
    return json.loads(DOC_PATH.read_text())


def check(doc: Dict[str, Any], schema: str, value: Any) -> None:
    """Validates `value` against `#/components/schemas/<schema>` (OpenAPI 3.1 schemas are
    JSON Schema 2020-12); `$ref`s resolve inside the document."""
    resource = Resource.from_contents(doc, default_specification=DRAFT202012)
    registry = Registry().with_resource("urn:spine-openapi", resource)
    validator = jsonschema.Draft202012Validator(
        {"$ref": f"urn:spine-openapi#/components/schemas/{schema}"}, registry=registry
    )
    errors = sorted(validator.iter_errors(value), key=lambda e: list(e.path))
    assert not errors, f"{schema} does not describe {value}: {errors[0].message}"


def response_schema(doc: Dict[str, Any], path: str, method: str, status: int) -> str:
    content = doc["paths"][path][method]["responses"][str(status)]["content"]
    ref = content["application/json"]["schema"]["$ref"]
    return ref.rsplit("/", 1)[1]


def test_the_dispatcher_serves_the_committed_document(spine_url: str, doc) -> None:
    served = httpx.get(f"{spine_url}/v1/openapi.json", timeout=10)
    assert served.status_code == 200
    assert served.headers["content-type"] == "application/json"
    assert served.json() == doc
    assert doc["openapi"] == "3.1.0"


def test_real_answers_validate_against_their_schemas(spine_url: str, doc) -> None:
    with httpx.Client(base_url=spine_url, timeout=30) as http:
        # Submit without wait: 202 {id, state}.
        r = http.post("/v1/jobs", json={"capability": "text.upper", "input": "aGk="})
        assert r.status_code == 202
        check(doc, response_schema(doc, "/v1/jobs", "post", 202), r.json())
        job_id = r.json()["id"]

        # The long poll: the final job, its output inline.
        r = http.get(f"/v1/jobs/{job_id}", params={"wait": "20s"})
        assert r.status_code == 200
        job = r.json()
        assert job["state"] == "succeeded" and job["result"]["output"] == "SEk="
        check(doc, response_schema(doc, "/v1/jobs/{id}", "get", 200), job)

        # Submit and wait: 200 with the final job.
        r = http.post(
            "/v1/jobs", params={"wait": "20s"}, json={"capability": "hash.sha256", "input": ""}
        )
        assert r.status_code == 200
        check(doc, response_schema(doc, "/v1/jobs", "post", 200), r.json())

        # A batch with a refused item: both item shapes.
        r = http.post(
            "/v1/jobs:batch",
            json={"jobs": [{"capability": "text.upper"}, {"capability": "text.upper", "filter": "=="}]},
        )
        assert r.status_code == 200
        items = r.json()["jobs"]
        assert "id" in items[0] and items[1]["field"] == "filter" and items[1]["status"] == 400
        check(doc, response_schema(doc, "/v1/jobs:batch", "post", 200), r.json())

        # Errors: a bad field, an unknown capability, an unknown job.
        for resp, status in [
            (http.post("/v1/jobs", json={"capability": "text.upper", "deadline": "soon"}), 400),
            (http.post("/v1/jobs", json={"capability": "no.such.thing"}), 422),
            (http.get("/v1/jobs/j-nosuchjob"), 404),
        ]:
            assert resp.status_code == status, resp.text
            body = resp.json()
            assert body["status"] == status
            check(doc, "ErrorBody", body)

        # Listings, agents, capabilities.
        r = http.get("/v1/jobs", params={"limit": 5})
        check(doc, response_schema(doc, "/v1/jobs", "get", 200), r.json())
        assert r.json()["jobs"], "the jobs above are listed"
        r = http.get("/v1/agents", params={"capability": "text.upper"})
        check(doc, response_schema(doc, "/v1/agents", "get", 200), r.json())
        assert len(r.json()["agents"]) == 2
        r = http.get("/v1/capabilities")
        check(doc, response_schema(doc, "/v1/capabilities", "get", 200), r.json())
        names = {c["name"] for c in r.json()["capabilities"]}
        assert {"text.upper", "hash.sha256", "image.thumbnail"} <= names

        # A cancel of an ended job answers its state.
        r = http.delete(f"/v1/jobs/{job_id}")
        check(doc, response_schema(doc, "/v1/jobs/{id}", "delete", 200), r.json())
        assert r.json()["state"] == "succeeded"


def test_the_fields_the_client_reads_are_in_the_document(doc) -> None:
    """spine_client reads these fields of the API's answers (_common.py, _errors.py,
    _sync.py): each is a property of the schema it comes from."""
    schemas = doc["components"]["schemas"]
    read_by_client = {
        "Job": ["id", "state", "capability", "agent", "attempts", "percent", "result", "error"],
        "JobResult": ["output", "output_url", "output_size", "type", "meta"],
        "JobFailure": ["condition", "message", "field"],
        "ErrorBody": ["error", "message", "field", "status"],
        "Submitted": ["id", "state"],
        "Agent": ["jid", "state", "load", "in_flight", "slots", "attributes"],
        "Capability": ["name", "agents", "queued"],
        "BlobStored": ["sha256", "size"],
    }
    for schema, fields in read_by_client.items():
        props = schemas[schema]["properties"]
        missing = [f for f in fields if f not in props]
        assert not missing, f"{schema} lacks {missing}"
    states = set(schemas["JobState"]["enum"])
    assert {"succeeded", "failed", "cancelled", "timed-out"} <= states
