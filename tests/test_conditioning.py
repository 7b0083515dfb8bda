"""The conditioning bundle (issue 28, point 1): prompts of different token lengths batch as the stock
pipelines batch them (zero padding and a mask; no mask when every prompt is as long), the cache keys on
what the encoder reads, the bundle broadcasts and slices row-wise; every family's sigmas are what its own
scheduler config gives through diffusers' ``set_timesteps``, as its pipeline calls it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcps.conditioning import PromptEncodings, expand_cond, select, split_prompts
from fastcps.schedule import pipeline_sigmas

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


class RaggedEncoder:
    """Encodes like QwenImagePipeline._get_qwen_prompt_embeds: one token per word, states zero-padded to
    the batch's longest prompt, a long mask with 1 on tokens; also a fixed-width key without a mask."""

    def __init__(self):
        self.calls = []

    def encode(self, prompts, metadata=None):
        self.calls.append(list(prompts))
        g = torch.Generator().manual_seed(0)
        table = torch.randn(50, 6, generator=g)
        lengths = [len(p.split()) for p in prompts]
        longest = max(lengths)
        states = torch.zeros(len(prompts), longest, 6)
        mask = torch.zeros(len(prompts), longest, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids = [sum(map(ord, w)) % 50 for w in p.split()]
            states[i, : len(ids)] = table[ids]
            mask[i, : len(ids)] = 1
        return {
            "encoder_hidden_states": states,
            "encoder_hidden_states_mask": mask,
            "timestep_bias": torch.arange(len(prompts) * 3, dtype=torch.float32).reshape(-1, 3),
        }


def test_ragged_prompts_batch_as_the_pipeline_batches_them():
    """Encoded one call at a time (so each is cached at its own length) and asked for together, the bundle
    is what encoding them together gives: states padded with zeros to the longest, the mask 0 there."""
    enc = RaggedEncoder()
    cache = PromptEncodings(enc)
    prompts = ["a red bus", "two cats on a mat", "dog"]
    for p in prompts:
        cache.for_prompts([p], CPU)
    cond, index = cache.for_prompts([prompts[1], prompts[0], prompts[2], prompts[0]], CPU)
    want = RaggedEncoder().encode([prompts[1], prompts[0], prompts[2]])
    assert set(cond) == {"encoder_hidden_states", "encoder_hidden_states_mask", "timestep_bias"}
    assert cond["encoder_hidden_states"].shape == (3, 5, 6)
    assert torch.equal(cond["encoder_hidden_states"], want["encoder_hidden_states"])
    assert torch.equal(cond["encoder_hidden_states_mask"], want["encoder_hidden_states_mask"])
    assert index.tolist() == [0, 1, 2, 1]
    assert len(enc.calls) == 3  # every prompt encoded once
    # the cache holds each prompt at its own length: 3 tokens for "a red bus", not the 5 of the batch
    assert cache.host["a red bus"]["encoder_hidden_states"].shape == (1, 3, 6)
    assert cache.lengths == {"a red bus": 3, "two cats on a mat": 5, "dog": 1}


def test_prompts_of_one_length_carry_no_mask():
    """QwenImagePipeline.encode_prompt sets an all-ones mask to None; the bundle drops it the same way,
    so the transformer sees what the stock pipeline gives it."""
    cache = PromptEncodings(RaggedEncoder())
    cond, _ = cache.for_prompts(["a red bus", "one two three", "a red bus"], CPU)
    assert "encoder_hidden_states_mask" not in cond
    assert cond["encoder_hidden_states"].shape == (2, 3, 6)
    cond, _ = cache.for_prompts(["a red bus", "dog"], CPU)  # from the cache, now ragged: the mask is back
    assert cond["encoder_hidden_states_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_a_mask_with_a_hole_is_refused():
    def holed(prompts):
        out = RaggedEncoder().encode(prompts)
        out["encoder_hidden_states_mask"][0, 0] = 0
        return out

    with pytest.raises(ValueError, match="encoder_hidden_states_mask of prompt 0 is not ones followed"):
        split_prompts(holed(["a red bus", "two cats on a mat"]))


def test_the_cache_keys_on_what_the_encoder_reads():
    """Two prompts the encoder reads the same way (here: the same words, other case) are encoded once."""
    enc = RaggedEncoder()
    enc.encoding_key = lambda p, meta=None: p.lower()
    cond, index = PromptEncodings(enc).for_prompts(["A red bus", "a red bus", "dog"], CPU)
    assert enc.calls == [["A red bus", "dog"]] and index.tolist() == [0, 0, 1]
    assert cond["encoder_hidden_states"].shape[0] == 2


def test_expand_and_select_work_on_every_key():
    cond = RaggedEncoder().encode(["a red bus", "dog"])
    one = {k: v[:1] for k, v in cond.items()}
    wide = expand_cond(one, 4)
    assert all(v.shape[0] == 4 for v in wide.values())
    assert torch.equal(wide["encoder_hidden_states_mask"][3], cond["encoder_hidden_states_mask"][0])
    with pytest.raises(ValueError, match="conditioning 'timestep_bias' 2"):
        expand_cond(
            {"encoder_hidden_states": one["encoder_hidden_states"], "timestep_bias": cond["timestep_bias"]}, 4
        )
    rows = select(cond, torch.tensor([1, 1, 0]))
    assert torch.equal(rows["timestep_bias"], cond["timestep_bias"][[1, 1, 0]])
    assert rows["encoder_hidden_states_mask"].tolist() == [[1, 0, 0], [1, 0, 0], [1, 1, 1]]


# --- sigmas: each family's scheduler, as its pipeline calls it ----------------------------------------------

SCHEDULERS = sorted((ROOT / "configs" / "models").glob("*_scheduler.json"))


def stock_sigmas(path: Path, num_tokens: int, n: int, folder: Path) -> torch.Tensor:
    """The scheduler of ``path`` through the stock pipeline module's own ``calculate_shift`` and
    ``retrieve_timesteps`` with the pipelines' grid ``linspace(1, 1/N, N)`` (QwenImagePipeline and
    FluxPipeline pass it; StableDiffusion3Pipeline passes none: see fastcps.policies.sd3 for why the SD3
    recipes take the same grid)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux import pipeline_flux
    from diffusers.pipelines.qwenimage import pipeline_qwenimage
    from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3

    stem = path.name
    module = (
        pipeline_qwenimage
        if stem.startswith("qwen")
        else pipeline_flux
        if stem.startswith("flux")
        else pipeline_stable_diffusion_3
    )
    (folder / "scheduler_config.json").write_text(path.read_text())  # loaded as a pipeline loads it
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder)
    kw = {}
    if scheduler.config.get("use_dynamic_shifting"):
        c = scheduler.config
        kw["mu"] = (
            pipeline_flux.calculate_shift(
                num_tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift
            )
            if module is not pipeline_qwenimage
            else pipeline_qwenimage.calculate_shift(
                num_tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift
            )
        )
    module.retrieve_timesteps(scheduler, n, "cpu", sigmas=np.linspace(1.0, 1 / n, n), **kw)
    return scheduler.sigmas.float()


@pytest.mark.parametrize("path", SCHEDULERS, ids=[p.name.removesuffix("_scheduler.json") for p in SCHEDULERS])
@pytest.mark.parametrize("n", [1, 6, 10, 28])
def test_sigmas_are_the_stock_schedulers(path, n, tmp_path):
    config = json.loads(path.read_text())
    if n == 1 and config.get("shift_terminal"):  # stretched by 1 / (1 - 1): the stock scheduler's is NaN
        assert torch.isnan(stock_sigmas(path, 1024, n, tmp_path)).any()
        with pytest.raises(ValueError, match="non-finite sigmas at 1 step"):
            pipeline_sigmas(config, 1024, n)
        return
    for tokens in (256, 1024, 4096):
        ours = pipeline_sigmas(config, tokens, n)
        torch.testing.assert_close(ours, stock_sigmas(path, tokens, n, tmp_path), rtol=0, atol=0)
        assert ours[-1] == 0 and ours.dtype == torch.float32 and len(ours) == n + 1


def test_qwen_image_sigmas_keep_the_terminal_shift():
    """Qwen-Image at 512 px (1024 tokens), 10 steps: the pipeline's [1, .929, .852, .767, ...] ending at
    shift_terminal = 0.02 before the trailing 0; a scheduler rebuilt from shift and use_dynamic_shifting
    alone gives [1, .939, .873, .800, ...]."""
    config = json.loads((ROOT / "configs" / "models" / "qwen-image_scheduler.json").read_text())
    ours = pipeline_sigmas(config, 1024, 10)
    assert ours[:4].tolist() == pytest.approx([1.0, 0.929, 0.852, 0.767], abs=6e-4)
    assert ours[-2].item() == pytest.approx(0.02) and ours[-1] == 0
