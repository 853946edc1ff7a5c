"""Who may load what: adapter paths confined to --lora-dirs, admin calls behind a token, TLS on the wire."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from omni_grpc.engine import adapters
from omni_grpc.engine.adapters import normalize_path
from omni_grpc.engine.path_policy import RealPath, real_path
from omni_grpc.v1 import omni_pb2 as pb
from omni_grpc.v1 import omni_pb2_grpc
from tests.helpers import Server, rpc_error, start_gateway, start_server
from tests.lora_factory import make_peft_adapter

TOKEN = "s3cret-admin-token"
SMALL = pb.SamplingParams(height=64, width=64, num_inference_steps=1, seed=1)


def generate(server: Server, lora: pb.LoraRequest, timeout: float = 60) -> pb.GenerateResponse:
    request = pb.GenerateRequest(prompt="p", sampling_params=SMALL, lora_request=lora)
    return server.stub.Generate(request, timeout=timeout)


@pytest.fixture(scope="module")
def outside() -> Iterator[Path]:
    """A folder outside every --lora-dirs of these servers (and outside pytest's temporary folders)."""
    path = Path(tempfile.mkdtemp(prefix="omni-outside-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lora-dir")


@pytest.fixture(scope="module")
def guarded(cache_root: Path, preloaded: Path, lora_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A server with one allowed folder and an admin token; cwd elsewhere, so nothing resolves by accident."""
    # (The soak test passes its token by $OMNI_GRPC_ADMIN_TOKEN to a server process.)
    srv = start_server(
        [
            *("--cache-dir", str(cache_root), "--lora-path", f"pre={preloaded}"),
            *("--lora-dirs", str(lora_dir), "--admin-token", TOKEN),
        ],
        log_path=tmp_path_factory.mktemp("logs") / "guarded.log",
    )
    yield srv
    srv.stop()


# --- paths ----------------------------------------------------------------------------------------------------


def test_paths_inside_the_lora_dir_load(guarded: Server, model_dir: Path, lora_dir: Path) -> None:
    make_peft_adapter(model_dir, lora_dir / "inside", rank=2, alpha=2, seed=7)
    (lora_dir / "sub").mkdir(exist_ok=True)
    assert generate(guarded, pb.LoraRequest(path=str(lora_dir / "inside"))).adapter.name == "inside"
    # Relative paths resolve against the lora dir, and ".." that stays inside is fine.
    assert generate(guarded, pb.LoraRequest(path="inside")).adapter.name == "inside"
    assert generate(guarded, pb.LoraRequest(path="sub/../inside")).adapter.name == "inside"
    # The operator's pre-loaded adapter may be named by its path too, wherever it lies (which only admins see).
    auth = [("authorization", f"Bearer {TOKEN}")]
    reply = guarded.stub.ListAdapters(pb.ListAdaptersRequest(), metadata=auth, timeout=10)
    listed = {a.name: a for a in reply.adapters}
    assert generate(guarded, pb.LoraRequest(path=listed["pre"].path)).adapter.name == "pre"


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "symlinked_file"])
def test_paths_that_escape_are_permission_denied(
    guarded: Server, model_dir: Path, lora_dir: Path, outside: Path, how: str
) -> None:
    target = make_peft_adapter(model_dir, outside / f"evil_{how}", rank=2, alpha=2, seed=8)
    if how == "dotdot":
        path = os.path.relpath(target, lora_dir)  # ../../../tmp/omni-outside-.../evil
        assert path.startswith("..")
    elif how == "absolute":
        path = str(target)
    elif how == "symlink":
        link = lora_dir / f"link_{how}"
        link.symlink_to(target, target_is_directory=True)
        path = str(link)
    else:  # a real folder inside whose weights file is a symlink to a file outside
        folder = lora_dir / "half_evil"
        folder.mkdir(exist_ok=True)
        shutil.copy(target / "adapter_config.json", folder)
        link = folder / "adapter_model.safetensors"
        if not link.exists():
            link.symlink_to(target / "adapter_model.safetensors")
        path = str(folder)
    for call in (
        lambda: generate(guarded, pb.LoraRequest(path=path)),
        lambda: guarded.stub.LoadAdapter(
            pb.LoadAdapterRequest(path=path), metadata=[("authorization", f"Bearer {TOKEN}")], timeout=30
        ),
    ):
        error = rpc_error(call)
        if how == "symlinked_file":
            # The folder is inside; its file points out: refused when the file is opened, naming it.
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
            assert "outside" in error.details()
        else:
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
            assert "outside the adapter folders this server allows (--lora-dirs)" in error.details()
    names = {a.name for a in guarded.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=10).adapters}
    assert not any(name.startswith("evil") or name == "half_evil" for name in names)


def test_an_escaping_path_is_refused_before_any_file_is_opened(guarded: Server, outside: Path) -> None:
    # A FIFO outside: refused by its path alone (the reader would also refuse it as not a regular file).
    fifo_dir = outside / "fifo_adapter"
    fifo_dir.mkdir(exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (fifo_dir / name).exists():
            os.mkfifo(fifo_dir / name)
    error = rpc_error(generate, guarded, pb.LoraRequest(path=str(fifo_dir)), timeout=20)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("lora", "field_words"),
    [
        (pb.LoraRequest(path="inside\x00/../../etc"), "NUL bytes"),
        (pb.LoraRequest(path="inside", name="../evil"), "is invalid: use 1-128 characters from [A-Za-z0-9._-]"),
        (pb.LoraRequest(path="inside", name="a b"), "is invalid"),
    ],
)
def test_nul_bytes_and_bad_names_are_invalid_argument(guarded: Server, lora: pb.LoraRequest, field_words: str) -> None:
    error = rpc_error(generate, guarded, lora)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and field_words in error.details()


def test_without_lora_dirs_paths_are_refused_naming_the_flag(
    cache_root: Path, preloaded: Path, style_a: Path, tmp_path: Path
) -> None:
    srv = start_server(["--cache-dir", str(cache_root), "--lora-path", f"pre={preloaded}"], log_path=tmp_path / "s.log")
    try:
        error = rpc_error(generate, srv, pb.LoraRequest(path=str(style_a)))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "--lora-dirs" in error.details()
        error = rpc_error(srv.stub.LoadAdapter, pb.LoadAdapterRequest(path=str(style_a)), timeout=30)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert generate(srv, pb.LoraRequest(name="pre")).adapter.name == "pre"
        assert "adapters by path are off (no --lora-dirs)" in srv.log()
    finally:
        srv.stop()


def test_allow_any_lora_path_lifts_it_loudly(cache_root: Path, style_a: Path, tmp_path: Path) -> None:
    srv = start_server(["--cache-dir", str(cache_root), "--allow-any-lora-path"], log_path=tmp_path / "s.log")
    try:
        assert generate(srv, pb.LoraRequest(path=str(style_a))).adapter.name == "style_a"
        assert (
            "WARNING omni_grpc.service.server: --allow-any-lora-path: clients may load adapter files from ANY path"
            in (srv.log())
        )
    finally:
        srv.stop()


# --- the admin token ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "words"),
    [
        (None, "LoadAdapter is an admin call: send the metadata 'authorization: Bearer <admin token>'"),
        ([("authorization", "Bearer wrong")], "LoadAdapter: the admin token is not valid"),
        ([("authorization", TOKEN)], "the admin token is not valid"),  # no "Bearer "
    ],
)
def test_admin_calls_without_the_token_are_unauthenticated(
    guarded: Server, lora_dir: Path, model_dir: Path, metadata: list | None, words: str
) -> None:
    path = make_peft_adapter(model_dir, lora_dir / "admin_target", rank=2, alpha=2, seed=9)
    error = rpc_error(guarded.stub.LoadAdapter, pb.LoadAdapterRequest(path=str(path)), metadata=metadata, timeout=30)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and words in error.details()
    error = rpc_error(guarded.stub.UnloadAdapter, pb.UnloadAdapterRequest(name="pre"), metadata=metadata, timeout=30)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    names = {a.name for a in guarded.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=10).adapters}
    assert "admin_target" not in names and "pre" in names


def test_admin_calls_with_the_token_work(guarded: Server, lora_dir: Path, model_dir: Path) -> None:
    path = make_peft_adapter(model_dir, lora_dir / "admin_ok", rank=2, alpha=2, seed=10)
    auth = [("authorization", f"Bearer {TOKEN}")]
    loaded = guarded.stub.LoadAdapter(pb.LoadAdapterRequest(path=str(path)), metadata=auth, timeout=30)
    assert loaded.adapter.name == "admin_ok"
    guarded.stub.UnloadAdapter(pb.UnloadAdapterRequest(name="admin_ok"), metadata=auth, timeout=30)
    # Generate and the read-only calls need no token.
    assert generate(guarded, pb.LoraRequest(name="pre")).images


def test_the_gateway_passes_the_callers_token_through(
    guarded: Server, lora_dir: Path, model_dir: Path, tmp_path: Path
) -> None:
    path = make_peft_adapter(model_dir, lora_dir / "via_gateway", rank=2, alpha=2, seed=11)
    gateway = start_gateway(guarded.target, ["--enable-lora-admin"], log_path=tmp_path / "gw.log")
    try:
        body = {"lora_name": "via_gateway", "lora_path": str(path)}
        missing = gateway.post("/v1/load_lora_adapter", body)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthenticated"
        wrong = gateway.post("/v1/load_lora_adapter", body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = gateway.post("/v1/load_lora_adapter", body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200, ok.text
        outside = gateway.post(
            "/v1/load_lora_adapter",
            {"lora_name": "x", "lora_path": "/etc"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert outside.status_code == 403 and outside.json()["error"]["type"] == "permission_error"
    finally:
        gateway.stop()


# --- TLS ------------------------------------------------------------------------------------------------------


def _self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "server.crt", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_tls_for_the_server_and_the_gateways_channel(cache_root: Path, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    srv = start_server(
        ["--cache-dir", str(cache_root), "--tls-cert", str(cert), "--tls-key", str(key)],
        log_path=tmp_path / "s.log",
        tls_ca=cert,
    )
    try:
        assert "with TLS" in srv.log()
        reply = srv.stub.Generate(pb.GenerateRequest(prompt="p", sampling_params=SMALL), timeout=60)
        assert reply.images
        with grpc.insecure_channel(srv.target) as plain:
            error = rpc_error(omni_pb2_grpc.OmniServiceStub(plain).Generate, pb.GenerateRequest(prompt="p"), timeout=5)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        gateway = start_gateway(srv.target, ["--grpc-tls-ca", str(cert)], log_path=tmp_path / "gw.log")
        try:
            assert gateway.get("/health").status_code == 200
            body = {"messages": [{"role": "user", "content": "p"}], "height": 64, "width": 64, "num_inference_steps": 1}
            assert gateway.post("/v1/chat/completions", body).status_code == 200
        finally:
            gateway.stop()
        plain_gateway = start_gateway(srv.target, [], log_path=tmp_path / "gw-plain.log")
        try:
            assert httpx.get(f"{plain_gateway.url}/health", timeout=30).status_code == 503
        finally:
            plain_gateway.stop()
    finally:
        srv.stop()


def test_a_link_swapped_in_before_a_reread_from_disk_is_refused(
    cache_root: Path, model_dir: Path, outside: Path, tmp_path: Path
) -> None:
    """The folder check at load time is not enough: files are checked again at every open."""
    from omni_grpc.config import EngineConfig
    from omni_grpc.engine.engine import Engine
    from omni_grpc.engine.types import GenerateRequest, LoraRequest, SamplingParams
    from omni_grpc.errors import PermissionDenied

    root = tmp_path / "loras"
    paths = [make_peft_adapter(model_dir, root / name, rank=2, alpha=2, seed=i) for i, name in enumerate("abc")]
    config = EngineConfig(cache_dir=cache_root, lora_dirs=[str(root)], max_device_adapters=1, max_host_adapters=1)
    engine = Engine(config).start()
    try:

        def run(lora: LoraRequest) -> None:
            sampling = SamplingParams(height=64, width=64, num_inference_steps=1, seed=1)
            engine.generate(GenerateRequest(prompt="p", sampling=sampling, lora=lora))

        for path in paths:
            run(LoraRequest(path=str(path)))
        assert {a.name: a.tier for a in engine.list_adapters()}["a"] == "disk"
        secret = outside / "secret.safetensors"
        shutil.copy(paths[0] / "adapter_model.safetensors", secret)
        (paths[0] / "adapter_model.safetensors").unlink()
        (paths[0] / "adapter_model.safetensors").symlink_to(secret)
        with pytest.raises(PermissionDenied, match="outside the adapter folders"):
            run(LoraRequest(name="a"))
        run(LoraRequest(name="b"))  # the others are unaffected
    finally:
        engine.close()


def test_real_path_says_what_realpath_says(tmp_path: Path) -> None:
    """The path policy's and the table's real paths come from the kernel (an O_PATH open) where they can: the
    same answers as os.path.realpath, for links, '..' through links and files, missing parts and relative paths."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").touch()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    cases = ["a/b", "link/b/f", "link/../a", "a/b/", "missing/x", "dangling", "loop", "a/b/f/..", "a//b///f", "."]
    for case in cases:
        assert real_path(str(tmp_path / case)) == os.path.realpath(tmp_path / case), case
    previous = os.getcwd()
    try:
        os.chdir(tmp_path / "link")
        assert real_path("b/f") == os.path.realpath("b/f") == str(tmp_path / "a" / "b" / "f")
    finally:
        os.chdir(previous)


def test_a_path_resolved_once_is_not_resolved_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the path policy resolved keys the table as it is: the table resolves only paths not resolved yet, and
    anything made from a real path is a path to resolve again."""
    (tmp_path / "a").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    real = real_path(str(tmp_path / "link"))
    assert type(real) is RealPath and real == str(tmp_path / "a")
    asked: list[str] = []

    def counted(path: str) -> RealPath:
        asked.append(path)
        return real_path(path)

    monkeypatch.setattr(adapters, "real_path", counted)
    assert normalize_path(real) is real and asked == []
    assert normalize_path(str(tmp_path / "link")) == real and len(asked) == 1
    assert type(real + "/x") is str and type(os.path.join(real, "x")) is str and type(real[:-1]) is str
