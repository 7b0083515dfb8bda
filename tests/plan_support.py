"""What the plan tests share: the shipped recipes they plan, tiny transformer configs that keep them fast,
and ``run_json`` (``python -m fastcps.plan ... --json`` in process)."""

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

from fastcps.plan import main
from fastcps.policies.flux import FluxPolicy
from fastcps.trainer import evaluate_with

ROOT = Path(__file__).resolve().parent.parent
FLUX_CFG = ROOT / "configs" / "flux_pickscore.json"
TINY_FLUX = {
    "_class_name": "FluxTransformer2DModel",
    "attention_head_dim": 16,
    "axes_dims_rope": [4, 6, 6],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 32,
    "num_attention_heads": 2,
    "num_layers": 2,
    "num_single_layers": 2,
    "patch_size": 1,
    "pooled_projection_dim": 32,
}
LORA = (4, 8.0, tuple(FluxPolicy.default_lora_targets))


def run_json(*argv) -> dict:
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main([*argv, "--json"], evaluate=evaluate_with) == 0
    return json.loads(buf.getvalue())


QWEN_CFG = ROOT / "configs" / "qwenimage_pickscore.json"
SD35L_CFG = ROOT / "configs" / "sd35l_geneval.json"
# geneval:train is a download; the shipped test split gives the same count (prompts_per_epoch of any set)
SHIPPED_GENEVAL = ["--set", "prompts.source=geneval:test"]
TINY_QWEN = {
    "_class_name": "QwenImageTransformer2DModel",
    "attention_head_dim": 16,
    "axes_dims_rope": [4, 6, 6],
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": 32,
    "num_attention_heads": 2,
    "num_layers": 2,
    "out_channels": 16,
    "patch_size": 2,
}


KONTEXT_CFG = ROOT / "configs" / "kontext_counting.json"


QWEN_EDIT_CFG = ROOT / "configs" / "qwenimage_edit_counting.json"
