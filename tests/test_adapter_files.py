"""Hostile adapter files: every bad header, offset, rank or config is refused with a named OmniError.

Files are built by hand (struct + json) so each test controls the exact header bytes; the reader is called
in-process, with no model or server.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import signal
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from omni_grpc.engine import adapter_files, peft_config, safetensors_reader
from omni_grpc.engine.adapter_files import AdapterReader, AdapterWeights
from omni_grpc.errors import FailedPrecondition, InvalidArgument, NotFound, OmniError

KEY_A = "base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight"
KEY_B = "base_model.model.transformer_blocks.0.attn.to_q.lora_B.weight"
ALLOWED_ERRORS = (InvalidArgument, FailedPrecondition, NotFound)


def read_adapter(path: str, *, max_rank: int | None = None) -> AdapterWeights:
    return AdapterReader(max_rank=max_rank).read(path)


def tensors_of(adapter: AdapterWeights) -> dict[str, torch.Tensor]:
    return {
        f"{module}.{part}": t
        for (_, module), pair in adapter.modules.items()
        for part, t in zip("AB", pair, strict=True)
    }


def config_for(r: int = 2, **extra: Any) -> dict[str, Any]:
    return {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ["to_q"], **extra}


def tensors_for(r: int = 2, prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
    module = f"{prefix}transformer_blocks.0.attn.to_q"
    return {f"{module}.lora_A.weight": torch.randn(r, 3), f"{module}.lora_B.weight": torch.randn(4, r)}


def write_peft(folder: Path, r: int = 2, config: dict[str, Any] | None = None) -> Path:
    """A valid PEFT folder of rank r (lora_A [r, 3], lora_B [4, r]), written by safetensors itself."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors_for(r), folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(config or config_for(r)))
    return folder


MODULE = "base_model.model.transformer_blocks.0.attn.to_q"


@pytest.mark.parametrize(
    ("keys", "error", "words"),
    [
        (["transformer_blocks.0.attn.to_q.lora_A.weight"], InvalidArgument, "is not in the form 'base_model.model."),
        ([KEY_A, KEY_B, f"{MODULE}.lora_magnitude_vector"], FailedPrecondition, "is DoRA (a magnitude vector)"),
        ([KEY_A, KEY_B, f"{MODULE}.lora_B.bias"], InvalidArgument, ".lora_B.bias' is not a LoRA weight"),
        (
            [KEY_A, KEY_B, "base_model.model.lora_A.weight"],
            InvalidArgument,
            "model.lora_A.weight' is not a LoRA weight",
        ),
        (
            [KEY_A, KEY_B, "base_model.model..lora_B.weight"],
            InvalidArgument,
            "model..lora_B.weight' is not a LoRA weight",
        ),
        ([KEY_A], InvalidArgument, "module 'transformer_blocks.0.attn.to_q' has no lora_B weight"),
        ([KEY_B], InvalidArgument, "module 'transformer_blocks.0.attn.to_q' has no lora_A weight"),
        (
            [KEY_A, "base_model.model.transformer_blocks.1.attn.to_q.lora_B.weight"],
            InvalidArgument,
            "module 'transformer_blocks.0.attn.to_q' has no lora_B weight",
        ),
    ],
)
def test_peft_keys_outside_its_layout_are_refused_by_name(
    tmp_path: Path, keys: list[str], error: type[OmniError], words: str
) -> None:
    folder = tmp_path / "a"
    folder.mkdir()
    shapes = {"lora_A.weight": (2, 3), "lora_B.weight": (4, 2)}
    tensors = {key: torch.zeros(shapes.get(key.rsplit(".", 2)[-2] + ".weight", (4,))) for key in keys}
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(config_for()))
    with pytest.raises(error) as raised:
        read_adapter(str(folder))
    assert words in raised.value.message


