"""The adapter table through the real server: ids, names, errors, concurrency, unload and eviction."""

from __future__ import annotations

import os
import shutil
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from safetensors import safe_open

from omni_grpc.engine.adapter_files import AdapterReader
from omni_grpc.engine.adapters import derive_adapter_id
from omni_grpc.errors import InvalidArgument
from omni_grpc.v1 import omni_pb2 as pb
from tests.helpers import (
    PROMPT,
    Server,
    listed,
    load,
    log_field,
    request_lines,
    rpc_error,
    start_server,
    unload,
    wait_for,
)
from tests.lora_factory import edit_config, make_peft_adapter, rewrite_tensors


@pytest.fixture
def fresh(model_dir: Path, adapter_root: Path, request: pytest.FixtureRequest) -> Path:
    """A new adapter folder per test, named after the test."""
    test = request.node.name
    name = f"{test.replace('[', '_').replace(']', '')[:40]}-{zlib.crc32(test.encode()):08x}"
    return make_peft_adapter(model_dir, adapter_root / name, rank=2, alpha=4, seed=zlib.crc32(test.encode()) % 1000)


def test_relative_trailing_slash_and_absolute_paths_are_one_adapter(server: Server, fresh: Path) -> None:
    # Relative paths resolve against the --lora-dirs roots in turn; the first is the adapter root (see conftest).
    rel = fresh.name
    first = load(server, f"./{rel}")
    second = load(server, f"{rel}/")
    third = load(server, fresh.resolve())
    assert first.newly_loaded and not second.newly_loaded and not third.newly_loaded
    assert first.adapter.id == second.adapter.id == third.adapter.id == derive_adapter_id(str(fresh))
    assert first.adapter.path == str(fresh.resolve())
    unload(server, id=first.adapter.id)


def test_derived_id_is_63_bits_and_stable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = {derive_adapter_id(str(tmp_path / f"a{i}")) for i in range(200)}
    assert len(ids) == 200 and all(0 < i < 2**63 for i in ids)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    assert derive_adapter_id("./a") == derive_adapter_id("a/") == derive_adapter_id(str(tmp_path / "a"))
    os.symlink(tmp_path / "a", tmp_path / "link")
    assert derive_adapter_id("link") == derive_adapter_id("a")


def test_client_id_and_name_conflicts(server: Server, fresh: Path, model_dir: Path, adapter_root: Path) -> None:
    other = make_peft_adapter(model_dir, adapter_root / f"{fresh.name}-other", rank=2, alpha=2, seed=5)
    mine = load(server, fresh, id=424242, name=f"n-{fresh.name}"[:100]).adapter
    assert mine.id == 424242
    # The same id bound to another path.
    error = rpc_error(load, server, other, id=424242)
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    # Named by its name: where another adapter lives is not the client's to learn.
    assert "424242" in error.details() and mine.name in error.details() and str(fresh) not in error.details()
    # The same name bound to another path.
    error = rpc_error(load, server, other, name=mine.name)
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS and mine.name in error.details()
    assert "is already bound to the adapter with id 424242" in error.details()
    # The same path asked for under another id: an id never changes.
    error = rpc_error(load, server, fresh, id=99)
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS and "424242" in error.details()
    # A request's id and name are labels for a first load: taken ones do not fail it. It is served under the
    # path's derived id and a default name, and the reply names the adapter as registered.
    small = pb.SamplingParams(height=32, width=32, num_inference_steps=2, seed=1)
    request = pb.GenerateRequest(
        prompt=PROMPT, sampling_params=small, lora_request=pb.LoraRequest(path=str(other), id=424242, name=mine.name)
    )
    reply = server.stub.Generate(request, timeout=60)
    assert reply.adapter.id == derive_adapter_id(str(other)) and reply.adapter.name == other.name
    assert listed(server)[mine.name].id == 424242 and listed(server)[other.name].id == reply.adapter.id
    # An admin's load of a loaded adapter under a taken name: the rename is refused the same way.
    error = rpc_error(load, server, other, name=mine.name)
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert f"adapter name '{mine.name}' is already bound to the adapter with id 424242" in error.details()
    assert listed(server)[other.name].id == reply.adapter.id
    unload(server, name=mine.name)
    unload(server, name=other.name)


