"""The measured model of a run config (``Loader``): its model config files, the real transformer on fake
tensors (``fastcps.plan.measure``), the VAE's decode, the schedule and the frozen models' sizes, from
what the family's registry entry knows (``fastcps.policies.families``, ``fastcps.policies.plan_facts``).
"""

from __future__ import annotations

import json
from pathlib import Path

from fastcps.config import ConfigError, RunConfig
from fastcps.plan import costs as pc
from fastcps.policies.families import family

MODELS = Path(__file__).resolve().parents[2] / "configs" / "models"  # in the repo checkout
if not MODELS.is_dir():  # an installed package: the configs/ folder of the working directory
    MODELS = Path("configs") / "models"


def facts(cfg: RunConfig):
    """The ``FamilyPlan`` of ``policy.name``: a ConfigError naming the covered families otherwise."""
    try:
        return family(cfg.policy.name).plan_facts()
    except (KeyError, ValueError) as err:
        raise ConfigError(str(err).strip("'\"")) from None


def model_files(cfg: RunConfig) -> dict[str, Path]:
    """transformer / scheduler / vae configs: the local pipeline folder's, else the shipped copies the
    family picks from ``policy.pretrained``."""
    pol = cfg.policy
    local = Path(pol.pretrained) if pol.pretrained else None
    if local is not None and (local / "transformer" / "config.json").is_file():
        return {
            "transformer": local / "transformer" / "config.json",
            "vae": local / "vae" / "config.json",
            "scheduler": local / "scheduler" / "scheduler_config.json",
        }
    f = facts(cfg)
    name = pol.pretrained.lower()
    stem = next((s for part, s in f.model_configs if part in name), None)
    if stem is None:
        raise ConfigError(
            f"policy.pretrained = {pol.pretrained!r}: no shipped {pol.name} model config matches; give a "
            "local pipeline folder or --model-config"
        )
    return {
        "transformer": MODELS / f"{stem}_transformer.json",
        "vae": MODELS / f"{f.vae_config}.json",
        "scheduler": MODELS / f"{stem}_scheduler.json",
    }