def header_entry(shape: list[Any], offsets: Any, dtype: Any = "F32") -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def good_header() -> dict[str, Any]:
    """lora_A F32 [2, 3] (24 bytes) then lora_B F32 [4, 2] (32 bytes): a 56-byte data region."""
    return {KEY_A: header_entry([2, 3], [0, 24]), KEY_B: header_entry([4, 2], [24, 56])}


def safetensors_bytes(header: dict[str, Any] | bytes, data: bytes = bytes(56), length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def peft_with_weights(folder: Path, blob: bytes, config: dict[str, Any] | None = None) -> Path:
    """A PEFT folder with a valid rank-2 config and the given raw weights file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(blob)
    (folder / "adapter_config.json").write_text(json.dumps(config or config_for(2)))
    return folder


def refused(path: Path, kind: type[OmniError] = InvalidArgument, **kwargs: Any) -> str:
    """The message of the error read_adapter raises, after checking its class and code."""
    with pytest.raises(OmniError) as info:
        read_adapter(str(path), **kwargs)
    assert type(info.value) is kind and info.value.code == kind.code
    return info.value.message


def forbid_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any read of tensor data fail the test: what follows must be decided from the header alone."""

    def read(self: safetensors_reader.SafetensorsFile) -> None:
        raise AssertionError(f"{self.file}: tensor data was read")

    monkeypatch.setattr(safetensors_reader.SafetensorsFile, "read", read)


def wrap_check_header(monkeypatch: pytest.MonkeyPatch, after: Callable[[Path], None]) -> None:
    """Run `after(file)` once the header has been read and checked, before the data is read."""
    real = safetensors_reader._check_header

    def check_then(file: Path, *args: Any) -> safetensors_reader.SafetensorsHeader:
        header = real(file, *args)
        after(file)
        return header

    monkeypatch.setattr(safetensors_reader, "_check_header", check_then)


# --- valid files ------------------------------------------------------------------------------------------


def test_valid_files_load(tmp_path: Path) -> None:
    saved = read_adapter(str(write_peft(tmp_path / "saved", r=4)), max_rank=4)  # at the cap is fine
    assert saved.rank == 4 and saved.alpha == 4.0
    by_hand = read_adapter(str(peft_with_weights(tmp_path / "by_hand", safetensors_bytes(good_header()))))
    assert by_hand.rank == 2 and list(by_hand.modules) == [("transformer", "transformer_blocks.0.attn.to_q")]
    diffusers = tmp_path / "lora.safetensors"
    save_file(tensors_for(3, prefix="transformer."), diffusers)
    assert read_adapter(str(diffusers), max_rank=3).rank == 3
    null_fields = config_for(2, rank_pattern=None, alpha_pattern=None, use_rslora=None, target_modules=None)
    assert read_adapter(str(write_peft(tmp_path / "nulls", config=null_fields))).rank == 2


# --- the safetensors header -------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [safetensors_reader.MAX_HEADER_BYTES + 1, 2**64 - 1])
def test_huge_declared_header_length(tmp_path: Path, length: int) -> None:
    folder = peft_with_weights(tmp_path / "a", safetensors_bytes(good_header(), length=length))
    message = refused(folder)
    assert "adapter_model.safetensors" in message
    assert f"header of {length} bytes exceeds {safetensors_reader.MAX_HEADER_BYTES}" in message


def test_header_length_past_the_end_is_truncated(tmp_path: Path) -> None:
    blob = safetensors_bytes(b"{}", data=b"", length=1000)
    message = refused(peft_with_weights(tmp_path / "a", blob))
    assert "adapter_model.safetensors is truncated" in message and "at least 1008 bytes, but it is 10" in message


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"{not json", "the safetensors header is not valid JSON"),
        (b'{"a": 1', "the safetensors header is not valid JSON"),
        (b"[" * 100_000, "the safetensors header is not valid JSON"),  # nesting too deep to parse
        (b'{"\xff": 1}', "the safetensors header is not UTF-8"),
        (b"[1, 2]", "its header is not a JSON object"),
        (b"{}", "holds no tensors"),
        (b'{"__metadata__": {"a": 1}, "x": {}}', "__metadata__ must be an object of strings"),
    ],
)
def test_header_not_json(tmp_path: Path, raw: bytes, words: str) -> None:
    message = refused(peft_with_weights(tmp_path / "a", safetensors_bytes(raw, data=b"")))
    assert "adapter_model.safetensors" in message and words in message


