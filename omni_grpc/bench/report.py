"""Write the benchmark's results: a markdown table, JSON, and a PNG chart of the ratios."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from omni_grpc.bench.measure import Row


def _fmt(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{value / 1024:.1f} KiB"
    if unit in ("s", "s/step", "s/batch"):
        return f"{value * 1000:.3f} ms" if value < 1 else f"{value:.2f} s"
    return f"{value:.2f} {unit}" if value >= 1 else f"{value:.3g} {unit}"


def _met(row: Row) -> str:
    return "-" if row.met is None else "yes" if row.met else "no"


_COLOURS = {True: "#2e7d32", False: "#c62828", None: "#757575"}


def markdown(rows: list[Row]) -> str:
    lines = [
        "| measurement | omni-grpc | baseline | ratio | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.measurement} | {_fmt(r.ours, r.unit)} | {_fmt(r.baseline, r.unit)} | {r.ratio:.3g} | {r.goal} | "
            f"{_met(r)} |"
        )
    return "\n".join(lines) + "\n"


def chart(rows: list[Row], path: Path) -> None:
    """Horizontal bars of each ratio on a log scale, with the goal marked; green when met, grey without a goal."""
    width, bar_h, left, right = 1100, 34, 560, 40
    height = 60 + bar_h * len(rows) + 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((10, 10), "omni-grpc benchmark: ratio per measurement (log scale; line at 1)", fill="black", font=font)
    lo, hi = -4.0, 2.0  # log10 range shown
    span = width - left - right

    def x(ratio: float) -> int:
        value = min(max(math.log10(max(ratio, 1e-6)), lo), hi)
        return left + int((value - lo) / (hi - lo) * span)

    for i, r in enumerate(rows):
        y = 50 + i * bar_h
        draw.text((10, y + 8), r.measurement[:88], fill="black", font=font)
        draw.rectangle([x(1e-4), y + 6, x(r.ratio), y + bar_h - 6], fill=_COLOURS[r.met])
        goal = f" (goal {r.goal})" if r.goal else ""
        draw.text((x(r.ratio) + 4, y + 8), f"{r.ratio:.3g}{goal}", fill="black", font=font)
    draw.line([x(1.0), 40, x(1.0), height - 30], fill="#555555", width=1)
    for tick in range(int(lo), int(hi) + 1):
        tx = left + int((tick - lo) / (hi - lo) * span)
        draw.text((tx - 10, height - 25), f"1e{tick}", fill="#555555", font=font)
    image.save(path)


def write(rows: list[Row], meta: Mapping[str, object], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "markdown": out_dir / "bench.md", "chart": out_dir / "bench.png"}
    paths["json"].write_text(json.dumps({"meta": meta, "results": [r.as_dict() for r in rows]}, indent=2) + "\n")
    paths["markdown"].write_text(markdown(rows))
    chart(rows, paths["chart"])
    return paths
