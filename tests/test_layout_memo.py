"""Adapters of one layout (fine-tunes of one recipe: the same tensor section of their headers, whatever metadata
each run wrote) are judged once per engine, and so is each module of a PEFT layout: a layout of modules judged
before (in other combinations) is put together from their verdicts. A load that reuses a verdict gives what
diffusers + peft give for its own weights and config, and still refuses what its own bytes hold (a NaN, an
overflowing weight, trailing bytes, metadata that is not an object of strings)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from omni_grpc.engine import safetensors_reader
from omni_grpc.engine.adapter_backend import LoadingBudget, PipelineFit
from omni_grpc.engine.adapter_files import AdapterLayout, AdapterReader, AdapterWeights, LayoutMemo
from omni_grpc.engine.adapter_math import ModuleFit
from omni_grpc.engine.canonical_header import split_metadata
from omni_grpc.engine.engine import Engine
from omni_grpc.engine.memo import Memo, ModelFacts
from omni_grpc.engine.safetensors_reader import MAX_HEADER_SEPARATORS, MEMO_HEADER_BYTES, open_safetensors, view_plan
from omni_grpc.engine.types import GenerateRequest, LoraRequest, SamplingParams
from omni_grpc.errors import InvalidArgument
from tests.helpers import PROMPT, started_engine
from tests.lora_factory import edit_config, make_peft_adapter, reference_pixels, to_diffusers_file

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[Engine]:
    with started_engine(model=str(model_dir), allow_any_lora_path=True, dtype="float32") as eng:
        yield eng


@pytest.fixture(scope="module")
def twins(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three fine-tunes of one recipe (rank 4, alpha 8, the same targets); the third's config says alpha 2."""
    root = tmp_path_factory.mktemp("twins")
    made = [make_peft_adapter(model_dir, root / f"twin{i}", rank=4, alpha=8, seed=30 + i) for i in range(3)]
    edit_config(made[2], lora_alpha=2)
    return made


def header_bytes(file: Path) -> bytes:
    raw = file.read_bytes()
    return raw[: 8 + int.from_bytes(raw[:8], "little")]