def test_duplicate_tensor_names(tmp_path: Path) -> None:
    entry = json.dumps(header_entry([2, 3], [0, 24]))
    raw = f'{{"{KEY_A}": {entry}, "{KEY_A}": {entry}}}'.encode()
    message = refused(peft_with_weights(tmp_path / "a", safetensors_bytes(raw, data=bytes(24))))
    assert f"the safetensors header has the key '{KEY_A}' more than once" in message


def test_overlapping_offsets(tmp_path: Path) -> None:
    header = good_header()
    header[KEY_B]["data_offsets"] = [16, 48]
    message = refused(peft_with_weights(tmp_path / "a", safetensors_bytes(header)))
    assert f"tensors '{KEY_A}' and '{KEY_B}' overlap" in message


def test_out_of_range_offsets(tmp_path: Path) -> None:
    header = good_header()
    header[KEY_B]["data_offsets"] = [1000, 1032]
    message = refused(peft_with_weights(tmp_path / "a", safetensors_bytes(header)))
    assert "offsets are out of range" in message
    assert f"'{KEY_B}' has data_offsets [1000, 1032] but the data region holds 56 bytes" in message


def test_offsets_that_do_not_match_shape_and_dtype(tmp_path: Path) -> None:
    header = good_header()
    header[KEY_A]["data_offsets"] = [0, 20]
    message = refused(peft_with_weights(tmp_path / "a", safetensors_bytes(header)))
    assert f"'{KEY_A}' has data_offsets [0, 20] (20 bytes), but shape [2, 3] of F32 needs 24 bytes" in message
    header = good_header()
    header[KEY_A]["dtype"] = "F16"  # half the bytes the offsets span
    message = refused(peft_with_weights(tmp_path / "b", safetensors_bytes(header)))
    assert "shape [2, 3] of F16 needs 12 bytes" in message
    header = good_header()
    header[KEY_A]["shape"] = [10**30, 10**30]  # a product this large is never computed in full
    message = refused(peft_with_weights(tmp_path / "c", safetensors_bytes(header)))
    assert "needs more than the size limit" in message


@pytest.mark.parametrize(
    ("offsets", "words"),
    [
        ([-1, 23], "data_offsets [-1, 23]; want [begin, end], two integers >= 0"),
        ([0], "data_offsets [0]; want"),
        ([0, 12, 24], "data_offsets [0, 12, 24]; want"),
        ("0-24", "data_offsets '0-24'; want"),
        ([0.0, 24.0], "data_offsets [0.0, 24.0]; want"),
        ([False, 24], "data_offsets [False, 24]; want"),
        (None, "data_offsets None; want"),
        ([24, 0], "data_offsets [24, 0], which end before they begin"),
    ],
)
def test_negative_or_garbage_offsets(tmp_path: Path, offsets: Any, words: str) -> None:
    header = good_header()
    header[KEY_A]["data_offsets"] = offsets
    message = refused(peft_with_weights(tmp_path / "a", safetensors_bytes(header)))
    assert f"tensor '{KEY_A}' has {words}" in message


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("shape", [-2, 3], "shape [-2, 3]; want a list of integers >= 0"),
        ("shape", "2x3", "shape '2x3'; want a list of integers >= 0"),
        ("shape", [2.0, 3], "shape [2.0, 3]; want a list of integers >= 0"),
        ("dtype", "F64", "dtype 'F64'; allowed: F32, F16, BF16, I64, I32"),
        ("dtype", ["F32"], "dtype ['F32']; allowed"),
    ],
)
def test_bad_shape_or_dtype(tmp_path: Path, field: str, value: Any, words: str) -> None:
    header = good_header()
    header[KEY_A][field] = value
    message = refused(peft_with_weights(tmp_path / "a", safetensors_bytes(header)))
    assert f"tensor '{KEY_A}' has {words}" in message


