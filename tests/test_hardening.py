"""What an outside attacker tried, each against the real server: files that cost memory or time to refuse,
ports in use, forged log lines, numbers that overflow, huge names, weights that only overflow, clients
evicting the admin's adapters, requests that hold the model, slow clients, and server paths shown."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from omni_grpc.bench.fixtures import write_adapter
from omni_grpc.config import EngineConfig, ServerConfig
from omni_grpc.engine import safetensors_reader
from omni_grpc.engine.types import GenerateRequest, LoraRequest, SamplingParams
from omni_grpc.errors import FailedPrecondition, InvalidArgument
from omni_grpc.service.server import serve
from omni_grpc.tiny_models.sd3 import TinySD3Spec
from omni_grpc.v1 import omni_pb2 as pb
from tests.helpers import (
    REPO,
    Server,
    listed,
    log_field,
    request_lines,
    rpc_error,
    run_together,
    start_gateway,
    start_server,
    started_engine,
    wait_for,
)

TOKEN = "hardening-admin-token"
AUTH = [("authorization", f"Bearer {TOKEN}")]
SPEC = TinySD3Spec()
SMALL = pb.SamplingParams(height=64, width=64, num_inference_steps=2, seed=1)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hardening-loras")


@pytest.fixture(scope="module")
def guarded(cache_root: Path, lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """--lora-dirs, an admin token, and room for three adapters."""
    srv = start_server(
        [
            *("--cache-dir", str(cache_root), "--lora-dirs", str(lora_dir), "--admin-token", TOKEN),
            *("--max-loaded-adapters", "3"),
        ],
        log_path=tmp_path_factory.mktemp("logs") / "hardening.log",
    )
    yield srv
    srv.stop()


def generate(server: Server, lora: pb.LoraRequest | None = None, **sampling: int) -> pb.GenerateResponse:
    params = pb.SamplingParams(**{"height": 64, "width": 64, "num_inference_steps": 2, "seed": 1, **sampling})
    return server.stub.Generate(pb.GenerateRequest(prompt="p", sampling_params=params, lora_request=lora), timeout=120)


def admin_load(server: Server, path: Path | str, **kwargs: object) -> pb.LoadAdapterResponse:
    return server.stub.LoadAdapter(pb.LoadAdapterRequest(path=str(path), **kwargs), metadata=AUTH, timeout=60)


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/self/status")


def peak_rss_growth_mib(call: Callable[[], object]) -> float:
    """Peak resident memory of this process (the in-process server's too) while `call()` runs, over before."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    call()
    return (_status_kib("VmHWM") - before) / 1024


# ---- files that cost memory or time to refuse ---------------------------------------------------------------


def sparse_peft(folder: Path, *, module: str, dtype: str, mib: int = 512) -> Path:
    """A PEFT folder whose lora_A declares `mib` MiB of `dtype` (the file is sparse: a few KB on disk)."""
    folder.mkdir(parents=True, exist_ok=True)
    itemsize = safetensors_reader.DTYPE_SIZES[dtype]
    rank, width = 8, (mib << 20) // (8 * itemsize)
    a_bytes, b_bytes = rank * width * itemsize, 32 * rank * itemsize
    header = {
        f"base_model.model.{module}.lora_A.weight": {
            "dtype": dtype,
            "shape": [rank, width],
            "data_offsets": [0, a_bytes],
        },
        f"base_model.model.{module}.lora_B.weight": {
            "dtype": dtype,
            "shape": [32, rank],
            "data_offsets": [a_bytes, a_bytes + b_bytes],
        },
    }
    raw = json.dumps(header).encode()
    weights = folder / "adapter_model.safetensors"
    with weights.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + a_bytes + b_bytes)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": rank}))
    assert weights.stat().st_blocks * 512 < 1 << 20  # really sparse
    return folder