def rewritten(source: Path, out: Path, change: dict[str, float] | None = None, tail: bytes = b"") -> Path:
    """A copy of a PEFT folder with lora_B tensors filled with `change[...]` where named; `tail` appended."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_bytes((source / "adapter_config.json").read_bytes())
    tensors = load_file(source / WEIGHTS)
    first_b = next(k for k in sorted(tensors) if "lora_B" in k)
    for value in (change or {}).values():
        tensors[first_b] = torch.full_like(tensors[first_b], value)
    save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    if tail:
        with (out / WEIGHTS).open("ab") as handle:
            handle.write(tail)
    return out


def test_twins_share_their_header_bytes(twins: list[Path]) -> None:
    # The premise of the other tests: equal layouts, other weights (and one other config).
    headers = {header_bytes(t / WEIGHTS) for t in twins}
    assert len(headers) == 1
    assert len({(t / WEIGHTS).read_bytes() for t in twins}) == 3
    configs = [json.loads((t / "adapter_config.json").read_text())["lora_alpha"] for t in twins]
    assert configs == [8, 8, 2]


def test_a_twin_of_a_judged_layout_gives_what_diffusers_and_peft_give(
    engine: Engine, model_dir: Path, twins: list[Path]
) -> None:
    engine.load_adapter(str(twins[0]))  # judged here; the others reuse the verdict (the third with its config)
    for twin in twins[1:]:
        sampling = SamplingParams(height=64, width=64, num_inference_steps=2, seed=7)
        result = engine.generate(GenerateRequest(prompt=PROMPT, sampling=sampling, lora=LoraRequest(path=str(twin))))
        expected = reference_pixels(model_dir, prompt=PROMPT, seed=7, adapter=twin)
        np.testing.assert_allclose(np.asarray(result.images[0].array), expected, rtol=0, atol=1e-4)


def test_the_verdict_is_kept_once_per_layout_and_config(twins: list[Path]) -> None:
    memo = LayoutMemo()
    fresh = [AdapterReader().read(str(t)) for t in twins]
    remembered = [AdapterReader(memo=memo).read(str(t)) for t in twins]
    assert len(memo.headers) == 1 and len(memo.fitted) == 2  # one header; two configs
    for first, again in zip(fresh, remembered, strict=True):
        assert again.scalings == first.scalings and again.rank == first.rank and again.alpha == first.alpha
        assert again.modules.keys() == first.modules.keys()
        for key, (a, b) in first.modules.items():
            assert torch.equal(again.modules[key][0], a) and torch.equal(again.modules[key][1], b)
    assert {s for w in remembered for s in w.scalings.values()} == {2.0, 0.5}  # 8/4 and the third's 2/4


def test_a_tensor_section_is_planned_into_views_once(twins: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    planned: list[int] = []

    def counted(infos: Any) -> safetensors_reader.ViewPlan:
        planned.append(len(infos))
        return view_plan(infos)

    monkeypatch.setattr(safetensors_reader, "view_plan", counted)
    memo = LayoutMemo()
    read = [AdapterReader(memo=memo).read(str(t)) for t in twins]
    assert len(planned) == 1 and len(memo.headers) == 1
    for twin, adapter in zip(twins, read, strict=True):
        want = load_file(twin / WEIGHTS)
        for (_, module), (a, b) in adapter.modules.items():
            assert torch.equal(a, want[f"base_model.model.{module}.lora_A.weight"])
            assert torch.equal(b, want[f"base_model.model.{module}.lora_B.weight"])


def with_metadata(source: Path, out: Path, metadata: dict[str, str]) -> Path:
    """A copy of a PEFT folder whose weights file carries this metadata (its tensors unchanged), as trainers that
    write metadata per run (Kohya's ss_* entries: dates, seeds, hashes) make the fine-tunes of one recipe."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_bytes((source / "adapter_config.json").read_bytes())
    save_file(load_file(source / WEIGHTS), out / WEIGHTS, metadata=metadata)
    return out


def test_fine_tunes_with_metadata_of_their_own_share_the_verdict(twins: list[Path], tmp_path: Path) -> None:
    runs = [
        with_metadata(twins[0], tmp_path / f"run{i}", {"format": "pt", "ss_seed": str(i), "ss_output_name": f"r{i}"})
        for i in range(3)
    ]
    assert len({header_bytes(run / WEIGHTS) for run in runs}) == 3
    fresh = AdapterReader().read(str(twins[0]))
    memo = LayoutMemo()
    for run in runs:
        again = AdapterReader(memo=memo).read(str(run))
        assert again.scalings == fresh.scalings and again.modules.keys() == fresh.modules.keys()
        for key, (a, b) in fresh.modules.items():
            assert torch.equal(again.modules[key][0], a) and torch.equal(again.modules[key][1], b)
    assert len(memo.headers) == 1 and len(memo.fitted) == 1
    with open_safetensors(runs[2] / WEIGHTS, headers=memo.headers) as opened:  # a hit, with its own metadata
        assert opened.header.metadata == {"format": "pt", "ss_seed": "2", "ss_output_name": "r2"}
    assert [value[1] for _, value in memo.headers.items()] == [{}]  # no run's metadata is kept


def with_raw_metadata(source: Path, out: Path, metadata: str) -> Path:
    """A copy of a PEFT folder whose weights file's header has `metadata` (any JSON text) first, the same tensors."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_bytes((source / "adapter_config.json").read_bytes())
    raw = (source / WEIGHTS).read_bytes()
    length = int.from_bytes(raw[:8], "little")
    split = split_metadata(raw[8 : 8 + length].decode())
    assert split is not None
    header = ('{"__metadata__":' + metadata + "," + split[0]).encode()
    (out / WEIGHTS).write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + length :])
    return out


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ('{"ss_seed":7}', "__metadata__ must be an object of strings"),
        ("[]", "__metadata__ must be an object of strings"),
        ('{"k":"v","k":"w"}', "has the key 'k' more than once"),
    ],
)
def test_a_judged_tensor_section_with_bad_metadata_is_refused(
    twins: list[Path], tmp_path: Path, metadata: str, message: str
) -> None:
    memo = LayoutMemo()
    AdapterReader(memo=memo).read(str(with_raw_metadata(twins[0], tmp_path / "good", '{"ss_seed":"7"}')))
    assert len(memo.headers) == 1
    with pytest.raises(InvalidArgument, match=message):
        AdapterReader(memo=memo).read(str(with_raw_metadata(twins[0], tmp_path / "bad", metadata)))


def test_the_header_limits_hold_for_a_judged_tensor_section(twins: list[Path], tmp_path: Path) -> None:
    """Metadata padded with separators is refused before any parse, its tensor section remembered or not."""
    memo = LayoutMemo()
    AdapterReader(memo=memo).read(str(twins[0]))
    padded = with_raw_metadata(twins[0], tmp_path / "padded", '{"k":"' + ",:" * (MAX_HEADER_SEPARATORS // 2 + 1) + '"}')
    with pytest.raises(InvalidArgument, match="separators; the limit is"):
        AdapterReader(memo=memo).read(str(padded))


def test_a_diffusers_file_s_config_in_its_metadata_decides_with_its_tensors(twins: list[Path], tmp_path: Path) -> None:
    """diffusers' files keep their LoraConfig in the metadata: one tensor section, two configs, two verdicts."""
    files = [to_diffusers_file(twin, tmp_path / twin.name) for twin in (twins[0], twins[2])]  # alpha 8, alpha 2
    memo = LayoutMemo()
    read = [AdapterReader(memo=memo).read(str(file)) for file in files]
    assert len(memo.headers) == 1 and len(memo.fitted) == 2
    assert [set(weights.scalings.values()) for weights in read] == [{2.0}, {0.5}]  # 8/4, then 2/4


@pytest.mark.parametrize(
    ("change", "tail", "message"),
    [
        ({"lora_B": float("nan")}, b"", "contains NaN or Inf"),
        ({"lora_B": 3e38}, b"", "the model's dtype can only overflow"),
        (None, b"\0\0\0\0", "gaps or trailing bytes"),
    ],
)
def test_a_twin_is_still_refused_for_what_its_own_bytes_hold(
    engine: Engine, twins: list[Path], tmp_path: Path, change: dict[str, float] | None, tail: bytes, message: str
) -> None:
    engine.load_adapter(str(twins[0]))  # the layout is judged (again: idempotent)
    bad = rewritten(twins[0], tmp_path / "bad", change, tail)
    if not tail:
        assert header_bytes(bad / WEIGHTS) == header_bytes(twins[0] / WEIGHTS)
    with pytest.raises(InvalidArgument, match=message) as raised:
        engine.load_adapter(str(bad))
    assert str(bad) in raised.value.message and str(twins[0]) not in raised.value.message  # its own file, named


def test_a_header_beyond_the_memo_limit_is_judged_every_time(tmp_path: Path) -> None:
    # 1,200 tensors with long names: a header of about 400 KB, beyond MEMO_HEADER_BYTES.
    folder = tmp_path / "wide"
    folder.mkdir()
    pad = "x" * 200
    tensors = {}
    for i in range(600):
        module = f"base_model.model.blocks.{i}.{pad}.to_q"
        tensors[f"{module}.lora_A.weight"] = torch.zeros(1, 2)
        tensors[f"{module}.lora_B.weight"] = torch.zeros(2, 1)
    save_file(tensors, folder / WEIGHTS)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1}))
    assert len(header_bytes(folder / WEIGHTS)) > MEMO_HEADER_BYTES
    memo = LayoutMemo()
    for _ in range(2):
        assert len(AdapterReader(memo=memo).read(str(folder)).modules) == 600
    assert len(memo.headers) == 0 and len(memo.fitted) == 0