def test_unknown_name_and_id(server: Server) -> None:
    for lora in (pb.LoraRequest(name="nope"), pb.LoraRequest(id=12345)):
        error = rpc_error(server.stub.Generate, pb.GenerateRequest(prompt=PROMPT, lora_request=lora), timeout=30)
        assert error.code() == grpc.StatusCode.NOT_FOUND and "is loaded" in error.details()
    error = rpc_error(server.stub.Generate, pb.GenerateRequest(prompt=PROMPT, lora_request=pb.LoraRequest()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error(unload, server, name="nope").code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error(unload, server).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_missing_path_is_not_found(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "does-not-exist"
    for call in (
        lambda: load(server, path),
        lambda: server.stub.Generate(
            pb.GenerateRequest(prompt=PROMPT, lora_request=pb.LoraRequest(path=str(path))), timeout=30
        ),
    ):
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert str(path) in error.details() and "server machine" in error.details()


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_missing_file_is_invalid_argument(server: Server, fresh: Path, missing: str) -> None:
    (fresh / missing).unlink()
    error = rpc_error(load, server, fresh)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and f"is missing {missing};" in error.details()


def test_pickle_is_refused(server: Server, fresh: Path, tmp_path: Path) -> None:
    weights = fresh / "adapter_model.safetensors"
    torch.save({"x": torch.zeros(1)}, fresh / "adapter_model.bin")
    weights.unlink()
    error = rpc_error(load, server, fresh)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "pickle" in error.details()
    lone = tmp_path / "lora.bin"
    torch.save({"x": torch.zeros(1)}, lone)
    error = rpc_error(load, server, lone)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "pickle" in error.details()


def test_unknown_module_is_failed_precondition(server: Server, fresh: Path) -> None:
    def rename(tensors: dict) -> dict:
        return {
            k.replace("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_zz"): v
            for k, v in tensors.items()
        }

    rewrite_tensors(fresh / "adapter_model.safetensors", rename)
    error = rpc_error(load, server, fresh)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "transformer_blocks.0.attn.to_zz" in error.details() and "does not exist" in error.details()


def test_of_several_modules_that_do_not_fit_the_refusal_names_the_first_by_name(server: Server, fresh: Path) -> None:
    """The fit is judged in the file's order and, on a refusal, again in name order: the message is the same
    whatever the order. Key order and name order differ here ('-' sorts before '.')."""

    attn = "transformer_blocks.0.attn."
    names = {f"{attn}to_q": f"{attn}no", f"{attn}to_k": f"{attn}no-k"}  # both missing from the model

    def rename(tensors: dict) -> dict:
        renamed = {}
        for key, value in tensors.items():
            module = key.removeprefix("base_model.model.").rsplit(".", 2)[0]
            renamed[key.replace(module, names.get(module, module))] = value
        return renamed

    rewrite_tensors(fresh / "adapter_model.safetensors", rename)
    keys = sorted(safe_open(str(fresh / "adapter_model.safetensors"), "pt").keys())
    assert keys.index(f"base_model.model.{attn}no-k.lora_A.weight") < keys.index(
        f"base_model.model.{attn}no.lora_A.weight"
    )
    error = rpc_error(load, server, fresh)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"module '{attn}no' does not exist" in error.details()


def test_wrong_shape_is_failed_precondition(server: Server, fresh: Path) -> None:
    def widen(tensors: dict) -> dict:
        key = "base_model.model.transformer_blocks.1.attn.to_k.lora_A.weight"
        tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)
        return tensors

    rewrite_tensors(fresh / "adapter_model.safetensors", widen)
    error = rpc_error(load, server, fresh)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "transformer_blocks.1.attn.to_k" in error.details() and "[2, 35]" in error.details()


def test_adapter_for_another_model_adapts_nothing(server: Server, fresh: Path) -> None:
    """Keys in another model's naming match no module: an error, never a silent no-op."""

    def foreign(tensors: dict) -> dict:
        return {k.replace("transformer_blocks", "down_blocks"): v for k, v in tensors.items()}

    rewrite_tensors(fresh / "adapter_model.safetensors", foreign)
    error = rpc_error(load, server, fresh)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "down_blocks" in error.details()
    assert not any(a.path == str(fresh.resolve()) for a in listed(server).values())


def test_unsupported_peft_feature_is_refused(server: Server, fresh: Path) -> None:
    edit_config(fresh, use_dora=True)
    error = rpc_error(load, server, fresh)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "use_dora" in error.details()


def test_concurrent_loads_of_one_adapter_read_it_once(server: Server, fresh: Path) -> None:
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: load(server, fresh), range(8)))
    assert len({r.adapter.id for r in responses}) == 1
    assert sum(r.newly_loaded for r in responses) == 1
    assert listed(server)[fresh.name].loads == 1
    unload(server, name=fresh.name)