@pytest.mark.parametrize("dtype", ["F32", "F16"])
@pytest.mark.parametrize(
    ("module", "words"),
    [
        ("transformer_blocks.0.attn.no_such_module", "does not exist"),  # a module the model lacks
        ("transformer_blocks.0.attn.to_q", "expects lora_A [8, 32]"),  # a module it has, with other shapes
    ],
)
def test_a_512_mib_file_that_does_not_fit_is_refused_before_a_byte_is_read(
    guarded: Server, lora_dir: Path, dtype: str, module: str, words: str
) -> None:
    path = sparse_peft(lora_dir / f"sparse_{dtype}_{module.rsplit('.', 1)[-1]}", module=module, dtype=dtype)
    before = _status_kib("VmRSS")
    for call in [lambda: admin_load(guarded, path)] * 4 + [lambda: generate(guarded, pb.LoraRequest(path=str(path)))]:
        growth = peak_rss_growth_mib(lambda call=call: rpc_error(call))
        assert growth < 64, f"refusing the file took {growth:.0f} MiB of memory at its peak"
    error = rpc_error(admin_load, guarded, path)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and words in error.details()
    # Nothing is kept after five refusals either.
    assert (_status_kib("VmRSS") - before) / 1024 < 64


def test_a_load_beyond_the_loading_budget_waits_for_room_or_is_refused(
    cache_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rank-16 adapters of the tiny model: 32 KiB each, so 64 KiB reserved while one loads (file + conversion).
    loras = tmp_path / "loras"
    first, second = (write_adapter(loras / name, SPEC, rank=16, seed=i) for i, name in enumerate(("first", "second")))
    big = write_adapter(loras / "big", SPEC, rank=64, seed=3)  # 128 KiB: 256 KiB to load
    srv = start_server(
        ["--cache-dir", str(cache_root), "--lora-dirs", str(loras), "--max-loading-bytes", str(100 * 1024)],
        log_path=tmp_path / "budget.log",
    )
    try:
        error = rpc_error(srv.stub.LoadAdapter, pb.LoadAdapterRequest(path=str(big)), timeout=30)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "more than this server allows loads to hold at once (102400, --max-loading-bytes)" in error.details()
        # One load inside its read holds its bytes: a second must wait for them (not fail), then load.
        reading, release = threading.Event(), threading.Event()
        real_read = safetensors_reader.SafetensorsFile.read

        def read(self: safetensors_reader.SafetensorsFile) -> dict[str, torch.Tensor]:
            if self.file.parent == first:
                reading.set()
                release.wait(60)
            return real_read(self)

        monkeypatch.setattr(safetensors_reader.SafetensorsFile, "read", read)
        with ThreadPoolExecutor(2) as pool:
            held = pool.submit(srv.stub.LoadAdapter, pb.LoadAdapterRequest(path=str(first)), timeout=60)
            assert reading.wait(30)
            waiting = pool.submit(srv.stub.LoadAdapter, pb.LoadAdapterRequest(path=str(second)), timeout=60)
            time.sleep(0.5)  # not a timing assertion: the second must still be waiting for the first's bytes
            assert not waiting.done()
            release.set()
            assert held.result().newly_loaded and waiting.result().newly_loaded
    finally:
        srv.stop()


def test_headers_that_would_cost_time_or_memory_are_refused_from_their_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omni_grpc.engine.adapter_files import AdapterReader

    def write(name: str, header: dict[str, object], data: int) -> Path:
        raw = json.dumps(header, separators=(",", ":")).encode()
        path = tmp_path / name
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data))
        return path

    def refused(path: Path) -> str:
        with pytest.raises(InvalidArgument) as info:
            AdapterReader().read(str(path))
        return info.value.message

    # 65,536 tensors in 4 MB: refused by counting its separators, before the JSON is parsed.
    many = {str(i): {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(65536)}
    monkeypatch.setattr(safetensors_reader, "parse_json", None)  # parsing it would fail this test
    assert "separators; the limit is 200000" in refused(write("many.safetensors", many, 4 * 65536))
    # Fewer separators, but more tensor entries than any adapter has: counted before the parse too.
    count = safetensors_reader.MAX_TENSORS + 1
    tensors = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(count)}
    assert f"declares {count} tensors; the limit is 8192" in refused(write("count.safetensors", tensors, 4 * count))
    monkeypatch.undo()
    # One 7 MB name, and a header over its cap.
    key = {"k" * (7 << 20): {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    assert "characters long; the limit is 512" in refused(write("key.safetensors", key, 4))
    big = {"k" * (9 << 20): {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    assert "exceeds 8388608" in refused(write("header.safetensors", big, 4))


def test_a_header_with_more_tensors_than_the_model_has_layers_for_is_refused_unparsed(
    guarded: Server, lora_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tensor cap is sized to the model (7 per layer an adapter can adapt): on the small default model a
    header of 2,000 well-formed entries (under the global 8,192) is refused before it is parsed."""
    count = 2000
    entries = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(count)}
    raw = json.dumps(entries, separators=(",", ":")).encode()
    (lora_dir / "wide.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4 * count))
    monkeypatch.setattr(safetensors_reader, "parse_json", None)  # parsing it would fail this test
    refusal = rpc_error(generate, guarded, pb.LoraRequest(path="wide.safetensors"))
    assert refusal.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"declares {count} tensors; the limit is" in refusal.details()
    assert "(7 per layer of the model an adapter can adapt, at most 8192)" in refusal.details()


# ---- ports in use ---------------------------------------------------------------------------------------------


def test_a_server_on_a_port_in_use_exits_with_a_clear_error(cache_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Another gRPC server holds the port with grpcio's defaults (SO_REUSEPORT, which used to let both run).
    other = grpc.server(ThreadPoolExecutor(1))
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    try:
        config = ServerConfig(engine=EngineConfig(cache_dir=cache_root), port=port)
        assert asyncio.run(serve(config)) == 1
        assert f"cannot listen on 127.0.0.1:{port} (is another server using the port?)" in caplog.text
    finally:
        other.stop(None)


def test_a_gateway_on_a_port_in_use_exits_non_zero(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "omni_grpc", "gateway", "--port", str(port)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode != 0 and "address already in use" in done.stderr.lower()


# ---- forged log lines -----------------------------------------------------------------------------------------

FORGED = "INFO omni_grpc.requests: generate id=999 adapter=- outcome=OK"


def forged_lines(log: str, since: int) -> list[str]:
    """Lines that begin with what an attacker wrote (a real line begins with its timestamp)."""
    return [line for line in log[since:].splitlines() if line.startswith(FORGED[:20])]


def test_client_values_cannot_forge_server_log_lines(guarded: Server, lora_dir: Path, model_dir: Path) -> None:
    since = len(guarded.log())
    name_error = rpc_error(generate, guarded, pb.LoraRequest(name="x\n" + FORGED))
    assert name_error.code() == grpc.StatusCode.INVALID_ARGUMENT
    path_error = rpc_error(generate, guarded, pb.LoraRequest(path=str(lora_dir / "missing") + "\n" + FORGED))
    assert path_error.code() == grpc.StatusCode.NOT_FOUND
    # A folder inside the allowlist whose name itself forges the "adapter loaded" line.
    folder = lora_dir / "evil\nINFO omni_grpc.engine.adapters: adapter loaded id=1 name=admin \x1b[31m"
    write_adapter(folder, SPEC, rank=2, seed=9)
    assert generate(guarded, pb.LoraRequest(path=str(folder))).images
    log = guarded.log()
    assert not forged_lines(log, since)
    assert not [line for line in log[since:].splitlines() if line.startswith("INFO omni_grpc.engine.adapters")]
    assert "\x1b" not in log[since:]
    assert "\\nINFO omni_grpc.requests: generate id=999" in log[since:] and "\\x1b[31m" in log[since:]


def test_client_values_cannot_forge_gateway_log_lines(guarded: Server, tmp_path: Path) -> None:
    gateway = start_gateway(guarded.target, [], log_path=tmp_path / "gateway.log")
    try:
        httpx.get(f"{gateway.url}/x%0aINFO omni_grpc_gateway.access: GET /admin status=200%1b[2J", timeout=30)
        # The access line is written once the answer is sent, so it may land a moment after the client has it.
        wait_for(lambda: "GET /x" in gateway.log())
        log = gateway.log()
    finally:
        gateway.stop()
    assert not [line for line in log.splitlines() if line.startswith("INFO omni_grpc_gateway.access")]
    assert "\x1b" not in log and "GET /x\\nINFO omni_grpc_gateway.access: GET /admin status=200\\x1b[2J" in log


# ---- numbers that overflow, and huge names ---------------------------------------------------------------------


def adapter_with_config(lora_dir: Path, name: str, **config: object) -> Path:
    folder = write_adapter(lora_dir / name, SPEC, rank=4, seed=4)
    current = json.loads((folder / "adapter_config.json").read_text())
    text = json.dumps({**current, **config})
    for key, literal in (("HUGE_INT", "1" + "0" * 309),):  # JSON numbers no float can hold
        text = text.replace(f'"{key}"', literal)
    (folder / "adapter_config.json").write_text(text)
    return folder


@pytest.mark.parametrize(
    ("name", "config", "words"),
    [
        ("alpha_1e40", {"lora_alpha": 1e40}, "'lora_alpha' gives module"),
        ("alpha_1e308", {"lora_alpha": 1e308}, "'lora_alpha' gives module"),
        ("alpha_310_digits", {"lora_alpha": "HUGE_INT"}, "'lora_alpha' must be a finite number"),
        ("pattern_10e309", {"alpha_pattern": {"to_q": "HUGE_INT"}}, "'alpha_pattern' 'to_q' must be a finite number"),
    ],
)
def test_alphas_that_overflow_are_invalid_argument_at_load(
    guarded: Server, lora_dir: Path, name: str, config: dict[str, object], words: str
) -> None:
    folder = adapter_with_config(lora_dir, name, **config)
    for call in (lambda: admin_load(guarded, folder), lambda: generate(guarded, pb.LoraRequest(path=str(folder)))):
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert words in error.details() and "adapter_config.json" in error.details()
    assert name not in listed(guarded)


@pytest.mark.parametrize(
    ("lora", "words"),
    [
        (pb.LoraRequest(name="a" * 65536), "is invalid: use 1-128 characters"),
        (pb.LoraRequest(path="/" + "a" * 65536), "characters long; the limit is 4096"),
        (pb.LoraRequest(path="x", name="b" * (512 << 10)), "is invalid: use 1-128 characters"),
    ],
)
def test_huge_names_and_paths_are_refused_with_short_messages(
    guarded: Server, lora: pb.LoraRequest, words: str, tmp_path: Path
) -> None:
    error = rpc_error(generate, guarded, lora)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and words in error.details()
    assert len(error.details()) < 1000
    if lora.path:
        load_error = rpc_error(admin_load, guarded, lora.path, name=lora.name)
        assert load_error.code() == grpc.StatusCode.INVALID_ARGUMENT and len(load_error.details()) < 1000
    # Through the gateway it is a 400 with a short message, not a 429 about gRPC's metadata limit.
    gateway = start_gateway(guarded.target, [], log_path=tmp_path / "gateway.log")
    try:
        body = {"messages": [{"role": "user", "content": "p"}], "lora": {"name": lora.name or None, "path": lora.path}}
        reply = gateway.post("/v1/chat/completions", {**body, "lora": {k: v for k, v in body["lora"].items() if v}})
        assert reply.status_code == 400 and len(reply.text) < 2000, reply.text[:300]
    finally:
        gateway.stop()
    assert "POST /v1/chat/completions status=400" in gateway.log()
    assert max(len(line) for line in gateway.log().splitlines()) < 1000
    assert max(len(line) for line in guarded.log().splitlines()) < 3000


# ---- weights whose values can only overflow --------------------------------------------------------------------


def with_lora_b(folder: Path, value: float, dtype: torch.dtype) -> Path:
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: (torch.full_like(v, value) if "lora_B" in k else v).to(dtype) for k, v in tensors.items()}, weights)
    return folder


def test_weights_too_large_for_the_dtype_are_refused_at_load(guarded: Server, lora_dir: Path, cache_root: Path) -> None:
    huge = with_lora_b(write_adapter(lora_dir / "b_3e38", SPEC, rank=4, seed=5), 3e38, torch.float32)
    error = rpc_error(generate, guarded, pb.LoraRequest(path=str(huge)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "the model's dtype can only overflow" in error.details()
    # In half precision the bound is 256 (sqrt of float16's largest value): 65504 is refused too.
    f16 = with_lora_b(write_adapter(lora_dir / "b_65504", SPEC, rank=4, seed=6), 65504.0, torch.float16)
    with (
        started_engine(cache_dir=cache_root, dtype="float16", allow_any_lora_path=True) as engine,
        pytest.raises(InvalidArgument, match=r"holds values up to 6.55e\+04 .* beyond 256"),
    ):
        engine.load_adapter(str(f16))


def test_non_finite_output_fails_that_request_alone(guarded: Server, lora_dir: Path, cache_root: Path) -> None:
    # 1e18 passes the load bound in float32, but the activations it makes overflow within a step.
    wild = with_lora_b(write_adapter(lora_dir / "b_1e18", SPEC, rank=4, seed=7), 1e18, torch.float32)
    error = rpc_error(generate, guarded, pb.LoraRequest(path=str(wild), scale=1.0))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "produced non-finite values for this request" in error.details() and "b_1e18#" in error.details()
    # In one batch with it, a request without an adapter is served as if alone.
    with started_engine(cache_dir=cache_root, allow_any_lora_path=True, max_batch_size=4) as engine:
        sampling = SamplingParams(height=64, width=64, num_inference_steps=2, seed=3)
        clean = GenerateRequest(prompt="clean", sampling=sampling)
        alone = engine.generate(clean).images[0].array
        engine.load_adapter(str(wild))  # loaded (and hooked) before the two meet in the queue
        doomed, mate = run_together(
            engine, [GenerateRequest("p", sampling=sampling, lora=LoraRequest(path=str(wild))), clean]
        )
        with pytest.raises(FailedPrecondition, match="non-finite"):
            doomed.result()
        result = mate.result()
        assert result.batch_size == 2
        np.testing.assert_allclose(result.images[0].array, alone, atol=1e-4, rtol=0)


# ---- clients evicting the admin's adapters ---------------------------------------------------------------------


def test_requests_cannot_evict_adapters_an_admin_loaded(guarded: Server, lora_dir: Path) -> None:
    p, q, r, s = (write_adapter(lora_dir / f"evict_{n}", SPEC, rank=2, seed=20 + i) for i, n in enumerate("pqrs"))
    admin_load(guarded, p)
    admin_load(guarded, q)  # the table holds three: two the admin's, one left for requests
    assert generate(guarded, pb.LoraRequest(path=str(r))).adapter.name == "evict_r"
    assert generate(guarded, pb.LoraRequest(path=str(s))).adapter.name == "evict_s"  # evicts r, a request's
    table = listed(guarded)
    assert {"evict_p", "evict_q", "evict_s"} <= set(table) and "evict_r" not in table
    # Only request-loaded adapters may go for a request's load; none left idle: refused, the admin's stay.
    hold = guarded.stub.Generate.future(
        pb.GenerateRequest(
            prompt="p",
            sampling_params=pb.SamplingParams(num_inference_steps=1000, height=64, width=64),
            lora_request=pb.LoraRequest(name="evict_s"),
        ),
        timeout=120,
    )
    wait_for(lambda: listed(guarded)["evict_s"].in_use == 1)
    error = rpc_error(generate, guarded, pb.LoraRequest(path=str(r)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "loaded by an admin" in error.details()
    hold.cancel()
    assert {"evict_p", "evict_q"} <= set(listed(guarded))
    for name in ("evict_p", "evict_q", "evict_s"):
        wait_for(lambda name=name: listed(guarded)[name].in_use == 0)
        guarded.stub.UnloadAdapter(pb.UnloadAdapterRequest(name=name), metadata=AUTH, timeout=30)


# ---- requests that would hold the model ------------------------------------------------------------------------


def test_a_request_of_too_much_work_is_refused_naming_the_limit(guarded: Server) -> None:
    error = rpc_error(generate, guarded, height=1536, width=1536, num_inference_steps=1000)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "2250 megapixel-steps" in error.details() and "limit is 400 (--max-request-work)" in error.details()
    # The guide's 1024x1024 at 50 steps is well inside it.
    assert generate(guarded, height=1024, width=1024, num_inference_steps=1).images


def test_a_long_request_does_not_hold_back_short_ones(guarded: Server, lora_dir: Path) -> None:
    adapter = write_adapter(lora_dir / "long_one", SPEC, rank=2, seed=40)
    since = len(guarded.log())
    long = guarded.stub.Generate.future(
        pb.GenerateRequest(
            prompt="long",
            sampling_params=pb.SamplingParams(height=64, width=64, num_inference_steps=1000),
            lora_request=pb.LoraRequest(path=str(adapter)),
        ),
        timeout=300,
    )
    wait_for(lambda: "long_one" in listed(guarded) and listed(guarded)["long_one"].in_use == 1)
    # Short requests start beside it and take turns with it step by step: each finishes while it runs.
    for seed in range(3):
        assert generate(guarded, seed=seed).images
        assert not long.done()
    long.cancel()
    wait_for(lambda: request_lines(guarded.log(), since, "adapter=long_one#"))
    (line,) = request_lines(guarded.log(), since, "adapter=long_one#")
    assert log_field(line, "outcome") == "CANCELLED" and int(log_field(line, "steps_done")) < 1000, line


# ---- slow clients, and odd requests, at the gateway ------------------------------------------------------------


def test_slow_clients_cannot_hold_the_gateways_connections(guarded: Server, tmp_path: Path) -> None:
    gateway = start_gateway(
        guarded.target, ["--request-read-timeout", "1", "--max-connections", "100"], log_path=tmp_path / "gw.log"
    )
    try:
        slow = []
        for _ in range(80):
            sock = socket.create_connection(("127.0.0.1", gateway.port))
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            slow.append(sock)
        assert httpx.get(f"{gateway.url}/health", timeout=30).status_code == 200  # others are still served
        answers = []
        for sock in slow:
            sock.settimeout(30)
            answers.append(sock.recv(4096))
            sock.close()
        assert all(answer.startswith(b"HTTP/1.1 408") and b'"code":"request_timeout"' in answer for answer in answers)
        # Beyond --max-connections a new connection is answered 503 and closed.
        held = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(100)]
        extra = socket.create_connection(("127.0.0.1", gateway.port))
        extra.settimeout(30)
        assert extra.recv(4096).startswith(b"HTTP/1.1 503")
        for sock in [*held, extra]:
            sock.close()
    finally:
        gateway.stop()


def test_every_gateway_answer_is_an_openai_error_object(guarded: Server, tmp_path: Path) -> None:
    gateway = start_gateway(guarded.target, [], log_path=tmp_path / "gw.log")
    try:
        with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: +10\r\n\r\n")
            sock.settimeout(30)
            answer = sock.recv(4096)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
        assert json.loads(body)["error"]["code"] == "invalid_http"
        slash = httpx.get(f"{gateway.url}/v1/models/", timeout=30, follow_redirects=False)
        assert slash.status_code == 404 and "without the trailing slash" in slash.json()["error"]["message"]
    finally:
        gateway.stop()


# ---- server paths ------------------------------------------------------------------------------------------------


def test_callers_without_the_token_see_no_server_paths(guarded: Server, lora_dir: Path, tmp_path: Path) -> None:
    folder = write_adapter(lora_dir / "visible", SPEC, rank=2, seed=30)
    admin_load(guarded, folder)
    anyone = {a.name: a for a in guarded.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=10).adapters}
    admins = {a.name: a for a in guarded.stub.ListAdapters(pb.ListAdaptersRequest(), metadata=AUTH).adapters}
    assert anyone["visible"].path == "" and admins["visible"].path == str(folder.resolve())
    # The model by its name, never its folder.
    info = guarded.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    assert info.model == "omni-grpc/tiny-sd3"
    by_name = generate(guarded, pb.LoraRequest(name="visible"))
    assert by_name.model == "omni-grpc/tiny-sd3" and by_name.adapter.path == ""
    # A reply names the path as the request sent it; errors too, even where the server resolved it elsewhere.
    assert generate(guarded, pb.LoraRequest(path="visible")).adapter.path == "visible"
    missing = rpc_error(generate, guarded, pb.LoraRequest(path="not/here"))
    assert missing.code() == grpc.StatusCode.NOT_FOUND and "'not/here'" in missing.details()
    assert str(lora_dir) not in missing.details()
    # However the message quotes the path: cut short, or escaped by repr (newline, quotes).
    for sent in ("a" * 195 + "/missing", "nl\nx/missing", "q'\"x/missing", "q'x/missing"):
        refused = rpc_error(generate, guarded, pb.LoraRequest(path=sent))
        assert refused.code() == grpc.StatusCode.NOT_FOUND, refused.details()
        assert lora_dir.name not in refused.details(), (sent, refused.details())
    gateway = start_gateway(guarded.target, [], log_path=tmp_path / "gw.log")
    try:
        cards = {card["id"]: card for card in gateway.get("/v1/models").json()["data"]}
        assert cards["visible"]["root"] == "" and cards["omni-grpc/tiny-sd3"]["root"] == "omni-grpc/tiny-sd3"
        admin_cards = httpx.get(f"{gateway.url}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert {card["id"]: card for card in admin_cards["data"]}["visible"]["root"] == str(folder.resolve())
    finally:
        gateway.stop()
    guarded.stub.UnloadAdapter(pb.UnloadAdapterRequest(name="visible"), metadata=AUTH, timeout=30)


def test_a_resolved_path_is_concealed_in_every_quoting() -> None:
    from omni_grpc.engine.engine import conceal_path
    from omni_grpc.quoting import shown

    real, sent = "/srv/secret-root/" + "b" * 300, "b" * 300
    for message in (f"{real}: gone", f"adapter {shown(real)} is gone", f"adapter {shown(real, limit=8)} is gone"):
        concealed = conceal_path(message, real, sent)
        assert "/srv" not in concealed and "secret" not in concealed, concealed
    assert conceal_path(f"adapter {shown('/srv/r/x')} is gone", "/srv/r/x", "x") == f"adapter {shown('x')} is gone"


def test_a_model_folder_is_served_under_its_name(model_dir: Path, tmp_path: Path) -> None:
    for flags, name in (([], model_dir.name), (["--served-model-name", "studio/sd3-tiny"], "studio/sd3-tiny")):
        srv = start_server(["--model", str(model_dir), *flags], log_path=tmp_path / f"model{len(flags)}.log")
        try:
            assert srv.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).model == name
            assert generate(srv).model == name
        finally:
            srv.stop()
