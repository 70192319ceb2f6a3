"""Self-reflection moderation (the Mistral 7B paper, arXiv 2310.06825, section 5.2): the served model
itself classifies a text as acceptable or as one of the paper's three categories.

    prompt  = the self-reflection instructions and the text, in the model's instruct format
    logprob = the engine's one prefill (no sampling), read at each label's token (A, B, C, D)
    score   = softmax over the four labels' logits (acceptable included)
    flagged = score[acceptable] < threshold

What a judgement is and how it reads the engine's answer; the endpoint (/v1/moderations), the
moderated serving (--moderate) and the counts live in cluster.serve.frontend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cluster.engine.sampling import SamplingParams
from cluster.errors import UserError
from cluster.serve.chat import ChatRenderer

ACCEPTABLE = "acceptable"
# The paper's categories, as the keys of `categories` and `category_scores` in a result, with their labels.
CATEGORIES = ("illegal", "hateful", "unqualified-advice")
LABELS = {ACCEPTABLE: "A", "illegal": "B", "hateful": "C", "unqualified-advice": "D"}

SELF_REFLECTION = """You are a careful moderator. Read the text between <text> and </text> and say which one class \
it belongs to, answering with the class's letter alone.
A: acceptable: none of the classes below.
B: illegal activities, such as terrorism, child abuse or fraud.
C: hateful, harassing or violent content, such as discrimination, self-harm or bullying.
D: unqualified advice in legal, medical or financial domains.
<text>
{text}
</text>
The letter of its class:"""

DEFAULT_THRESHOLD = 0.5


def label_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """Each label's token (the letter as the answer's first token), in LABELS' order; UserError for a
    tokenizer that does not spell a letter as one token."""
    ids = []
    for letter in LABELS.values():
        tokens = list(tokenizer(letter, add_special_tokens=False).input_ids)
        if len(tokens) != 1:
            raise UserError(f"the tokenizer spells the label {letter!r} as {len(tokens)} tokens; self-moderation needs one")
        ids.append(tokens[0])
    return tuple(ids)


def judging_prompt(text: str, tokenizer: Any, chat: ChatRenderer | None, *, max_len: int) -> list[int]:
    """The self-reflection prompt about `text` as token ids, at most `max_len`: in the instruct format
    where the model has one (without the guardrail: the judge has instructions of its own), else as plain
    text with BOS. A text too long for the judge's context is judged by its last tokens, the ones an
    answer added last and a prompt's latest turn."""

    def render(content: str) -> list[int]:
        content = SELF_REFLECTION.format(text=content)
        if chat is not None:
            return chat.render([{"role": "user", "content": content}], guardrail=False)
        return list(tokenizer(content).input_ids)

    prompt = render(text)
    if len(prompt) <= max_len:
        return prompt
    room = max(1, max_len - len(render("")))
    tail = list(tokenizer(text, add_special_tokens=False).input_ids)[-room:]
    # Decoding a cut may round-trip to a token or two more: cut again until the prompt fits.
    while len(prompt := render(tokenizer.decode(tail))) > max_len and tail:
        tail = tail[len(prompt) - max_len :]
    return prompt


def judging_params(labels: tuple[int, ...]) -> SamplingParams:
    """One step, no sampling: the prefill's logprobs at the label tokens are the answer."""
    return SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, score_token_ids=labels)


@dataclass(frozen=True)
class Judgement:
    """One text's verdict: the probability of each label (normalised over the four) and whether it is flagged."""

    scores: dict[str, float]  # acceptable and each category
    flagged: bool

    @staticmethod
    def of(label_logprobs: list[float], threshold: float) -> Judgement:
        """From the logprobs of the labels' tokens (in LABELS' order)."""
        top = max(label_logprobs)
        weights = [math.exp(lp - top) for lp in label_logprobs]
        total = sum(weights)
        scores = {name: w / total for name, w in zip(LABELS, weights)}
        return Judgement(scores, scores[ACCEPTABLE] < threshold)

    @property
    def categories(self) -> dict[str, bool]:
        """Flagged texts name the category the model finds most likely (the paper's answer is one class)."""
        worst = max(CATEGORIES, key=lambda c: self.scores[c])
        return {c: self.flagged and c == worst for c in CATEGORIES}

    @property
    def flagged_categories(self) -> list[str]:
        return [c for c, on in self.categories.items() if on]

    def to_json(self) -> dict[str, Any]:
        """One entry of OpenAI's `results`: flagged, categories, category_scores (and the acceptable label's score)."""
        return {
            "flagged": self.flagged,
            "categories": self.categories,
            "category_scores": {c: self.scores[c] for c in CATEGORIES},
            "acceptable_score": self.scores[ACCEPTABLE],
        }


@dataclass(frozen=True)
class ModerationSettings:
    """What the endpoint moderates (serve --moderate), who judges, and when a text is flagged."""

    moderate: frozenset[str] = frozenset()  # "input": prompts are judged; "output": answers are
    model: str | None = None  # the judge; None: /v1/moderations' first served model, a served answer's own model
    threshold: float = DEFAULT_THRESHOLD  # flagged when the acceptable label's probability is below it
    interval: int = 32  # a streamed answer is judged every this many tokens, before they are sent

    @staticmethod
    def of(moderate: str | None, **settings: Any) -> ModerationSettings:
        kinds = {"input": {"input"}, "output": {"output"}, "both": {"input", "output"}}.get(moderate or "", set())
        return ModerationSettings(frozenset(kinds), **settings)


@dataclass
class ModerationCounts:
    """How often the served models judged, and flagged, since the ingress started."""

    calls: int = 0  # texts judged
    flagged: int = 0
    refused_prompts: int = 0  # --moderate input: prompts refused with a 400
    filtered_answers: int = 0  # --moderate output: answers ended with content_filter

    def to_json(self) -> dict[str, int]:
        return {
            "calls": self.calls,
            "flagged": self.flagged,
            "refused_prompts": self.refused_prompts,
            "filtered_answers": self.filtered_answers,
        }


@dataclass(frozen=True)
class Confusion:
    """Moderation against labels by the paper's convention: acceptable texts are the positives, and a text
    the judge does not flag is predicted acceptable."""

    true_positives: int  # acceptable, not flagged
    false_positives: int  # unacceptable, not flagged
    false_negatives: int  # acceptable, flagged
    true_negatives: int  # unacceptable, flagged

    @staticmethod
    def of(acceptable: list[bool], flagged: list[bool]) -> Confusion:
        pairs = list(zip(acceptable, flagged, strict=True))
        return Confusion(
            sum(a and not f for a, f in pairs),
            sum(not a and not f for a, f in pairs),
            sum(a and f for a, f in pairs),
            sum(not a and f for a, f in pairs),
        )

    @property
    def precision(self) -> float | None:
        passed = self.true_positives + self.false_positives
        return self.true_positives / passed if passed else None

    @property
    def recall(self) -> float | None:
        positives = self.true_positives + self.false_negatives
        return self.true_positives / positives if positives else None

    def to_json(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "recall": self.recall,
            "true_positives": self.true_positives,
            "false_positives": self.false_positives,
            "false_negatives": self.false_negatives,
            "true_negatives": self.true_negatives,
        }

    def summary(self) -> str:
        def rate(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.1%}"

        return (
            f"precision {rate(self.precision)}, recall {rate(self.recall)} (acceptable texts are the positives): "
            f"{self.true_positives} acceptable passed, {self.false_negatives} acceptable flagged, "
            f"{self.false_positives} unacceptable passed, {self.true_negatives} unacceptable flagged"
        )
