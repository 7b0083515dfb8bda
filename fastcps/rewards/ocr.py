"""``ocr``: does the image show the text the prompt quotes (the paper's OCR reward, arXiv 2509.05952)?

target = the text between the first pair of quotes in the prompt (``"..."``, also ``“...”``), or
``metadata[i]["text"]`` when given; target and recognized text are lower-cased with spaces removed;
d = edit distance between them (0 if the target is a substring of the recognized text),
n = len(target); reward = 1 - min(d, n) / n, in [0, 1]. Recognized text = the concatenation, in the
engine's reading order, of every recognized line with confidence > ``min_score``.

Engines (config ``args.engine``):

- ``"rapidocr"`` (default): RapidOCR runs PaddleOCR's PP-OCR detection/recognition models exported to
  ONNX, with onnxruntime. Its wheel ships the models, so it works offline and without paddlepaddle —
  this is why it is the default (``pip install 'fastcps[ocr]'``). The models are the same family as
  PaddleOCR's but not bit-identical to the paper's PaddleOCR version, so absolute scores can differ a
  little from the paper's.
- ``"paddleocr"``: PaddleOCR itself (what the paper used; ``pip install 'fastcps[paddleocr]'``, downloads
  its models on first use). Works with PaddleOCR 2.x (``ocr(img, cls=False)``) and 3.x (``predict``).

Other args: ``min_score`` (0.0: keep every line the engine returns, as the reference did),
``params`` (extra RapidOCR params, e.g. ``{"EngineConfig.onnxruntime.intra_op_num_threads": 4}``),
``lang`` (PaddleOCR language, "en"), ``use_gpu`` (PaddleOCR 2.x, False).
The OCR engines run on CPU and see the images' 8-bit levels, ``(images * 255).round()`` as flow_grpo's
``ocr_score`` makes them: RapidOCR as a PIL image (it converts to its BGR itself), PaddleOCR as the RGB
array flow_grpo hands it (flow_grpo/ocr.py converts nothing; PaddleOCR reads arrays as BGR, so flow_grpo
scores channel-swapped images, and so do we with this engine). The reward is returned on the images'
device as fp32.
"""

from __future__ import annotations

import re
from typing import Literal

import torch

from fastcps.rewards import RewardArgs
from fastcps.rewards._util import check_inputs, to_pil, to_uint8_hwc

__all__ = ["OcrReward", "edit_distance", "normalize_text", "ocr_score", "quoted_text"]

_QUOTED = re.compile(r"[\"“”„](.*?)[\"“”]", re.DOTALL)


def normalize_text(s: str) -> str:
    return "".join(s.split()).lower()


def quoted_text(prompt: str) -> str | None:
    m = _QUOTED.search(prompt)
    return m.group(1) if m else None


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_score(recognized: str, target: str) -> float:
    """1 - min(d, n)/n on normalized strings; d = 0 when the target is a substring."""
    t, r = normalize_text(target), normalize_text(recognized)
    if not t:
        raise ValueError("ocr reward: the quoted target text is empty")
    d = 0 if t in r else edit_distance(r, t)
    return 1.0 - min(d, len(t)) / len(t)