def test_the_memo_is_bounded_and_keeps_the_most_recent() -> None:
    memo: Memo[str, int] = Memo(2)
    memo.put("a", 1)
    memo.put("b", 2)
    assert memo.get("a") == 1  # "a" is now the most recent
    memo.put("c", 3)
    assert len(memo) == 2 and memo.get("b") is None and memo.get("a") == 1 and memo.get("c") == 3


def test_module_verdicts_used_since_the_memo_was_half_full_outlive_those_not() -> None:
    memo: Memo[str, int] = Memo(4)
    memo.put_all([("a", 1), ("b", 2), ("c", 3)])  # over half full
    assert memo.get_all(["a", "x"]) == [1, None]  # "a" is now the most recent
    memo.put_all([("d", 4), ("e", 5)])
    assert memo.get_all(["a", "b", "c", "d", "e"]) == [1, None, 3, 4, 5]


def test_model_facts_keep_the_first_ones_they_are_told_and_no_more() -> None:
    """The model's resolved names and delta shapes: never evicted (they never change), never more than the bound
    (only names that resolve are told, but a bound holds whatever a caller does)."""
    facts = ModelFacts[str, int](2)
    for i, key in enumerate("abc"):
        facts.put(key, i)
    facts.put("a", 9)  # full: nothing more is kept, nor changed
    assert (facts.get("a"), facts.get("b"), facts.get("c")) == (0, 1, None)
    assert len(facts) == 2


