"""The header check's fast path (canonical_header) against the general judgement (_judge_header): every header
safetensors writes takes the fast path with the general result, and every other header, valid or not, is
left to the general judgement (which alone refuses, with its messages)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save, save_file

from omni_grpc.engine import safetensors_reader
from omni_grpc.engine.canonical_header import canonical_header, split_metadata
from omni_grpc.engine.safetensors_reader import SafetensorsHeader, _judge_header, open_safetensors, parse_json
from omni_grpc.errors import InvalidArgument

FILE = Path("adapter.safetensors")
Header = dict[str, Any]


def written(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> tuple[str, int]:
    """The header text safetensors writes for these tensors, and its data region's length."""
    raw = save(tensors, metadata=metadata)
    length = int.from_bytes(raw[:8], "little")
    return raw[8 : 8 + length].decode(), len(raw) - 8 - length


def judged(text: str, data_len: int, max_tensors: int = 8192) -> SafetensorsHeader | InvalidArgument:
    """The general judgement: the checked header, or the refusal."""
    try:
        return _judge_header(FILE, parse_json(text, "header"), data_len + 8 + len(text), 8 + len(text), max_tensors)
    except InvalidArgument as exc:
        return exc


def fast(text: str, data_len: int, max_tensors: int = 8192) -> SafetensorsHeader | None:
    checked = canonical_header(text, split_metadata(text), data_len, max_tensors)
    return None if checked is None else SafetensorsHeader(FILE, *checked)


WRITTEN = {
    "a LoRA pair": ({"m.lora_A.weight": torch.zeros(4, 8), "m.lora_B.weight": torch.zeros(8, 4)}, None),
    "with metadata": ({"a": torch.zeros(3)}, {"format": "pt", "tenant": 'a "quoted" {value}'}),
    "mixed dtypes, an alpha": (
        {
            "w.lokr_w1": torch.zeros(2, 2, dtype=torch.bfloat16),
            "w.lokr_w2": torch.zeros(5, 3, dtype=torch.float16),
            "w.alpha": torch.tensor(4, dtype=torch.int64),
            "v.weight": torch.zeros(7, dtype=torch.float32),
        },
        None,
    ),
    "an empty tensor and a scalar": ({"empty": torch.zeros(0, 5), "scalar": torch.tensor(2.0)}, None),
    "a conv LoRA": ({"c.lora_down.weight": torch.zeros(4, 3, 3, 3), "c.lora_up.weight": torch.zeros(6, 4, 1, 1)}, None),
    "unicode names": ({"modül.ä.lora_A.weight": torch.zeros(2, 2)}, {"ß": "ü"}),
    "colons in the metadata": ({"a": torch.zeros(3)}, {"ss_training_started_at": "12:30:00", "a:b": '{"c": 1}'}),
}


@pytest.mark.parametrize("case", list(WRITTEN))
def test_what_safetensors_writes_takes_the_fast_path_with_the_general_result(case: str) -> None:
    tensors, metadata = WRITTEN[case]
    text, data_len = written(tensors, metadata)
    general = judged(text, data_len)
    assert isinstance(general, SafetensorsHeader)
    assert fast(text, data_len) == general