def test_integer_weights_are_refused(tmp_path: Path) -> None:
    # Integers are read only for a Kohya module's alpha; a LoRA weight of them is no adapter.
    header = good_header()
    header[KEY_A] = header_entry([2, 3], [0, 48], "I64")
    header[KEY_B] = header_entry([4, 2], [48, 80])
    message = refused(peft_with_weights(tmp_path / "a", safetensors_bytes(header, bytes(80))))
    assert f"tensor '{KEY_A}' has dtype I64; weights must be F32, F16, BF16 (only a module's alpha" in message


def test_too_many_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adapter_files, "MAX_TENSORS", 1)  # what a reader without a model allows
    message = refused(peft_with_weights(tmp_path / "a", safetensors_bytes(good_header())))
    assert "adapter_model.safetensors declares 2 tensors; the limit is 1" in message


def test_declared_bytes_over_the_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Overlapping entries may declare far more bytes than the file holds; the sum is capped first."""
    header = {f"t{i}": header_entry([100, 100], [0, 40_000]) for i in range(100)}
    blob = safetensors_bytes(header, data=bytes(40_000))
    monkeypatch.setattr(safetensors_reader, "MAX_FILE_BYTES", len(blob))
    message = refused(peft_with_weights(tmp_path / "a", blob))
    assert f"declares 4000000 bytes of tensor data; adapters larger than {len(blob)} are refused" in message


def test_a_folder_named_like_a_file_is_read_as_a_folder(tmp_path: Path) -> None:
    folder = write_peft(tmp_path / "odd.safetensors")
    assert (
        tensors_of(read_adapter(str(folder))).keys() == tensors_of(read_adapter(str(write_peft(tmp_path / "b")))).keys()
    )
    (folder / "adapter_config.json").unlink()
    assert "is missing adapter_config.json" in refused(folder)


def test_short_reads_are_read_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read may return fewer bytes than asked before the end of a file (signals, some filesystems): the
    reader reads on, and loads what a whole read loads."""
    folder = write_peft(tmp_path / "a")
    whole = tensors_of(read_adapter(str(folder)))
    real_pread, real_preadv = os.pread, os.preadv

    def pread(fd: int, count: int, offset: int) -> bytes:
        return real_pread(fd, min(count, 5), offset)

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        return real_preadv(fd, [buffers[0][:7]], offset)

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(os, "preadv", preadv)
    short = tensors_of(read_adapter(str(folder)))
    assert short.keys() == whole.keys() and all(torch.equal(short[k], whole[k]) for k in whole)


def test_truncated_file(tmp_path: Path) -> None:
    folder = write_peft(tmp_path / "a")
    weights = folder / "adapter_model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[:-10])
    message = refused(folder)
    assert f"{weights} is truncated" in message
    assert f"expected a file of at least {len(blob)} bytes, got {len(blob) - 10}" in message


def test_trailing_bytes_are_refused(tmp_path: Path) -> None:
    message = refused(peft_with_weights(tmp_path / "a", safetensors_bytes(good_header(), data=bytes(60))))
    assert "adapter_model.safetensors is not a readable safetensors file" in message


# --- the file changing or failing while it is read ---------------------------------------------------------


