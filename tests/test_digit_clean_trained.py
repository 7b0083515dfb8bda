"""The ``digit_clean_trained`` reward (issue 19): a digit classifier trained on clean images only, which
scores residual pixel noise down the way a learned preference model does, unlike ``digit``'s classifier
(trained with pixel-noise augmentation)."""

from __future__ import annotations

import pytest
import torch

from fastcps.rewards import build_reward
from fastcps.rewards.digit import CLEAN_CLASSIFIER, DEFAULT_CLASSIFIER, DigitCleanTrainedReward
from fastcps.toy.digits import load_split, prompt_for

NOISE = 0.4  # std of the added Gaussian noise, in the classifier's [-1, 1] pixel space
MIN_DROP = 0.10  # the clean-trained classifier's mean score drop at NOISE must be at least this


def _heldout(noise: float = 0.0):
    """The toy's 360 held-out digits (never trained on) as reward inputs, optionally with pixel noise."""
    x, y = load_split("heldout")
    if noise:
        x = x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    images = ((x + 1.0) * 0.5).clamp(0.0, 1.0).repeat(1, 3, 1, 1)
    return images, [prompt_for(int(d)) for d in y], [{"digit": int(d)} for d in y]


def _drop(reward) -> tuple[torch.Tensor, torch.Tensor]:
    clean = reward(*_heldout())
    noisy = reward(*_heldout(NOISE))
    return clean, noisy


def test_loads_from_the_registry_with_its_metadata():
    reward = build_reward("digit_clean_trained")
    assert isinstance(reward, DigitCleanTrainedReward) and reward.name == "digit_clean_trained"
    images, prompts, meta = _heldout()
    r = reward(images[:8], prompts[:8], meta[:8])
    assert r.shape == (8,) and r.dtype == torch.float32 and bool(((r >= 0) & (r <= 1)).all())
    assert CLEAN_CLASSIFIER.is_file()
    assert float(reward.metadata["heldout_accuracy"]) >= 0.95
    assert "no pixel noise" in reward.metadata["augmentation"]
    assert "--clean" in reward.metadata["command"]


def test_deterministic():
    reward = build_reward("digit_clean_trained")
    images, prompts, meta = _heldout(0.2)
    a = reward(images, prompts, meta)
    b = build_reward("digit_clean_trained")(images.clone(), prompts, meta)
    assert torch.equal(a, b)


def test_clean_digits_score_above_the_same_digits_with_noise():
    clean, noisy = _drop(build_reward("digit_clean_trained"))
    assert float(clean.mean()) > 0.9  # it recognises real digits
    assert float(clean.mean() - noisy.mean()) >= MIN_DROP
    assert float((clean > noisy).float().mean()) > 0.8  # per image, not just on average


def test_the_noise_check_separates_it_from_the_noise_augmented_digit_classifier():
    """The same check with ``digit``'s weights (trained with pixel noise) fails: the margin measures what
    the clean training changed, not something any classifier would pass."""
    clean_trained = _drop(build_reward("digit_clean_trained"))
    augmented = _drop(DigitCleanTrainedReward(weights=DEFAULT_CLASSIFIER))
    drop_clean = float(clean_trained[0].mean() - clean_trained[1].mean())
    drop_aug = float(augmented[0].mean() - augmented[1].mean())
    assert drop_aug < MIN_DROP <= drop_clean
    assert drop_clean > 1.5 * drop_aug


def test_bad_arguments_name_the_reward():
    with pytest.raises(ValueError, match="digit_clean_trained.*bad `args`"):
        build_reward("digit_clean_trained", {"bogus": 1})
    reward = build_reward("digit_clean_trained")
    images, prompts, meta = _heldout()
    with pytest.raises(
        ValueError, match=r"digit_clean_trained reward expects images \[B, 3, H, W\].*\(4, 2, 16, 16\)"
    ):
        reward(torch.zeros(4, 2, 16, 16), prompts[:4], meta[:4])
    with pytest.raises(ValueError, match="digit_clean_trained reward got 4 images but 3 prompts"):
        reward(images[:4], prompts[:3], meta[:3])
    missing = DigitCleanTrainedReward(weights="/nonexistent/clean.safetensors")
    with pytest.raises(FileNotFoundError, match=r"digit_clean_trained classifier weights not found.*--clean"):
        missing(images[:2], prompts[:2], meta[:2])