def test_a_real_file_is_checked_by_the_fast_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "a.safetensors"
    save_file({"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(3, 2)}, file)
    monkeypatch.setattr(safetensors_reader, "_judge_header", None)  # the general judgement would fail this test
    with open_safetensors(file) as opened:
        assert opened.header.tensors["m.lora_A.weight"].shape == (2, 3)
        assert torch.equal(opened.read()["m.lora_B.weight"], torch.ones(3, 2))


def entry(dtype: str = "F32", shape: list[Any] | None = None, offsets: list[Any] | None = None) -> Header:
    return {"dtype": dtype, "shape": [2, 2] if shape is None else shape, "data_offsets": offsets or [0, 16]}


def text_of(header: Header | list[Any]) -> str:
    return json.dumps(header, separators=(",", ":"), ensure_ascii=False)


BASE: Header = {"__metadata__": {"k": "v"}, "a": entry(offsets=[0, 16]), "b": entry(offsets=[16, 32])}

# Headers no writer makes, each with the data region's length: valid ones the general check accepts, and
# invalid ones it refuses. None of them may be accepted by the fast path with another result.
ODD: dict[str, tuple[str, int]] = {
    "fields in another order": (text_of({"a": {"shape": [2, 2], "dtype": "F32", "data_offsets": [0, 16]}}), 16),
    "tensors in another order": (text_of({"b": entry(offsets=[16, 32]), "a": entry(offsets=[0, 16])}), 32),
    "metadata last": (text_of({"a": entry(), "__metadata__": {"k": "v"}}), 16),
    "null metadata": (text_of({"__metadata__": None, "a": entry()}), 16),
    "spaces": (json.dumps(BASE), 32),
    "a tensor repeated as it is": ('{"a":' + text_of(entry()) + ',"a":' + text_of(entry()) + "}", 16),
    "a repeated tensor": ('{"a":' + text_of(entry()) + ',"a":' + text_of(entry(offsets=[16, 32])) + "}", 32),
    "a repeated field": ('{"a":{"dtype":"F32","dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}', 16),
    "a repeated field, one key spaced": (
        '{"a":{"dtype" :"F16","dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}',
        16,
    ),
    "a colon in a name": (text_of({"a:b": entry()}), 16),
    "a field repeated under an escape": (
        '{"a":{"dtype":"F16","dt\\u0079pe":"F32","shape":[2,2],"data_offsets":[0,16]}}',
        16,
    ),
    "a tensor repeated under an escape": ('{"a":' + text_of(entry()) + ',"\\u0061":' + text_of(entry()) + "}", 16),
    "an escaped name": ('{"\\u00e4":' + text_of(entry()) + "}", 16),
    "a tensor named like a field": (text_of({"dtype": entry(), "shape": entry(offsets=[16, 32])}), 32),
    "a repeated metadata key": ('{"__metadata__":{"k":"v","k":"w"},"a":' + text_of(entry()) + "}", 16),
    "metadata twice": ('{"__metadata__":{},"__metadata__":{},"a":' + text_of(entry()) + "}", 16),
    "a non-string metadata value": (text_of({"__metadata__": {"k": 1}, "a": entry()}), 16),
    "an extra field": (text_of({"a": {**entry(), "extra": 1}}), 16),
    "a missing field": (text_of({"a": {"dtype": "F32", "shape": [2, 2]}}), 16),
    "an entry that is an array": (text_of({"a": [["dtype", "F32"], ["shape", [2, 2]], ["data_offsets", [0, 16]]]}), 16),
    "a header that is an array": (text_of([["a", entry()]]), 16),
    "an empty header": ("{}", 0),
    "only metadata": (text_of({"__metadata__": {}}), 0),
    "an unknown dtype": (text_of({"a": entry(dtype="F64", offsets=[0, 32])}), 32),
    "a dtype that is not a string": (text_of({"a": {**entry(), "dtype": ["F32"]}}), 16),
    "a float dimension": (text_of({"a": entry(shape=[2.0, 2])}), 16),
    "a bool dimension": (text_of({"a": entry(shape=[True, 4], offsets=[0, 16])}), 16),
    "a negative dimension": (text_of({"a": entry(shape=[-2, -2])}), 16),
    "a dimension as a string": (text_of({"a": entry(shape=["2", 2])}), 16),
    "a huge dimension of an empty tensor": (text_of({"a": entry(shape=[0, 10**30], offsets=[0, 0])}), 0),
    "a huge dimension": (text_of({"a": entry(shape=[10**30, 10**30], offsets=[0, 16])}), 16),
    "many dimensions": (text_of({"a": entry(shape=[1] * 20 + [4], offsets=[0, 16])}), 16),
    "a shape that is not a list": (text_of({"a": entry(shape={"0": 4})}), 16),  # type: ignore[arg-type]
    "a shape that is an empty object": (text_of({"a": entry(shape={}, offsets=[0, 4])}), 4),  # type: ignore[arg-type]
    "metadata that is an empty array": (text_of({"__metadata__": [], "a": entry()}), 16),
    "an entry that is an empty object": (text_of({"a": {}}), 0),
    "offsets that do not match the shape": (text_of({"a": entry(offsets=[0, 12])}), 12),
    "three offsets": (text_of({"a": entry(offsets=[0, 8, 16])}), 16),
    "float offsets": (text_of({"a": entry(offsets=[0.0, 16.0])}), 16),
    "a gap": (text_of({"a": entry(offsets=[0, 16]), "b": entry(offsets=[20, 36])}), 36),
    "an overlap": (text_of({"a": entry(offsets=[0, 16]), "b": entry(offsets=[8, 24])}), 24),
    "trailing bytes": (text_of(BASE), 40),
    "a short region": (text_of(BASE), 24),
    "not starting at 0": (text_of({"a": entry(offsets=[4, 20])}), 20),
    "an empty tensor inside another": (
        text_of({"a": entry(offsets=[0, 16]), "z": entry(shape=[0], offsets=[8, 8])}),
        16,
    ),
    "a name too long": (text_of({"k" * 600: entry()}), 16),
    "not JSON": ('{"a":', 16),
    "deeply nested": ("[" * 100_000 + "]" * 100_000, 0),
}


@pytest.mark.parametrize("case", list(ODD))
def test_every_other_header_gets_the_general_verdict(case: str) -> None:
    text, data_len = ODD[case]
    got = fast(text, data_len)
    general = judged(text, data_len)
    assert got is None or got == general, "the fast path accepted what the general check judges otherwise"
    if isinstance(general, InvalidArgument):
        assert got is None


def test_the_odd_headers_cover_both_verdicts() -> None:
    """The cases above hold both kinds (or the test above could not tell a fast path that refuses nothing)."""
    verdicts = [judged(*ODD[case]) for case in ODD]
    assert sum(isinstance(v, InvalidArgument) for v in verdicts) >= 20
    assert sum(isinstance(v, SafetensorsHeader) for v in verdicts) >= 5


def test_the_tensor_limit_is_the_callers(tmp_path: Path) -> None:
    text, data_len = written({f"t{i}": torch.zeros(1) for i in range(5)})
    assert fast(text, data_len, max_tensors=5) is not None
    assert fast(text, data_len, max_tensors=4) is None
    refusal = judged(text, data_len, max_tensors=4)
    assert isinstance(refusal, InvalidArgument) and "declares 5 tensors; the limit is 4" in refusal.message


MUTATIONS: list[Callable[[str], str]] = [
    lambda t: t.replace('"F32"', '"F16"', 1),
    lambda t: t.replace("[2,2]", "[2,3]", 1),
    lambda t: t.replace("[0,16]", "[0,17]", 1),
    lambda t: t.replace('"b"', '"a"', 1),
    lambda t: t.replace('"k":"v"', '"k":"v","k":"v"', 1),
    lambda t: t.replace("16,32", "16,31", 1),
    lambda t: t.replace('"dtype"', '"dtypf"', 1),
]


@pytest.mark.parametrize("index", range(len(MUTATIONS)))
def test_a_changed_byte_is_never_accepted_when_the_general_check_refuses(index: int) -> None:
    text = MUTATIONS[index](text_of(BASE))
    for data_len in (30, 31, 32, 34):
        general, got = judged(text, data_len), fast(text, data_len)
        assert got is None if isinstance(general, InvalidArgument) else got in (None, general)


def test_a_written_file_header_with_its_length_prefix(tmp_path: Path) -> None:
    """The fast path is judged on the header as opened: a prefix that claims more bytes is refused as ever."""
    raw = save({"a": torch.zeros(2)})
    length = int.from_bytes(raw[:8], "little")
    file = tmp_path / "long.safetensors"
    file.write_bytes(struct.pack("<Q", length) + raw[8 : 8 + length] + raw[8 + length :] + b"\0\0\0\0")
    with pytest.raises(InvalidArgument, match="gaps or trailing bytes"):
        open_safetensors(file)


@pytest.mark.parametrize("case", [*WRITTEN, *ODD])
def test_a_header_split_at_its_metadata_holds_the_same_tensors_with_any_metadata(case: str) -> None:
    """The header memo's premise: a valid header whose metadata comes first stays valid, with the same tensors,
    whatever other metadata (an object of strings) takes its place; so its tensor section is judged once."""
    text, data_len = written(*WRITTEN[case]) if case in WRITTEN else ODD[case]
    split = split_metadata(text)
    first = judged(text, data_len)
    if split is None or not isinstance(first, SafetensorsHeader):
        return
    section, metadata = split
    assert text == '{"__metadata__":' + text_of(metadata) + "," + section
    again = judged('{"__metadata__":{"run":"2","ss_seed":"7"},' + section, data_len)
    assert isinstance(again, SafetensorsHeader)
    assert again.tensors == first.tensors and first.metadata == metadata
    assert again.metadata == {"run": "2", "ss_seed": "7"}


def test_only_a_leading_metadata_of_strings_is_split_off() -> None:
    assert split_metadata(text_of(BASE)) == (text_of(BASE)[len('{"__metadata__":{"k":"v"},') :], {"k": "v"})
    for case in ("metadata last", "null metadata", "spaces", "a repeated metadata key", "a non-string metadata value"):
        assert split_metadata(ODD[case][0]) is None, case
    assert split_metadata('{"__metadata__":{"k":"v"}}') is None  # nothing follows it
    assert split_metadata('{"__metadata__":{"k":"v"') is None  # not JSON
