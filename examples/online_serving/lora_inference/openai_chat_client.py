"""Online LoRA inference through the REST gateway with the official `openai` client, as in the guide.

    python examples/online_serving/lora_inference/openai_chat_client.py \\
        --prompt "A piece of cheesecake" --lora-path /path/to/lora_adapter \\
        --lora-name my_lora --lora-scale 1.0 --output output.png

Several adapters at once, each with its own scale: repeat `--lora NAME_OR_PATH[:SCALE]`, e.g.
`--lora /loras/style:0.8 --lora ink` (a path has a slash; otherwise it names a loaded adapter).

`--stream` streams the generation (server-sent chat chunks) and shows its progress: the place in the queue,
then a bar of the denoising steps.

The adapter path is on the SERVER machine. The adapter and generation fields travel in `extra_body`,
in vLLM-Omni's flat shape (`lora` or `loras` + `height`, `width`, ...), which the gateway accepts as well as
the guide's `lora_request` + `sampling_params`.
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path
from typing import Any

import openai
from tqdm import tqdm


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="http://localhost:8091", help="the gateway's address")
    parser.add_argument("--model", default=None, help="model to name in the request (default: the served base)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--lora-path", default=None, help="adapter folder on the server machine")
    parser.add_argument("--lora-name", default=None, help="name for the adapter (or of one already loaded)")
    parser.add_argument("--lora-scale", type=float, default=1.0)
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME_OR_PATH[:SCALE]",
        help="an adapter to compose with the others given so (repeatable); a path has a slash",
    )
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--output", type=Path, default=Path("output.png"))
    parser.add_argument("--stream", action="store_true", help="stream it, with a progress bar on stderr")
    return parser.parse_args(argv)


def lora_item(spec: str) -> dict[str, object]:
    """`NAME_OR_PATH[:SCALE]` -> one `loras` item."""
    target, sep, scale = spec.rpartition(":")
    try:
        value = float(scale) if sep else None
    except ValueError:
        value = None
    if value is None:
        target = spec
    item: dict[str, object] = {"local_path" if "/" in target else "name": target}
    if value is not None:
        item["scale"] = value
    return item


def request_fields(args: argparse.Namespace) -> dict[str, object]:
    fields: dict[str, object] = {}
    if args.lora:
        fields["loras"] = [lora_item(spec) for spec in args.lora]
    elif args.lora_path or args.lora_name:
        lora: dict[str, object] = {"scale": args.lora_scale}
        if args.lora_path:
            lora["local_path"] = args.lora_path
        if args.lora_name:
            lora["name"] = args.lora_name
        fields["lora"] = lora
    for key, value in (
        ("height", args.height),
        ("width", args.width),
        ("num_inference_steps", args.steps),
        ("seed", args.seed),
    ):
        if value is not None:
            fields[key] = value
    return fields


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.lora and (args.lora_path or args.lora_name):
        print("give --lora (repeatable) or --lora-path/--lora-name, not both", file=sys.stderr)
        return 2
    # The gateway needs no key; the client insists on one.
    client = openai.OpenAI(base_url=f"{args.server.rstrip('/')}/v1", api_key="unused", max_retries=0)
    try:
        model = args.model or client.models.list().data[0].id
        messages: list[Any] = [{"role": "user", "content": args.prompt}]
        if args.stream:
            parts, omni = streamed(client, model, messages, request_fields(args))
        else:
            response = client.chat.completions.create(model=model, messages=messages, extra_body=request_fields(args))
            parts, omni = response.choices[0].message.content, (response.model_extra or {}).get("omni", {})
    except openai.APIStatusError as exc:
        print(f"error {exc.status_code}: {exc.message}", file=sys.stderr)
        return 1
    except openai.APIConnectionError as exc:
        print(f"cannot reach the gateway at {args.server}: {exc}", file=sys.stderr)
        return 1
    url = parts[0]["image_url"]["url"]
    args.output.write_bytes(base64.b64decode(url.split(",", 1)[1]))
    adapters = omni.get("adapters") or []
    applied = ", ".join(f"{a['name']} at scale {a['scale']:g}" for a in adapters)
    used = f"adapter{'s' if len(adapters) > 1 else ''} {applied}" if adapters else "no adapter"
    print(f"wrote {args.output} ({model}, {used})")
    return 0


def streamed(
    client: openai.OpenAI, model: str, messages: list[Any], fields: dict[str, object]
) -> tuple[Any, dict[str, Any]]:
    """The streamed chat: a progress bar from the chunks' `omni` events; the last chunk's images and `omni`."""
    bar = tqdm(desc="queued", unit="step", file=sys.stderr)
    try:
        for chunk in client.chat.completions.create(model=model, messages=messages, stream=True, extra_body=fields):
            omni = (chunk.model_extra or {}).get("omni", {})
            event = omni.get("event")
            if event == "queued":
                bar.set_description(f"queued, {omni['position']} ahead")
            elif event == "started":
                bar.set_description(f"denoising (batch of {omni['batch_size']})")
            elif event == "step":
                bar.total = omni["total_steps"]
                bar.update(omni["step"] - bar.n)
            elif chunk.choices and chunk.choices[0].finish_reason == "stop":
                return chunk.choices[0].delta.content, omni
    finally:
        bar.close()
    raise RuntimeError("the gateway ended the stream without the images")


if __name__ == "__main__":
    sys.exit(main())