def test_file_deleted_mid_load_loads_what_was_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Header and data come from one open file: deleting or replacing the path meanwhile changes nothing."""
    folder = write_peft(tmp_path / "a")
    expected = tensors_of(read_adapter(str(folder)))
    wrap_check_header(monkeypatch, lambda file: file.unlink())
    got = read_adapter(str(folder))
    assert not (folder / "adapter_model.safetensors").exists()
    assert all(torch.equal(tensors_of(got)[k], v) for k, v in expected.items())

    monkeypatch.undo()
    write_peft(folder)
    expected = tensors_of(read_adapter(str(folder)))
    replacement = write_peft(tmp_path / "big", r=64) / "adapter_model.safetensors"
    wrap_check_header(monkeypatch, lambda file: os.replace(replacement, file))
    got = read_adapter(str(folder), max_rank=8)  # the rank-64 file that took its place is never read
    assert got.rank == 2 and all(torch.equal(tensors_of(got)[k], v) for k, v in expected.items())


def test_file_shrunk_mid_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_peft(tmp_path / "a", r=1024)  # larger than the reader's buffer, so the data is read later
    size = (folder / "adapter_model.safetensors").stat().st_size
    wrap_check_header(monkeypatch, lambda file: os.truncate(file, 50))
    message = refused(folder)
    assert f"adapter_model.safetensors is truncated: it was {size} bytes when opened, but only" in message


def test_os_errors_become_invalid_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_peft(tmp_path / "a")

    def fail(file: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    wrap_check_header(monkeypatch, fail)
    message = refused(folder)
    assert f"{folder / 'adapter_model.safetensors'} could not be read: [Errno 5] Input/output error" in message

    def denied(file: Path, _may_open: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(file))

    monkeypatch.setattr(safetensors_reader, "open_regular", denied)
    message = refused(folder)
    assert f"{folder / 'adapter_config.json'} could not be read: [Errno 13] Permission denied" in message


def test_unreadable_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a file without read permission does (root reads any file, so the open itself is made to fail)."""
    folder = write_peft(tmp_path / "a")
    weights = folder / "adapter_model.safetensors"
    real_open = os.open

    def open_(path: Any, flags: int, *args: Any) -> int:
        if Path(path) == weights:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_)
    assert f"{weights} could not be read: [Errno 13] Permission denied" in refused(folder)


def test_weights_path_is_a_directory(tmp_path: Path) -> None:
    folder = tmp_path / "a"
    (folder / "adapter_model.safetensors").mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config_for()))
    message = refused(folder)
    assert f"{folder / 'adapter_model.safetensors'} is not a regular file" in message


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "lora.safetensors"
    os.mkfifo(fifo)
    assert f"{fifo} is not a regular file" in refused(fifo)


def test_pickle_only(tmp_path: Path) -> None:
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config_for()))
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04N.")
    message = refused(folder)
    assert f"'{folder}' has adapter_model.bin but no adapter_model.safetensors" in message and "pickle" in message


@pytest.mark.parametrize("path", ["", "/tmp/a\0b"])
def test_empty_or_nul_path(path: str) -> None:
    with pytest.raises(InvalidArgument, match="is empty or contains a NUL byte"):
        read_adapter(path)


# --- the rank cap -----------------------------------------------------------------------------------------


def test_rank_over_the_cap_from_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "lora.safetensors"
    save_file(tensors_for(8, prefix="transformer."), file)
    forbid_tensor_reads(monkeypatch)  # refused from the header: no tensor is read
    message = refused(file, max_rank=4)
    assert f"{file}: tensor 'transformer.transformer_blocks.0.attn.to_q.lora_A.weight' has rank 8" in message
    assert "above this server's limit of 4 (set with --max-lora-rank)" in message
    # A config that understates the rank does not get past the header either.
    folder = write_peft(tmp_path / "a", r=8, config=config_for(2))
    assert f"'{KEY_A}' has rank 8, above this server's limit of 4" in refused(folder, max_rank=4)


def test_rank_over_the_cap_from_the_config(tmp_path: Path) -> None:
    folder = write_peft(tmp_path / "a", r=8)
    message = refused(folder, max_rank=4)
    assert f"{folder / 'adapter_config.json'}: 'r' = 8 is above this server's LoRA rank limit of 4" in message
    assert "--max-lora-rank" in message
    folder = write_peft(tmp_path / "b", r=2, config=config_for(2, rank_pattern={"to_q": 16}))
    message = refused(folder, max_rank=4)
    assert (
        "'rank_pattern' 'to_q' = 16 is above this server's LoRA rank limit of 4 (set with --max-lora-rank)" in message
    )