def test_unload_removes_it_and_a_reload_reads_again(server: Server, fresh: Path) -> None:
    load(server, fresh)
    gone = unload(server, path=str(fresh)).adapter
    assert gone.name == fresh.name and fresh.name not in listed(server)
    request = pb.GenerateRequest(prompt=PROMPT, lora_request=pb.LoraRequest(name=fresh.name))
    assert rpc_error(server.stub.Generate, request, timeout=30).code() == grpc.StatusCode.NOT_FOUND
    again = load(server, fresh)
    assert again.newly_loaded and again.adapter.loads == 2
    unload(server, name=fresh.name)


def _long_generate(server: Server, lora: pb.LoraRequest, steps: int, timeout: float = 300):
    request = pb.GenerateRequest(
        prompt=PROMPT, lora_request=lora, sampling_params=pb.SamplingParams(num_inference_steps=steps, seed=5)
    )
    return server.stub.Generate.future(request, timeout=timeout)


def test_unload_during_generate_never_breaks_it(server: Server, fresh: Path) -> None:
    lora = pb.LoraRequest(path=str(fresh))
    request = pb.GenerateRequest(
        prompt=PROMPT, lora_request=lora, sampling_params=pb.SamplingParams(num_inference_steps=40, seed=5)
    )
    expected = server.stub.Generate(request, timeout=120).images[0].data
    future = server.stub.Generate.future(request, timeout=120)
    wait_for(lambda: listed(server)[fresh.name].in_use == 1)
    info = unload(server, name=fresh.name).adapter
    assert info.in_use == 1
    assert fresh.name not in listed(server)
    assert future.result().images[0].data == expected
    assert fresh.name not in listed(server)


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_cancel_and_deadline_stop_the_work_and_release_the_adapter(server: Server, fresh: Path, how: str) -> None:
    load(server, fresh)
    lora = pb.LoraRequest(name=fresh.name)
    since = len(server.log())
    future = _long_generate(server, lora, steps=1000, timeout=2.0 if how == "deadline" else 300)
    wait_for(lambda: listed(server)[fresh.name].in_use == 1)
    if how == "cancel":
        future.cancel()
    with pytest.raises(grpc.FutureCancelledError if how == "cancel" else grpc.RpcError) as info:
        future.result()
    if how == "deadline":
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: request_lines(server.log(), since, f"adapter={fresh.name}#"))
    # This request's own line: stopped at a step boundary, long before the 1000 steps it asked for.
    (line,) = request_lines(server.log(), since, f"adapter={fresh.name}#")
    assert log_field(line, "outcome") == ("CANCELLED" if how == "cancel" else "DEADLINE_EXCEEDED"), line
    assert log_field(line, "steps") == "1000" and int(log_field(line, "steps_done")) < 1000, line
    assert listed(server)[fresh.name].in_use == 0
    # The worker is free again: a normal request goes through.
    assert server.stub.Generate(
        pb.GenerateRequest(prompt=PROMPT, sampling_params=pb.SamplingParams(num_inference_steps=1)), timeout=60
    ).images
    unload(server, name=fresh.name)


