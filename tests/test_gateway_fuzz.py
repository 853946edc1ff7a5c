"""Property-based fuzzing of the gateway: whatever the body, the answer is a 2xx or a 4xx, never a 5xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from tests.helpers import start_gateway, start_server


@pytest.fixture(scope="module")
def fuzz_gateway(cache_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A gateway (admin routes on) over a server whose limits keep any valid generation tiny."""
    logs = tmp_path_factory.mktemp("fuzz-logs")
    srv = start_server(
        [
            "--cache-dir",
            str(cache_root),
            "--max-steps",
            "2",
            "--max-side",
            "64",
            "--max-images",
            "2",
            "--lora-dirs",
            str(tmp_path_factory.mktemp("fuzz-loras")),
        ],
        log_path=logs / "server.log",
    )
    gateway = start_gateway(srv.target, ["--enable-lora-admin"], log_path=logs / "gateway.log")
    yield gateway
    gateway.stop()
    srv.stop()


def test_schemathesis_finds_no_server_error(fuzz_gateway: Any) -> None:
    """Every operation of /openapi.json, with bodies generated from the schema (valid and not)."""
    schema = schemathesis.openapi.from_url(f"{fuzz_gateway.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/images/generations", "/v1/models"}
    for operation in operations:

        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=fuzz_gateway.url, checks=[not_a_server_error])

        check()


# Bodies near the real ones: known keys with values of any JSON type, plus unknown keys.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=30)
    # Lone surrogates: valid as JSON escapes, invalid as Unicode (hypothesis' text() never makes them).
    | st.sampled_from(["\ud800", "a\udfff", "\udc00\ud800"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
LORA_KEYS = ["name", "lora_name", "local_path", "path", "lora_path", "scale", "lora_scale", "int_id", "id"]
TOP_KEYS = [
    "model",
    "messages",
    "prompt",
    "n",
    "size",
    "height",
    "width",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "negative_prompt",
    "num_outputs_per_prompt",
    "output_format",
    "response_format",
    "stream",
]
loras = st.dictionaries(st.sampled_from(LORA_KEYS), json_values, max_size=4)
sampling = st.dictionaries(
    st.sampled_from(["height", "width", "num_inference_steps", "guidance_scale", "seed", "num_images"]),
    st.integers(min_value=-5, max_value=200) | json_values,
    max_size=4,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "robot"])},
        optional={"content": st.text(max_size=40) | st.lists(st.fixed_dictionaries({"type": st.text(max_size=6)}))},
    ),
    max_size=3,
)
bodies = (
    st.fixed_dictionaries(
        {},
        optional={
            "messages": messages,
            "prompt": st.text(max_size=40),
            "lora": loras | json_values,
            "lora_request": loras | json_values,
            "sampling_params": sampling | json_values,
            **{key: st.integers(min_value=-3, max_value=100) | json_values for key in TOP_KEYS[3:]},
        },
    )
    | json_values
)


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/images/generations", "/v1/load_lora_adapter"])
def test_fuzzed_bodies_get_4xx_never_5xx(fuzz_gateway: Any, route: str) -> None:
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body=bodies)
    def check(body: object) -> None:
        # allow_nan: Python's JSON reader takes NaN and Infinity literals, so the gateway must refuse them.
        raw = json.dumps(body, allow_nan=True).encode()
        response = httpx.post(
            f"{fuzz_gateway.url}{route}", content=raw, headers={"Content-Type": "application/json"}, timeout=60
        )
        assert response.status_code < 500, (body, response.text)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]

    check()
    # And the gateway still serves afterwards.
    assert httpx.get(f"{fuzz_gateway.url}/health", timeout=10).status_code == 200