# --- adapter_config.json ----------------------------------------------------------------------------------


def _config(**fields: Any) -> str:
    return json.dumps({**config_for(2), **fields})


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ('{"peft_type": "LORA", "r": 2, "r": 2, "lora_alpha": 2}', "has the key 'r' more than once"),
        (_config(r=0), "'r' must be a positive integer, got 0"),
        (_config(r="4"), "'r' must be a positive integer, got '4'"),
        (_config(r=True), "'r' must be a positive integer, got True"),
        (_config(r=2.0), "'r' must be a positive integer, got 2.0"),
        ('{"peft_type": "LORA", "lora_alpha": 2}', "'r' must be a positive integer, got None"),
        ('{"peft_type": "LORA", "r": 2, "lora_alpha": NaN}', "'lora_alpha' must be a finite number, got nan"),
        (_config(lora_alpha="8"), "'lora_alpha' must be a finite number, got '8'"),
        (_config(lora_alpha=False), "'lora_alpha' must be a finite number, got False"),
        (_config(target_modules=5), "'target_modules' must be a string or a list of strings, got 5"),
        (_config(target_modules=["to_q", 1]), "'target_modules' must be a string or a list of strings"),
        (_config(use_rslora="yes"), "'use_rslora' must be true or false, got 'yes'"),
        (_config(rank_pattern=[1]), "'rank_pattern' must be an object of module patterns, got list"),
        (_config(rank_pattern={"to_q": 0}), "'rank_pattern' 'to_q' must be a positive integer, got 0"),
        (_config(alpha_pattern={"to_q": "x"}), "'alpha_pattern' 'to_q' must be a finite number, got 'x'"),
        (_config(rank_pattern={"(": 2}), "'rank_pattern' key '(' is not a module name"),
        (_config(alpha_pattern={"a{99999999999}": 2}), "'alpha_pattern' key 'a{99999999999}' is not a module name"),
        # A catastrophic-backtracking regex never runs: refused as a key.
        (_config(rank_pattern={"(a+)+b": 2}), "regular expressions are not accepted"),
        (_config(peft_type="LOHA"), "peft_type 'LOHA' is not supported, only LORA"),
        ("[1, 2]", "must hold a JSON object, not list"),
        ("{", "is not valid JSON"),
        ("[" * 100_000, "is not valid JSON"),
        ('{"r": 1' + "1" * 5000 + "}", "is not valid JSON"),  # an integer too long for Python to convert
        (b'{"peft_type": "LORA", "r": 2, "lora_alpha": 2, "x": "\xff"}', "is not UTF-8"),
        ('\ufeff{"r": 2}'.encode("utf-16"), "is not UTF-8"),
    ],
)
def test_malformed_config(tmp_path: Path, raw: str | bytes, words: str) -> None:
    folder = write_peft(tmp_path / "a")
    config = folder / "adapter_config.json"
    config.write_bytes(raw if isinstance(raw, bytes) else raw.encode())
    message = refused(folder)
    assert f"{config}" in message and words in message


def test_config_too_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adapter_files, "MAX_CONFIG_BYTES", 64)
    folder = write_peft(tmp_path / "a", config=config_for(2, padding="x" * 100))
    size = (folder / "adapter_config.json").stat().st_size
    assert f"adapter_config.json is {size} bytes; the limit is 64" in refused(folder)


@pytest.mark.parametrize(
    ("field", "value"),
    [("use_dora", True), ("lora_bias", True), ("bias", "all"), ("modules_to_save", ["proj_out"])],
)
def test_unsupported_peft_feature(tmp_path: Path, field: str, value: Any) -> None:
    folder = write_peft(tmp_path / "a", config=config_for(2, **{field: value}))
    message = refused(folder, FailedPrecondition)
    assert f"{folder / 'adapter_config.json'}: '{field}' = {value!r} is not supported by this server" in message