def policy_sigmas(family: str, scheduler_config: dict, resolution: int, num_steps: int):
    """The policy's own schedule (FLUX.1-dev: the resolution-dependent dynamic shift) without loading
    it: ``fastcps.schedule.pipeline_sigmas`` reads only the scheduler config and the token count."""
    from fastcps.policies.families import family as family_of
    from fastcps.schedule import pipeline_sigmas

    shift = family_of(family).plan_facts().default_shift
    return pipeline_sigmas(scheduler_config, (resolution // 16) ** 2, num_steps, default_shift=shift)


def zero_section(cfg: RunConfig) -> dict:
    """``zero_optimization`` of the config's DeepSpeed JSON ({} when it has none)."""
    ds_path = Path(cfg.deepspeed_config)
    if not ds_path.is_file():
        raise ConfigError(f"DeepSpeed config {str(ds_path)!r} (config key `deepspeed_config`) not found")
    return json.loads(ds_path.read_text()).get("zero_optimization", {})


def lora_of(cfg: RunConfig) -> tuple | None:
    """(r, alpha, target modules) of the config's LoRA, the family's default targets when it names none."""
    lora = cfg.policy.lora
    if lora is None:
        return None
    targets = list(lora.target_modules) or list(family(cfg.policy.name).lora_targets)
    return (lora.r, float(lora.alpha), tuple(targets))


class Loader:
    """Builds (once per distinct shape) the measured Model of a config and its ZeRO settings.
    ``evaluate``: the trainer's eval on given parts (``fastcps.trainer.evaluate_with``), which the
    counted epoch runs on its stand-ins: passed in, so the plan does not import the trainer."""

    def __init__(self, cfg: RunConfig, transformer_config: Path | None = None, *, evaluate):
        self.facts = facts(cfg)
        self.evaluate = evaluate
        self.files = model_files(cfg)
        if transformer_config is not None:
            self.files["transformer"] = transformer_config
        for key in ("transformer", "vae", "scheduler"):
            if not self.files[key].is_file():
                raise ConfigError(
                    f"{key} config {str(self.files[key])!r} not found (from policy.pretrained = "
                    f"{cfg.policy.pretrained!r}); pass --model-config or a local pipeline folder"
                )
        self.zero_section = zero_section(cfg)
        self.zero = pc.zero_settings(self.zero_section)
        self.scheduler = json.loads(self.files["scheduler"].read_text())
        self._models: dict = {}

    def load_zero(self, stage: int, offload: bool = False) -> pc.Zero:
        z = pc.zero_settings(self.zero_section, stage)
        z.offload_optimizer = offload or z.offload_optimizer
        return z

    def model(self, cfg: RunConfig) -> pc.Model:
        from fastcps.plan import measure

        pol = cfg.policy
        if pol.resolution % 16:
            raise ConfigError(
                f"policy.resolution = {pol.resolution} must be a multiple of 16 (VAE x8, 2x2 patches)"
            )
        lora = lora_of(cfg)
        text = self.facts.text_tokens(pol.max_sequence_length)
        key = (lora, text, pol.resolution, pol.dtype)
        if key not in self._models:
            m = measure.meter(pol.name, str(self.files["transformer"]), pol.resolution, text, pol.dtype, lora)
            self._models[key] = self._describe(m, pol, text, lora)
        return self._models[key]

    def persistence_threshold(self, pol, params) -> int:
        """ZeRO-3's persistence threshold; the trainer keeps LoRA matrices whole under ZeRO-3
        (``fastcps.engine.keep_lora_whole``) unless the DeepSpeed JSON sets it."""
        threshold = self.zero.param_persistence_threshold
        if pol.lora is not None and "stage3_param_persistence_threshold" not in self.zero_section:
            threshold = max(threshold, max(p.numel() for p in params if p.requires_grad))
        return threshold

    def _describe(self, meter, pol, text: int, lora) -> pc.Model:
        from fastcps.plan import measure

        params = list(meter.model.parameters())
        threshold = self.persistence_threshold(pol, params)
        largest = max(
            sum(p.numel() for p in mod.parameters(recurse=False) if p.numel() >= threshold)
            for mod in meter.model.modules()
        )
        c, res, f = meter.config, pol.resolution, self.facts
        vae = (f, str(self.files["vae"]), res, pc.VAE_DTYPE)  # the policies decode in fp32
        return pc.Model(
            family=pol.name,
            params=sum(p.numel() for p in params),
            trained=sum(p.numel() for p in params if p.requires_grad),
            small=sum(p.numel() for p in params if p.numel() < threshold),
            largest_fetch=largest,
            meter_threshold=threshold,
            text_tokens=text,
            joint_dim=c["joint_attention_dim"],
            pooled_dim=c.get("pooled_projection_dim", 0),  # Qwen-Image has no pooled text vector
            latent_numel=f.latent_numel(c, res),
            vae_params=measure.vae_decode(*vae, 1)[0],
            meter=meter,
            vae_peak=lambda b: measure.vae_decode(*vae, b)[1],
            vae_flop=lambda b: b * measure.vae_decode(*vae, 1)[2],
            meter_lora=lora,
            sigmas=lambda n: policy_sigmas(pol.name, self.scheduler, res, n),
            text_encoder_params=local_text_encoder_params(pol.pretrained),
            evaluate=self.evaluate,
            facts=f,
        )


def local_text_encoder_params(pretrained: str) -> int | None:
    """Parameters of a local pipeline folder's text encoders (``text_encoder*/*.safetensors``, read from
    the files' headers: no weights load); None for a hub id or a folder without them (the plan then
    counts the published sizes, ``FamilyPlan.text_encoders``)."""
    from safetensors import safe_open

    folder = Path(pretrained) if pretrained else None
    if folder is None or not folder.is_dir():
        return None
    subfolders = sorted(d for d in folder.glob("text_encoder*") if d.is_dir())
    files = [sorted(d.glob("*.safetensors")) for d in subfolders]
    if not subfolders or not all(files):
        return None
    total = 0
    for f in (f for group in files for f in group):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                n = 1
                for d in fh.get_slice(k).get_shape():
                    n *= d
                total += n
    return total
