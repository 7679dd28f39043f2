"""The shape of a NeMo Gym capture record, checked without Gym (which needs Python 3.13): the keys its
`_CaptureMiddleware` writes and the types its reader (`build_model_call_record` into `ModelCallRecord`)
accepts. `make test-nemo-gym` reads the relay's records with Gym's own reader as well."""

from __future__ import annotations

from typing import Any

REQUIRED = ("model_call_id", "dialect", "model_ref", "started_at", "completed_at", "latency_ms", "latency_ttft_ms",
            "status_code", "error_category", "request", "response")  # fmt: skip
OPTIONAL = ("client_session_id", "request_raw", "response_raw", "response_raw_truncated")


def check_record(record: Any) -> dict[str, Any]:
    """`record` if it is a record Gym reads as valid; an AssertionError naming what is wrong otherwise."""
    assert isinstance(record, dict), record
    assert list(record)[: len(REQUIRED)] == list(REQUIRED), list(record)
    assert set(record) <= {*REQUIRED, *OPTIONAL}, set(record) - {*REQUIRED, *OPTIONAL}
    assert isinstance(record["model_call_id"], str) and len(record["model_call_id"]) == 32
    assert record["dialect"] in ("responses", "chat")
    ref = record["model_ref"]
    assert ref is None or (ref.get("type") == "responses_api_models" and isinstance(ref.get("name"), str)), ref
    assert isinstance(record["started_at"], float) and isinstance(record["completed_at"], float)
    assert record["started_at"] <= record["completed_at"]
    assert isinstance(record["latency_ms"], float) and record["latency_ms"] >= 0
    assert record["latency_ttft_ms"] is None or isinstance(record["latency_ttft_ms"], float)
    assert record["status_code"] is None or type(record["status_code"]) is int
    assert record["error_category"] is None or isinstance(record["error_category"], str)
    for key in ("request", "response"):
        assert record[key] is None or isinstance(record[key], dict), key
    for key in ("client_session_id", "request_raw", "response_raw"):
        assert key not in record or isinstance(record[key], str), key
    return record