class CountingFit(PipelineFit):
    """The engine's own verdicts, counting the layouts judged whole."""

    def __init__(self, engine: Engine) -> None:
        self._budget = LoadingBudget(1 << 30)
        super().__init__(engine.lora, self._budget.session().__enter__())
        self.judged = 0

    def check(self, layout: AdapterLayout) -> dict[str, ModuleFit]:
        self.judged += 1
        return super().check(layout)


def reader_of(engine: Engine, memo: LayoutMemo) -> tuple[AdapterReader, CountingFit]:
    fit = CountingFit(engine)
    return AdapterReader(max_rank=64, fit=fit, memo=memo), fit


def assert_same_weights(got: AdapterWeights, want: AdapterWeights) -> None:
    assert (got.scalings, got.rank, got.alpha, got.target_modules) == (
        want.scalings,
        want.rank,
        want.alpha,
        want.target_modules,
    )
    assert got.modules.keys() == want.modules.keys() and not got.kron and not want.kron
    for key, (a, b) in want.modules.items():
        assert torch.equal(got.modules[key][0], a) and torch.equal(got.modules[key][1], b)


@pytest.fixture(scope="module")
def subsets(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapters of other layouts than the twins': fewer modules (at the twins' rank and alpha), fewer at another
    alpha, and the twins' modules at another rank."""
    root = tmp_path_factory.mktemp("subsets")
    made = {
        "qk": make_peft_adapter(model_dir, root / "qk", rank=4, alpha=8, targets=("to_q", "to_k"), seed=41),
        "v": make_peft_adapter(model_dir, root / "v", rank=4, alpha=8, targets=("to_v",), seed=42),
        "qk-alpha2": make_peft_adapter(model_dir, root / "qk2", rank=4, alpha=2, targets=("to_q", "to_k"), seed=43),
        "rank8": make_peft_adapter(model_dir, root / "rank8", rank=8, alpha=8, seed=44),
    }
    return made