def test_health_and_reflection(server: Server) -> None:
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    assert server.health_status() == health_pb2.HealthCheckResponse.SERVING
    assert server.health_status("omni_grpc.v1.OmniService") == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"omni_grpc.v1.OmniService", "grpc.health.v1.Health"} <= names


@pytest.fixture(scope="module")
def small_server(cache_root: Path, preloaded: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = start_server(
        [
            "--cache-dir",
            str(cache_root),
            "--lora-path",
            str(preloaded),
            "--max-loaded-adapters",
            "3",
            "--lora-dirs",
            str(tmp_path_factory.getbasetemp()),
        ],
        log_path=tmp_path_factory.mktemp("logs") / "small.log",
    )
    yield srv
    srv.stop()


def test_lru_eviction_skips_pinned_and_in_use(small_server: Server, model_dir: Path, tmp_path: Path) -> None:
    a, b, c, d = (make_peft_adapter(model_dir, tmp_path / n, rank=2, alpha=2, seed=i) for i, n in enumerate("abcd"))
    load(small_server, a)
    load(small_server, b)  # table: pre (pinned), a, b -- full
    small_server.stub.Generate(
        pb.GenerateRequest(
            prompt=PROMPT, lora_request=pb.LoraRequest(name="a"), sampling_params={"num_inference_steps": 1}
        ),
        timeout=60,
    )  # a is now more recent than b
    load(small_server, c)  # evicts b, the least recently used unpinned one
    assert set(listed(small_server)) == {"pre", "a", "c"}
    # Hold c with a long request: d must then evict a, not c.
    future = _long_generate(small_server, pb.LoraRequest(name="c"), steps=60)
    wait_for(lambda: listed(small_server)["c"].in_use == 1)
    load(small_server, d)
    assert set(listed(small_server)) == {"pre", "c", "d"}
    assert future.result().images
    # Everything left is pinned or busy: a load that needs a slot is refused, not queued forever.
    load(small_server, d, pin=True)
    load(small_server, c, pin=True)
    error = rpc_error(load, small_server, a)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-loaded-adapters" in error.details()
    response = small_server.stub.ListAdapters(pb.ListAdaptersRequest())
    assert response.max_loaded_adapters == 3
    assert next(x.name for x in response.adapters) == "c"  # most recently used first


def test_load_waits_for_nothing_but_its_own_file(server: Server, fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A load stuck reading its file holds up no other load, and fails only itself."""
    stuck = fresh.parent / f"{fresh.name}-stuck"
    shutil.copytree(fresh, stuck)
    reading, release = threading.Event(), threading.Event()
    real_read = AdapterReader.read

    def read(self: AdapterReader, path: str) -> object:
        if Path(path).name == stuck.name:
            reading.set()
            release.wait(60)
            raise InvalidArgument(f"{path}: not an adapter after all", field="path")
        return real_read(self, path)

    monkeypatch.setattr(AdapterReader, "read", read)
    with ThreadPoolExecutor(1) as pool:
        stuck_load = pool.submit(load, server, stuck)
        try:
            assert reading.wait(30)
            good = load(server, fresh)  # behind one global load lock, this would wait for the stuck read
            assert good.adapter.name == fresh.name and not stuck_load.done()
        finally:
            release.set()
        error = stuck_load.exception(timeout=60)
    assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not an adapter after all" in error.details()
    assert stuck.name not in listed(server)
    unload(server, name=fresh.name)