class OcrReward:
    """``(images [B,3,H,W] in [0,1], prompts, metadata) -> Tensor[B]`` in [0, 1].

    Args (config ``rewards[].args``): ``engine`` ("rapidocr" | "paddleocr"), ``min_score`` (float),
    ``params`` (dict, RapidOCR), ``lang`` (str, PaddleOCR), ``use_gpu`` (bool, PaddleOCR 2.x).
    """

    name = "ocr"

    class Args(RewardArgs):
        engine: Literal["rapidocr", "paddleocr"] = "rapidocr"
        """OCR engine."""
        min_score: float = 0.0
        """Lines recognised with this confidence or less are dropped (0.0 keeps every line)."""
        params: dict | None = None
        """Keyword arguments of RapidOCR."""
        lang: str = "en"
        """PaddleOCR's language."""
        use_gpu: bool = False
        """PaddleOCR 2.x on the GPU."""

    def __init__(
        self,
        engine: str = "rapidocr",
        min_score: float = 0.0,
        params: dict | None = None,
        lang: str = "en",
        use_gpu: bool = False,
    ):
        if engine not in ("rapidocr", "paddleocr"):
            raise ValueError(
                f"reward 'ocr': config key rewards[].args.engine must be 'rapidocr' or "
                f"'paddleocr', got {engine!r}"
            )
        self.engine, self.min_score, self.params = engine, float(min_score), dict(params or {})
        self.lang, self.use_gpu = lang, use_gpu
        self._ocr = None

    @classmethod
    def files(cls, args: dict) -> list:
        """RapidOCR: nothing (its wheel ships the ONNX models of its default configuration). PaddleOCR
        downloads its own models on first use: 2.x from Baidu's BOS (paddleocr.bj.bcebos.com) into
        ~/.paddleocr, 3.x through PaddleX (Hugging Face, ModelScope, AIStudio or BOS) into
        ~/.paddlex/official_models; fetching builds the engine once, as flow_grpo's README says to."""
        from fastcps.fetch.items import EngineModels

        a = cls.Args.model_validate(args)
        if a.engine == "rapidocr":
            return []
        return [
            EngineModels(
                "PaddleOCR detection and recognition models",
                "engine",
                "~/.paddleocr (2.x) or ~/.paddlex/official_models (3.x), on every node",
                build=lambda: cls(**args)._load(),
            )
        ]

    def load(self, device=None) -> None:
        """Build the OCR engine now (it runs on the CPU), not at the first call."""
        self._load()

    # -- engines -------------------------------------------------------------------------------
    def _load(self):
        if self._ocr is not None:
            return self._ocr
        if self.engine == "rapidocr":
            try:
                from rapidocr import RapidOCR
            except ImportError as err:
                raise ImportError(
                    "reward 'ocr' with engine 'rapidocr' needs rapidocr and onnxruntime: "
                    "pip install 'fastcps[ocr]'"
                ) from err
            params = {
                "Global.use_cls": False,
                "Global.text_score": self.min_score,
                "Global.log_level": "warning",
            }
            params.update(self.params)
            self._ocr = RapidOCR(params=params)
        else:
            try:
                from paddleocr import PaddleOCR
            except ImportError as err:
                raise ImportError(
                    "reward 'ocr' with engine 'paddleocr' needs PaddleOCR: "
                    "pip install 'fastcps[paddleocr]' (or use engine: rapidocr, which "
                    "runs offline)"
                ) from err
            try:  # PaddleOCR 2.x
                self._ocr = PaddleOCR(
                    use_angle_cls=False, lang=self.lang, use_gpu=self.use_gpu, show_log=False
                )
            except (TypeError, ValueError):  # 3.x dropped these arguments
                self._ocr = PaddleOCR(
                    lang=self.lang,
                    use_textline_orientation=False,
                    use_doc_orientation_classify=False,
                    use_doc_unwarping=False,
                )
        return self._ocr

    def recognize(self, image: torch.Tensor) -> str:
        """Recognized text of one image [3, H, W] in [0, 1] (raw, before normalization)."""
        ocr = self._load()
        if self.engine == "rapidocr":
            out = ocr(to_pil(image))  # PIL input: RapidOCR converts RGB to its BGR itself
            txts, scores = getattr(out, "txts", None) or (), getattr(out, "scores", None) or ()
            return "".join(t for t, s in zip(txts, scores) if s > self.min_score)
        # the RGB array as it is, as flow_grpo's OcrScorer hands it to PaddleOCR (flow_grpo/ocr.py:
        # ``self.ocr.ocr(img, cls=False)`` on ``(images * 255).round()``'s HWC uint8, no BGR conversion)
        arr = to_uint8_hwc(image)
        if hasattr(ocr, "predict") and not hasattr(ocr, "use_angle_cls"):
            texts = []
            for res in ocr.predict(arr):
                r = res.json.get("res", res) if hasattr(res, "json") else res
                texts += [t for t, s in zip(r["rec_texts"], r["rec_scores"]) if s > self.min_score]
            return "".join(texts)
        result = ocr.ocr(arr, cls=False)
        lines = result[0] if result and result[0] else []
        return "".join(line[1][0] for line in lines if line[1][1] > self.min_score)

    def target(self, prompt: str, meta: dict | None) -> str:
        if meta and meta.get("text"):
            return str(meta["text"])
        t = quoted_text(prompt)
        if t is None or not normalize_text(t):
            raise ValueError(
                f"reward 'ocr': prompt {prompt!r} quotes no text (put the text in \"...\" "
                "or give metadata['text'])"
            )
        return t

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None):
        check_inputs("ocr", images, prompts, metadata)
        metadata = metadata if metadata is not None else [None] * len(prompts)
        targets = [self.target(p, m) for p, m in zip(prompts, metadata)]
        scores = [ocr_score(self.recognize(img), t) for img, t in zip(images, targets)]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)
