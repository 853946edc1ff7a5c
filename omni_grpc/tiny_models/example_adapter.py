"""A first adapter for a new user: a PEFT LoRA that fits the embedded default model, written by peft itself.

`omni-grpc example-adapter` (and `scripts/serve.sh`, when `./loras/lora_adapter` is missing) writes it, so the
README's commands work as pasted from a fresh clone. Its weights are random, from a fixed seed: the same
files every time. Nothing already at the path is ever overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from omni_grpc.tiny_models.common import seeded
from omni_grpc.tiny_models.default import DEFAULT_MODEL_NAME, default_model_dir

EXAMPLE_SEED = 1234
EXAMPLE_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def write_example_adapter(out: Path, cache_dir: Path | None = None) -> bool:
    """Write the example adapter to `out` (a PEFT folder); False, writing nothing, if `out` exists."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig, get_peft_model

    out = Path(out)
    if out.exists():
        return False
    transformer = SD3Transformer2DModel.from_pretrained(str(default_model_dir(cache_dir) / "transformer"))
    config = LoraConfig(r=4, lora_alpha=4, target_modules=list(EXAMPLE_TARGETS), init_lora_weights="gaussian")
    with seeded(EXAMPLE_SEED):
        model = get_peft_model(transformer, config)
        # peft starts lora_B at zero (an adapter that changes nothing); give it weights that show.
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0.0, 0.5)
    # The config names the model by its served name, not by this machine's cache path.
    model.peft_config["default"].base_model_name_or_path = DEFAULT_MODEL_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), save_embedding_layers=False)  # False: no lookup of the base model online
        # peft writes target_modules from a set, in hash order: sorted, every run writes the same bytes.
        config_file = tmp / "adapter_config.json"
        saved = json.loads(config_file.read_text())
        saved["target_modules"] = sorted(saved["target_modules"])
        config_file.write_text(json.dumps(saved, indent=2, sort_keys=True))
        try:
            os.rename(tmp, out)  # all or nothing; and never over what appeared meanwhile
        except OSError:
            return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True
