"""Scorers, the model inside a reward-model server: each has ``score_batch(items) -> list[float | None]``
(`SCORERS` maps a config's ``type`` to its scorer):

- ``type = "classifier"`` (`ClassifierScorer`): a transformers ``AutoModelForSequenceClassification``; the text is
  the ``template`` rendered with the sample (or, without one, the tokenizer's chat template over a user turn
  ``prompt`` and an assistant turn ``completion``); the score is the logit of ``label`` (or its probability:
  softmax over the labels, sigmoid for a one-logit model).
- ``type = "judge"`` (`JudgeScorer`): a vLLM engine (`rollout.engine.VLLMEngine`, the rollout engine's settings: on
  CPU eager, in-process, a KV cache sized in bytes) reads the ``template`` rendered with ``{prompt}``,
  ``{completion}`` and the sample's columns (``{answer}``, ...), as one user turn of its chat template, and answers
  in at most ``max_tokens`` tokens; `VerdictParser` turns the answer into a score (a regex with one capture group,
  read as a number or looked up in ``verdicts``, e.g. ``{yes = 1.0, no = 0.0}``). An answer it cannot parse scores
  None. It steps its engine itself (`rollout.engine.VLLMEngine.generate_abortable`), so an item whose caller gave
  up (timed out, cancelled) is aborted in vLLM at the next engine step rather than generated for no one
  (``abortable``: the server then hands ``score_batch`` a callable naming those items).

torch, transformers and vLLM are imported inside the scorers. Left out on purpose: vLLM's pooling runner for
classifiers (the transformers forward is what runs here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from rollout.reward_models.config import ClassifierRewardModelConfig, JudgeRewardModelConfig
from rollout.reward_models.text import VerdictParser, _text, render_template


class ClassifierScorer:
    """Scores items with a sequence-classification model (see the module docstring).

    Args:
        cfg: `ClassifierRewardModelConfig`.
        model_path: local HF model dir.

    Raises:
        ValueError: ``cfg.label`` is not a label of the model (or is needed and unset).
    """

    def __init__(self, cfg: ClassifierRewardModelConfig, model_path: str) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=getattr(torch, cfg.dtype))
        self.model.eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.index = label_index(self.model.config, cfg.label, cfg.name)

    def text(self, item: dict[str, Any]) -> str:
        """The text scored for ``item`` (``prompt``, ``completion`` and columns)."""
        prompt, completion = _text(item["prompt"]), _text(item["completion"])
        if self.cfg.template is not None:
            return render_template(self.cfg.template, prompt, completion, item.get("columns"))
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                                       {"role": "assistant", "content": completion}], tokenize=False)
        return prompt + completion

    def score_batch(self, items: list[dict[str, Any]]) -> list[float | None]:
        """One padded forward over ``items``; returns one score per item (see the module docstring)."""
        import torch

        enc = self.tokenizer([self.text(it) for it in items], padding=True, truncation=True,
                             max_length=self.cfg.max_length, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            logits = self.model(**enc).logits.float()  # [B, num_labels]
        if self.cfg.output == "probability":
            logits = torch.sigmoid(logits) if logits.shape[-1] == 1 else torch.softmax(logits, dim=-1)
        return [float(v) for v in logits[:, self.index]]


def label_index(config: Any, label: int | str | None, name: str = "") -> int:
    """The logit index of ``label`` in a classification model ``config`` (``num_labels``, ``id2label``).

    Raises:
        ValueError: an index out of range, an unknown label name, or None for a model with several labels.
    """
    n = int(config.num_labels)
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    where = f"reward_models {name!r}: " if name else ""
    if label is None:
        if n == 1:
            return 0
        raise ValueError(f"{where}the model has {n} labels {id2label}; set label = <index or name> to score one")
    if isinstance(label, int):
        if not 0 <= label < n:
            raise ValueError(f"{where}label = {label} is out of range for a model with {n} labels {id2label}")
        return label
    by_name = {v: k for k, v in id2label.items()}
    if label not in by_name:
        raise ValueError(f"{where}label = {label!r} is not one of the model's labels {sorted(by_name)}")
    return by_name[label]


class JudgeScorer:
    """Scores items with a generative judge on a `rollout.engine.VLLMEngine` (see the module docstring).

    Args:
        cfg: `JudgeRewardModelConfig`.
        model_path: local HF model dir.
    """

    def __init__(self, cfg: JudgeRewardModelConfig, model_path: str) -> None:
        from rollout.engine import VLLMEngine

        self.cfg = cfg
        self.parse = VerdictParser(cfg.pattern, cfg.verdicts, cfg.match)
        self.engine = VLLMEngine(model_path, cfg.dtype, cfg.kv_cache_memory_bytes, cfg.max_model_len, cfg.seed,
                                 gpu_memory_utilization=cfg.gpu_memory_utilization)
        self.tokenizer = self.engine.tokenizer
        self.last_unparsed = ""  # the latest answer without a verdict, for `RewardModelServer.stats`
        self.aborted = 0  # items aborted in the engine because their caller gave up, since start

    abortable = True  # score_batch takes ``abandoned`` (`RewardModelServer`)

    def unfinished(self) -> int:
        """Requests its engine holds unfinished (0 between batches: nothing is left generating)."""
        return self.engine.unfinished_requests()

    def prompt_ids(self, item: dict[str, Any]) -> list[int]:
        """Token ids of the judge's prompt about ``item``."""
        text = render_template(self.cfg.template, _text(item["prompt"]), _text(item["completion"]),
                               item.get("columns"))
        if self.cfg.chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                      tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def score_batch(self, items: list[dict[str, Any]],
                    abandoned: Callable[[], Iterable[int]] | None = None) -> list[float | None]:
        """One engine call over ``items``; an item whose prompt leaves no room for the answer in
        ``max_model_len``, or whose answer has no verdict, scores None, as does one that ``abandoned()`` (indices
        into ``items``, polled every engine step) names while it generates: it is aborted in the engine
        (counted in ``aborted``)."""
        ids = [self.prompt_ids(it) for it in items]
        room = self.cfg.max_model_len - self.cfg.max_tokens
        fits = [i for i, p in enumerate(ids) if len(p) <= room]
        out: list[float | None] = [None] * len(items)
        if fits:
            where = {i: k for k, i in enumerate(fits)}

            def gone() -> list[int]:
                return [where[i] for i in (abandoned() if abandoned is not None else ()) if i in where]

            done, aborted = self.engine.generate_abortable([ids[i] for i in fits], self.cfg.max_tokens,
                                                           self.cfg.temperature, self.cfg.seed, gone)
            self.aborted += aborted
            for i, c in zip(fits, done):
                if c is None:
                    continue
                out[i] = self.parse(c.text)
                if out[i] is None:
                    self.last_unparsed = c.text[:200]
        return out


SCORERS: dict[str, Callable[[Any, str], Any]] = {"classifier": ClassifierScorer, "judge": JudgeScorer}
"""``type`` -> scorer class ``(cfg, model_path)`` with ``score_batch(items) -> list[float | None]``."""
