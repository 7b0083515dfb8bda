"""``digit``: the toy's verifiable reward, the probability a small CNN gives the prompt's digit.

The classifier (``fastcps/assets/toy_digits_classifier.safetensors``, ~0.1M parameters) is trained
by ``python -m fastcps.toy.train_classifier`` on the toy's train split with light augmentation
(shifts, small rotations, blur, pixel noise) so that it scores generated images sensibly; its
held-out accuracy is stored in the file's metadata (``heldout_accuracy``).

Reward = softmax(classifier(image))[digit], in [0, 1]. The digit comes from ``metadata[i]['digit']``
(or ``'label'``) when given, else is parsed from the prompt ("a handwritten digit seven", "the number 7").

``digit_clean_trained`` (``DigitCleanTrainedReward``): the same reward with a classifier of the same
architecture trained on clean images only (geometric augmentation, no pixel noise, no blur:
``python -m fastcps.toy.train_classifier --clean`` ->
``fastcps/assets/toy_digits_classifier_clean.safetensors``). The ``digit`` classifier saw pixel noise
in training; this one, like a learned preference model trained on clean images (PickScore, HPSv2),
never did, and scores added pixel noise down about twice as strongly (docs/results.md, part 3b; the
small residual noise of the toy's 8-step SDE samples costs about the same under both).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastcps.rewards import RewardArgs

__all__ = [
    "CLEAN_CLASSIFIER",
    "DEFAULT_CLASSIFIER",
    "DigitCNN",
    "DigitCleanTrainedReward",
    "DigitReward",
    "load_classifier",
    "to_classifier_input",
]

DEFAULT_CLASSIFIER = Path(__file__).resolve().parent.parent / "assets" / "toy_digits_classifier.safetensors"
CLEAN_CLASSIFIER = (
    Path(__file__).resolve().parent.parent / "assets" / "toy_digits_classifier_clean.safetensors"
)


class DigitCNN(nn.Module):
    """[B, 1, 16, 16] in [-1, 1] -> logits [B, 10]."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8×8
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4×4
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(2 * w * 16, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_classifier_input(images: torch.Tensor, reward: str = "digit") -> torch.Tensor:
    """Images [B, 3 or 1, H, W] in [0, 1] -> [B, 1, 16, 16] in [-1, 1] (gray = channel mean).
    ``reward`` names the reward in the error message."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"{reward} reward expects images [B, 3, H, W] (or [B, 1, H, W]) in [0, 1], "
            f"got shape {tuple(images.shape)}"
        )
    x = images.float().mean(dim=1, keepdim=True)
    if x.shape[-2:] != (16, 16):
        x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    return x * 2.0 - 1.0


def load_classifier(
    path: str | Path | None = None,
    device="cpu",
    default: Path = DEFAULT_CLASSIFIER,
    reward: str = "digit",
    make: str = "python -m fastcps.toy.train_classifier",
) -> tuple[DigitCNN, dict]:
    """``path`` or ``default``; ``reward`` and ``make`` (the command that builds ``default``) name
    the reward and the fix in the error message."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path else default
    if not path.is_file():
        raise FileNotFoundError(
            f"{reward} classifier weights not found at {str(path)!r}; set the reward's `weights` to an "
            f"existing file or make the shipped one with `{make}`."
        )
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    model = DigitCNN(**json.loads(meta.get("config", "{}")))
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.to(device).eval().requires_grad_(False), meta


class DigitReward:
    """``(images [B,3,H,W] in [0,1], prompts, metadata) -> Tensor[B]`` in [0, 1] (fp32, on CPU/device
    of the images). Loads the classifier on first call."""

    name = "digit"
    default_weights = DEFAULT_CLASSIFIER

    class Args(RewardArgs):
        weights: str | None = None
        """Classifier weights (.safetensors); None = the shipped one."""
        device: str | None = None
        """Device of the classifier; None = the images' device."""

    make = "python -m fastcps.toy.train_classifier"

    def __init__(self, weights: str | Path | None = None, device=None):
        self.weights = weights
        self.device = device
        self._model: DigitCNN | None = None
        self.metadata: dict = {}

    @classmethod
    def files(cls, args: dict) -> list:
        """The classifier's weights: ``weights``, or the one fastcps ships."""
        from fastcps.fetch.items import LocalPath

        weights = cls.Args.model_validate(args).weights
        return [LocalPath(str(weights or cls.default_weights), "weights", f"{cls.name} classifier")]

    def load(self, device) -> None:
        """Load the classifier now, not at the first call."""
        self._load(self.device or device)

    def _load(self, device) -> DigitCNN:
        if self._model is None:
            self._model, self.metadata = load_classifier(
                self.weights, device, self.default_weights, self.name, self.make
            )
        return self._model.to(device)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax over the 10 digits, [B, 10]."""
        device = self.device or images.device
        with torch.no_grad():
            model = self._load(device)
            return model(to_classifier_input(images.to(device), self.name)).float().softmax(dim=-1)

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None
    ) -> torch.Tensor:
        from fastcps.toy.digits import digit_of

        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name} reward got {images.shape[0]} images but {len(prompts)} prompts")
        metadata = metadata if metadata is not None else [None] * len(prompts)
        target = torch.tensor([digit_of(p, m) for p, m in zip(prompts, metadata)], dtype=torch.long)
        probs = self.probabilities(images)
        return probs.gather(1, target.to(probs.device)[:, None])[:, 0]


class DigitCleanTrainedReward(DigitReward):
    """``digit_clean_trained``: ``DigitReward`` with the classifier trained on clean images only
    (``fastcps/assets/toy_digits_classifier_clean.safetensors``), which penalises pixel noise more."""

    name = "digit_clean_trained"
    default_weights = CLEAN_CLASSIFIER
    make = "python -m fastcps.toy.train_classifier --clean"