def test_diffusers_metadata_is_strict(tmp_path: Path) -> None:
    file = tmp_path / "lora.safetensors"
    raw = '{"transformer.r": 2, "transformer.r": 2}'
    save_file(tensors_for(2, prefix="transformer."), file, metadata={"lora_adapter_metadata": raw})
    assert "metadata 'lora_adapter_metadata' has the key 'transformer.r' more than once" in refused(file)
    save_file(tensors_for(2, prefix="transformer."), file, metadata={"lora_adapter_metadata": '{"transformer.r": 3}'})
    assert "module 'transformer_blocks.0.attn.to_q' has rank 2 but the config says r=3" in refused(file)
    metadata = json.dumps({"transformer.r": 2, "transformer.use_dora": True})
    save_file(tensors_for(2, prefix="transformer."), file, metadata={"lora_adapter_metadata": metadata})
    assert f"{file}: 'use_dora' = True is not supported" in refused(file, FailedPrecondition)


# --- property-based: whatever the bytes, only the three error kinds --------------------------------------


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Fail instead of hanging: SIGALRM interrupts the call."""

    def alarm(signum: int, frame: object) -> None:
        raise TimeoutError(f"read_adapter ran for over {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def read_or_refuse(path: Path, max_rank: int | None = None) -> None:
    with time_limit(10):
        try:
            read_adapter(str(path), max_rank=max_rank)
        except ALLOWED_ERRORS as exc:
            assert exc.message and str(path) in exc.message  # every refusal names the file


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def valid_blob(fuzz_dir: Path) -> bytes:
    return (write_peft(fuzz_dir / "valid") / "adapter_model.safetensors").read_bytes()


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.data())
def test_fuzz_byte_flips_and_truncation(fuzz_dir: Path, valid_blob: bytes, data: st.DataObject) -> None:
    blob = bytearray(valid_blob)
    for index, value in data.draw(st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 255)), max_size=8)):
        blob[index] = value
    cut = data.draw(st.none() | st.integers(0, len(blob)))
    folder = peft_with_weights(fuzz_dir / "flips", bytes(blob[:cut]))
    read_or_refuse(folder, max_rank=data.draw(st.none() | st.integers(1, 4)))


_JUNK = st.none() | st.booleans() | st.floats() | st.text(max_size=5) | st.integers(-(2**70), 2**70)
_ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", ""]) | _JUNK,
        "shape": st.lists(st.integers(-2, 12) | _JUNK, max_size=4) | _JUNK,
        "data_offsets": st.lists(st.integers(-4, 120) | _JUNK, max_size=3) | _JUNK,
    },
)
_NAMES = st.sampled_from([KEY_A, KEY_B, KEY_A.replace("to_q", "to_k"), KEY_B.replace("to_q", "to_k")]) | st.text(
    max_size=8
)


@FUZZ
@given(
    header=st.dictionaries(_NAMES, _ENTRY | _JUNK, max_size=5),
    metadata=st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4) | _JUNK, max_size=2),
    data=st.binary(max_size=120),
    length_delta=st.sampled_from([0, 0, 0, -1, 1, 2**40]),
    as_diffusers=st.booleans(),
)
def test_fuzz_random_headers(
    fuzz_dir: Path,
    header: dict[str, Any],
    metadata: dict[str, Any] | None,
    data: bytes,
    length_delta: int,
    as_diffusers: bool,
) -> None:
    if as_diffusers:
        header = {k.replace("base_model.model.", "transformer."): v for k, v in header.items()}
    if metadata is not None:
        header = {"__metadata__": metadata, **header}
    raw = json.dumps(header).encode()
    blob = safetensors_bytes(raw, data=data, length=max(0, len(raw) + length_delta))
    if as_diffusers:
        file = fuzz_dir / "random.safetensors"
        file.write_bytes(blob)
        read_or_refuse(file, max_rank=2)
    else:
        read_or_refuse(peft_with_weights(fuzz_dir / "random", blob))


_JSON = st.recursive(
    _JUNK | st.integers(0, 10), lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner)
)


@FUZZ
@given(
    fields=st.dictionaries(
        st.sampled_from(
            [
                *("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "target_modules", "peft_type"),
                *peft_config.UNSUPPORTED_FEATURES,
            ]
        ),
        _JSON,
        max_size=4,
    ),
)
def test_fuzz_random_configs(fuzz_dir: Path, valid_blob: bytes, fields: dict[str, Any]) -> None:
    folder = peft_with_weights(fuzz_dir / "configs", valid_blob, config={**config_for(2), **fields})
    read_or_refuse(folder, max_rank=4)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["F32", "F16", "BF16", "I64"]),
            st.sampled_from([(), (0,), (2, 3), (3, 2), (4,), (1, 1, 2)]),
            st.integers(0, 3),  # bytes of padding before the tensor (misaligned ones are copied)
        ),
        min_size=1,
        max_size=12,
    ),
    st.booleans(),
)
def test_the_reads_views_are_the_files_tensors(layout: list[tuple[str, tuple[int, ...], int]], reverse: bool) -> None:
    """Tensors of one dtype and shape at equal distances come from one unbound view: every tensor still equals
    its own bytes, with its own shape and contiguous strides, whatever the order, dtypes, gaps and alignment."""
    infos: dict[str, safetensors_reader.TensorInfo] = {}
    offset = 0
    for i, (dtype, shape, gap) in enumerate(layout):
        offset += gap
        nbytes = safetensors_reader.DTYPE_SIZES[dtype] * int(torch.tensor(shape).prod().item() if shape else 1)
        infos[f"t{i}"] = safetensors_reader.TensorInfo(dtype, shape, safetensors_reader.Span(offset, offset + nbytes))
        offset += nbytes
    if reverse:  # headers judged by the general check may list tensors in any order
        infos = dict(reversed(infos.items()))
    data = torch.randint(0, 256, (offset,), dtype=torch.uint8)
    views = safetensors_reader._views(data, infos, safetensors_reader.view_plan(infos))
    assert views.keys() == infos.keys()
    for key, info in infos.items():
        dtype, shape, begin, end = info.dtype, info.shape, info.begin, info.end
        want = data[begin:end].clone().view(safetensors_reader._TORCH_DTYPES[dtype]).view(shape)
        got = views[key]
        assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous(), key
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), key  # bit for bit


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=64),
    st.sampled_from([1, 4, 4096]),  # copies of the values: more terms in the sum
    st.floats(1.0, 1e4),
    st.sampled_from([256.0, 1e4, adapter_files._FLOAT32_SAFE]),
    st.floats(0.5, 2.0),  # one more value, this share of the largest the bound allows
)
def test_the_one_pass_magnitude_test_never_accepts_what_the_peak_refuses(
    values: list[float], copies: int, factor: float, bound: float, share: float
) -> None:
    tensor = torch.tensor([*values, -share * bound / factor] * copies, dtype=torch.float32)
    peak = adapter_files._peak(tensor)
    if adapter_files._surely_within(tensor, factor, bound):
        assert math.isfinite(peak) and peak * factor <= bound


def test_an_ordinary_adapter_s_magnitudes_take_one_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights far within the bound never need the peak's two passes; a value near it still gets the peak."""
    peaks: list[torch.Tensor] = []
    exact = adapter_files._peak
    monkeypatch.setattr(adapter_files, "_peak", lambda tensor: peaks.append(tensor) or exact(tensor))
    read_adapter(str(write_peft(tmp_path / "ordinary")))
    assert peaks == []
    near = write_peft(tmp_path / "near")
    tensors = {key: torch.full_like(value, 1e19) for key, value in tensors_for(2).items()}
    save_file(tensors, near / "adapter_model.safetensors")  # (squares overflow float32: no one-pass verdict)
    adapter = read_adapter(str(near))
    assert peaks and all(torch.equal(t, torch.full_like(t, 1e19)) for t in tensors_of(adapter).values())