def test_a_new_layout_of_judged_modules_is_put_together_from_their_verdicts(
    engine: Engine, twins: list[Path], subsets: dict[str, Path]
) -> None:
    memo = LayoutMemo()
    reader, fit = reader_of(engine, memo)
    reader.read(str(twins[0]))  # judged whole: every module's verdict is kept
    assert fit.judged == 1 and len(memo.modules) > 0
    known = len(memo.modules)
    for name in ("qk", "v"):
        assert header_bytes(subsets[name] / WEIGHTS) != header_bytes(twins[0] / WEIGHTS)  # a layout of its own
        got = reader.read(str(subsets[name]))
        fresh_memo = LayoutMemo()
        fresh_reader, fresh_fit = reader_of(engine, fresh_memo)
        assert_same_weights(got, fresh_reader.read(str(subsets[name])))
        assert fresh_fit.judged == 1
        # The verdict put together is the one judging it whole gives, field for field.
        assert memo.fitted.items()[-1][1] == fresh_memo.fitted.items()[-1][1]
    assert fit.judged == 1 and len(memo.modules) == known  # no layout judged whole again, no module new


@pytest.mark.parametrize("name", ["qk-alpha2", "rank8"])
def test_modules_judged_under_another_config_or_shape_are_judged_again(
    engine: Engine, twins: list[Path], subsets: dict[str, Path], name: str
) -> None:
    memo = LayoutMemo()
    reader, fit = reader_of(engine, memo)
    reader.read(str(twins[0]))
    got = reader.read(str(subsets[name]))
    assert fit.judged == 2  # alpha 2 scales otherwise; rank 8 is another shape: judged whole
    assert_same_weights(got, reader_of(engine, LayoutMemo())[0].read(str(subsets[name])))
    assert set(got.scalings.values()) == ({0.5} if name == "qk-alpha2" else {1.0})  # 2/4; 8/8


def test_an_adapter_put_together_from_judged_modules_gives_what_diffusers_and_peft_give(
    engine: Engine, model_dir: Path, twins: list[Path], subsets: dict[str, Path]
) -> None:
    engine.load_adapter(str(twins[0]))  # its modules judged in this engine
    sampling = SamplingParams(height=64, width=64, num_inference_steps=2, seed=7)
    request = GenerateRequest(prompt=PROMPT, sampling=sampling, lora=LoraRequest(path=str(subsets["qk"])))
    result = engine.generate(request)
    expected = reference_pixels(model_dir, prompt=PROMPT, seed=7, adapter=subsets["qk"])
    np.testing.assert_allclose(np.asarray(result.images[0].array), expected, rtol=0, atol=1e-4)


def test_a_peft_file_s_own_pairs_are_taken_as_the_module_by_module_read_takes_them(
    engine: Engine, twins: list[Path]
) -> None:
    """float32 pairs as the file holds them are taken in one step (FittedLayout.own); module by module (as every
    other layout is read, and as a layout whose peak is beyond the bound is, to name its tensor) gives the same."""
    memo = LayoutMemo()
    reader, _ = reader_of(engine, memo)
    taken = reader.read(str(twins[1]))
    ((key, fitted),) = memo.fitted.items()
    assert fitted.own is not None and len(fitted.own.modules) == len(taken.modules)
    memo.fitted.put(key, dataclasses.replace(fitted, own=None))
    assert_same_weights(reader.read(str(twins[1])), taken)


def test_a_half_precision_file_is_read_module_by_module(engine: Engine, twins: list[Path], tmp_path: Path) -> None:
    half = tmp_path / "half"
    half.mkdir()
    (half / "adapter_config.json").write_bytes((twins[0] / "adapter_config.json").read_bytes())
    save_file({k: v.half() for k, v in load_file(twins[0] / WEIGHTS).items()}, half / WEIGHTS)
    memo = LayoutMemo()
    got = reader_of(engine, memo)[0].read(str(half))
    assert memo.fitted.items()[0][1].own is None  # its pairs are made (float32), not taken
    assert all(a.dtype is torch.float32 is b.dtype for a, b in got.modules.values())
