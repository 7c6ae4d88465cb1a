"""Rewards from Hugging Face sequence-classification models (by hub name or local folder).

The paper's reward models differ in which logit is the reward and how the text is presented:

=========================================  =====  ===========================================
model                                      logit  input
=========================================  =====  ===========================================
Ray2333/gpt2-large-helpful-reward_model    0      "\\n\\nHuman: {prompt} \\n\\nAssistant: {response}"
Ray2333/gpt2-large-harmless-reward_model   0      same
mohameddhiab/humor-no-humor                1      response only
Tristan/gpt2_reward_summarization          0      text pair (post, summary)
CogComp/bart-faithful-summary-detector     1      text pair (summary, article): summary first
=========================================  =====  ===========================================
"""

from __future__ import annotations

import torch

from .base import Reward

INPUT_FORMATS = ("response", "prompt_response", "hh", "pair", "pair_reversed")


def article_of(prompt: str) -> str:
    """The source text of a summarization prompt: the part after the first blank line, if any."""
    head, sep, body = prompt.partition("\n\n")
    return body if sep and head.lower().startswith("summarize") else prompt


def build_inputs(tokenizer, prompts: list[str], responses: list[str], input_format: str, max_length: int) -> dict:
    """Tokenize a batch the way ``input_format`` says (see module docstring)."""
    kw = dict(padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    if input_format == "response":
        return tokenizer(responses, **kw)
    if input_format == "prompt_response":
        return tokenizer([f"{p}\n{r}" for p, r in zip(prompts, responses)], **kw)
    if input_format == "hh":
        return tokenizer([f"\n\nHuman: {p} \n\nAssistant: {r}" for p, r in zip(prompts, responses)], **kw)
    if input_format == "pair":
        return tokenizer([article_of(p) for p in prompts], responses, **kw)
    if input_format == "pair_reversed":
        return tokenizer(responses, [article_of(p) for p in prompts], **kw)
    raise ValueError(f"unknown input_format {input_format!r}; choose one of {', '.join(INPUT_FORMATS)}")


def make_hf_classifier_reward(
    model: str,
    *,
    name: str | None = None,
    output_index: int = 0,
    input_format: str = "prompt_response",
    description: str | None = None,
    max_length: int = 512,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Reward:
    """A :class:`Reward` reading logit ``output_index`` of a sequence-classification model.

    ``model`` goes to ``from_pretrained`` unchanged: a hub id or a local folder, one code path.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..placement import placement_of

    if input_format not in INPUT_FORMATS:
        raise ValueError(f"unknown input_format {input_format!r}; choose one of {', '.join(INPUT_FORMATS)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
        place = placement_of(device, dtype)
        clf = AutoModelForSequenceClassification.from_pretrained(model, dtype=place.dtype).to(place.device).eval()
    except OSError as err:
        raise ValueError(f"could not load reward model {model!r} (hub id or local folder): {err}") from err
    n_labels = int(clf.config.num_labels)
    if not 0 <= output_index < n_labels:
        raise ValueError(f"reward model {model!r} has {n_labels} outputs; output_index {output_index} is out of range")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if clf.config.pad_token_id is None:
        clf.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"

    @torch.no_grad()
    def score(prompts: list[str], responses: list[str]) -> list[float]:
        enc = build_inputs(tokenizer, prompts, responses, input_format, max_length).to(place.device)
        return clf(**enc).logits[:, output_index].float().tolist()

    return Reward(
        name=name or f"hf:{model}#{output_index}",
        description=description or f"logit {output_index} of sequence classifier {model} ({input_format} input)",
        value_range=(float("-inf"), float("inf")),
        higher_is_better=True,
        fn=score,
        batch_size=batch_size,
    )
