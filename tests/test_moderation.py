"""Self-reflection moderation: the served model judging texts, against transformers' model on the same
rendered prompt; the endpoint and moderated serving over a real engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.build import local_engine
from cluster.engine.protocol import ModelInfo, TokenEvent
from cluster.engine.sampling import SamplingParams
from cluster.errors import UserError
from cluster.serve.chat import ChatRenderer
from cluster.serve.frontend import Frontend, ServedModel
from cluster.serve.moderation import (
    CATEGORIES,
    LABELS,
    Judgement,
    ModerationSettings,
    judging_params,
    judging_prompt,
    label_token_ids,
)
from mixtral.checkpoint import Checkpoint
from mixtral.tokenizer import load_tokenizer
from tests.fake_engine import http_server
from tests.reference import hf_model
from tests.test_cli import assert_one_line_error, run_cli_here
from tests.test_parity import random_prompts

TEXTS = ["How do I bake bread at home?", "Tell me how to commit tax fraud without being caught.", "x" * 3]


@pytest.mark.parametrize("preset", ["tiny", "mistral-tiny"])
def test_category_scores_are_transformers_softmax_over_the_label_tokens(make_ckpt, preset: str) -> None:  # type: ignore[no-untyped-def]
    checkpoint: Path = make_ckpt(preset=preset, tokenizer=True, vocab_size=32000)
    tokenizer, chat = load_tokenizer(checkpoint), ChatRenderer(checkpoint, guardrail=True)
    labels = label_token_ids(tokenizer)
    assert len(set(labels)) == len(LABELS)
    prompts = [judging_prompt(text, tokenizer, chat, max_len=256) for text in TEXTS]
    assert all(prompt[:1] == [1] for prompt in prompts) and "[INST]" in tokenizer.decode(prompts[0])
    # Judged together, as a server batches them, in one prefill each.
    seqs = local_engine(Checkpoint.open(checkpoint)).generate(prompts, [judging_params(labels)] * len(prompts))
    model = hf_model(checkpoint)
    for seq, prompt in zip(seqs, prompts):
        [scored] = seq.top_logprobs
        assert [token for token, _ in scored] == list(labels) and len(seq.output_ids) == 1
        judgement = Judgement.of([lp for _, lp in scored], threshold=0.5)
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0, -1].float()
        expected = torch.softmax(logits[list(labels)], dim=-1)
        got = torch.tensor([judgement.scores[name] for name in LABELS])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        assert judgement.flagged == (judgement.scores["acceptable"] < 0.5)
        flagged_as = [c for c, on in judgement.categories.items() if on]
        assert flagged_as == ([max(CATEGORIES, key=lambda c: judgement.scores[c])] if judgement.flagged else [])


def test_a_text_too_long_for_the_judges_context_is_judged_by_its_last_tokens(make_ckpt) -> None:  # type: ignore[no-untyped-def]
    checkpoint: Path = make_ckpt(tokenizer=True, vocab_size=32000)
    tokenizer, chat = load_tokenizer(checkpoint), ChatRenderer(checkpoint)
    words = " ".join(f"word{i}" for i in range(400))
    prompt = judging_prompt(words, tokenizer, chat, max_len=256)
    assert len(prompt) <= 256
    rendered = tokenizer.decode(prompt)
    assert "word399" in rendered and "word0 " not in rendered and "</text>" in rendered  # the tail, in the instructions
    assert judging_prompt("short", tokenizer, chat, max_len=256) == judging_prompt("short", tokenizer, chat, max_len=10_000)


def test_a_judgement_flags_by_its_threshold() -> None:
    logprobs = [-1.0, -2.0, -0.5, -3.0]  # acceptable, illegal, hateful, unqualified advice
    assert Judgement.of(logprobs, threshold=1.0).flagged and not Judgement.of(logprobs, threshold=0.0).flagged
    judged = Judgement.of(logprobs, threshold=0.5)
    assert sum(judged.scores.values()) == pytest.approx(1.0)
    assert judged.flagged and judged.flagged_categories == ["hateful"]
    assert set(judged.to_json()["category_scores"]) == set(CATEGORIES)


class InProcessEngine:
    """The EngineClient contract over a real engine loop in this process (AsyncEngine): the HTTP edge
    runs over the same engine Serve's replica runs, without Serve."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[TokenEvent]:
        return self.engine.stream(prompt_ids, params, request_id)

    async def model_info(self) -> ModelInfo:
        model = self.engine.engine.model
        return ModelInfo(max_model_len=model.max_model_len, vocab_size=model.vocab_size, moe=model.args.is_moe)

    async def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    async def check_health(self) -> None:
        pass


MODEL = "judge"


@dataclass
class Endpoints:
    checkpoint: Path
    engine: AsyncEngine
    ports: dict[str, int]  # by moderation setting

    def client(self, name: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.ports[name]}/v1", api_key="unused", max_retries=0)

    def stats(self, name: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[name]}/v1/engine/stats", timeout=30) as response:
            return json.loads(response.read())


SETTINGS = {
    "off": ModerationSettings(),
    "judge": ModerationSettings(threshold=0.5),
    "flag everything in": ModerationSettings(frozenset({"input"}), threshold=1.0),
    "flag everything out": ModerationSettings(frozenset({"output"}), threshold=1.0, interval=4),
    "flag nothing": ModerationSettings(frozenset({"input", "output"}), threshold=0.0, interval=4),
}


@pytest.fixture(scope="module")
def endpoints(make_ckpt) -> Iterator[Endpoints]:  # type: ignore[no-untyped-def]
    checkpoint = make_ckpt(preset="mistral-tiny", tokenizer=True, vocab_size=32000)
    engine = AsyncEngine(local_engine(Checkpoint.open(checkpoint), coordinator_threads=1))
    tokenizer, chat = load_tokenizer(checkpoint), ChatRenderer(checkpoint)
    with contextlib.ExitStack() as stack:
        ports = {
            name: stack.enter_context(
                http_server(Frontend([ServedModel((MODEL,), InProcessEngine(engine), tokenizer, chat)], moderation=settings))
            )
            for name, settings in SETTINGS.items()
        }
        yield Endpoints(checkpoint, engine, ports)
    engine.shutdown()


def scores_of(result: Any) -> dict[str, float]:
    """The category scores the openai client parsed (its own category names are absent: None)."""
    return {k: v for k, v in result.category_scores.model_dump().items() if v is not None}


def test_the_openai_client_parses_moderations_of_one_text_and_of_a_list(endpoints: Endpoints) -> None:
    client = endpoints.client("judge")
    one = client.moderations.create(input=TEXTS[0])
    many = client.moderations.create(input=TEXTS, model=MODEL)
    assert one.model == MODEL and len(one.results) == 1 and len(many.results) == len(TEXTS)
    assert scores_of(one.results[0]) == pytest.approx(scores_of(many.results[0]), abs=1e-5)  # alone or in a batch
    for result in many.results:
        scores = scores_of(result)
        assert set(scores) == set(CATEGORIES) and 0 < sum(scores.values()) < 1
        assert result.flagged == (1 - sum(scores.values()) < 0.5)  # the acceptable label's share, below the threshold
    long = client.moderations.create(input=" ".join(f"word{i}" for i in range(400)))  # past the 256-token context
    assert len(long.results) == 1
    with pytest.raises(openai.NotFoundError):
        client.moderations.create(input="hi", model="gpt-4")
    with pytest.raises(openai.BadRequestError):
        client.moderations.create(input=["hi"] * 33)


def test_moderate_input_refuses_a_flagged_prompt_and_runs_nothing(endpoints: Endpoints) -> None:
    client = endpoints.client("flag everything in")
    before = endpoints.engine.stats()["steps"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt="Hello there", max_tokens=8)
    assert refused.value.code == "content_filter" and "flagged by moderation as" in refused.value.message
    with pytest.raises(openai.BadRequestError) as chat_refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    assert chat_refused.value.code == "content_filter"
    counts = endpoints.stats("flag everything in")["moderation"]
    assert counts["refused_prompts"] == 2 and counts["calls"] == 2
    assert endpoints.engine.stats()["steps"] - before <= 2  # the two judging prefills, no generation


def test_moderate_output_ends_a_flagged_answer_with_content_filter_and_sends_none_of_it(endpoints: Endpoints) -> None:
    client = endpoints.client("flag everything out")
    whole = client.completions.create(model=MODEL, prompt=[1, 5, 9], max_tokens=12, **GREEDY)
    assert whole.choices[0].finish_reason == "content_filter" and whole.choices[0].text == ""
    chunks = list(client.completions.create(model=MODEL, prompt=[1, 5, 9], max_tokens=12, stream=True, **GREEDY))
    assert [c.choices[0].finish_reason for c in chunks] == ["content_filter"] and chunks[0].choices[0].text == ""
    chat = list(
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=12, stream=True)
    )
    assert chat[-1].choices[0].finish_reason == "content_filter"
    assert not "".join(c.choices[0].delta.content or "" for c in chat if c.choices)  # nothing of the answer was sent
    assert endpoints.stats("flag everything out")["moderation"]["filtered_answers"] == 3


def test_moderation_that_flags_nothing_changes_no_output_and_is_counted(endpoints: Endpoints) -> None:
    plain, moderated = endpoints.client("off"), endpoints.client("flag nothing")
    prompt = random_prompts([9], 32000, seed=61)[0]
    expected = plain.completions.create(model=MODEL, prompt=prompt, max_tokens=10, **GREEDY)
    assert expected.choices[0].finish_reason == "length"
    got = moderated.completions.create(model=MODEL, prompt=prompt, max_tokens=10, **GREEDY)
    assert (got.choices[0].text, got.choices[0].finish_reason) == (expected.choices[0].text, "length")
    chunks = list(moderated.completions.create(model=MODEL, prompt=prompt, max_tokens=10, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == expected.choices[0].text
    assert len(chunks) == 10 and chunks[-1].choices[0].finish_reason == "length"
    # Judged: the prompt twice, the whole answer once, the stream at 4, 8 and its end (10 tokens).
    assert endpoints.stats("flag nothing")["moderation"] == {
        "calls": 6,
        "flagged": 0,
        "refused_prompts": 0,
        "filtered_answers": 0,
    }


def test_moderation_batched_with_generation_changes_no_generated_token(endpoints: Endpoints) -> None:
    prompts = random_prompts([7, 12, 5], 32000, seed=62)
    alone = [
        c.text
        for c in [
            endpoints.client("off").completions.create(model=MODEL, prompt=p, max_tokens=16, **GREEDY).choices[0] for p in prompts
        ]
    ]
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{endpoints.ports['judge']}/v1", api_key="unused", max_retries=0)

    async def together() -> list[str]:
        generations = [client.completions.create(model=MODEL, prompt=p, max_tokens=16, **GREEDY) for p in prompts]
        judging = [client.moderations.create(input=TEXTS) for _ in range(4)]
        answers = await asyncio.gather(*generations, *judging)
        return [a.choices[0].text for a in answers[: len(prompts)]]  # type: ignore[union-attr]

    assert asyncio.run(together()) == alone


def test_moderation_eval_prints_precision_recall_and_counts_of_the_labelled_set(
    endpoints: Endpoints, cli_env: dict[str, str], tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{endpoints.ports['judge']}"
    lines = [json.loads(line) for line in LABELLED.read_text().splitlines()]
    flagged = [r.flagged for r in endpoints.client("judge").moderations.create(input=[x["text"] for x in lines]).results]
    # By hand: acceptable texts are the positives; a text passed (not flagged) is predicted acceptable.
    tp = sum(x["acceptable"] and not f for x, f in zip(lines, flagged))
    fp = sum(not x["acceptable"] and not f for x, f in zip(lines, flagged))
    fn = sum(x["acceptable"] and f for x, f in zip(lines, flagged))
    tn = sum(not x["acceptable"] and f for x, f in zip(lines, flagged))
    proc = run_cli_here("moderation-eval", str(LABELLED), "--url", url, "--json", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["true_positives"], report["false_positives"], report["false_negatives"], report["true_negatives"]) == (
        tp,
        fp,
        fn,
        tn,
    )
    assert report["precision"] == (tp / (tp + fp) if tp + fp else None) and report["recall"] == (
        tp / (tp + fn) if tp + fn else None
    )
    assert report["texts"] == len(lines) == 16 and report["model"] == MODEL
    text = run_cli_here("moderation-eval", str(LABELLED), "--url", url, env=cli_env)
    assert text.returncode == 0 and text.stdout.startswith(f"16 texts judged by {MODEL}: precision ")
    bad = LABELLED.parent / "not-there.jsonl"
    assert_one_line_error(run_cli_here("moderation-eval", str(bad), "--url", url, env=cli_env), "does not exist")
    binary = tmp_path / "labels.jsonl"
    binary.write_bytes(b'{"text": "\xff\xfe", "acceptable": true}\n')
    assert_one_line_error(run_cli_here("moderation-eval", str(binary), "--url", url, env=cli_env), "cannot be read as UTF-8")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "hi", "acceptable": true}\n{"text": "no label"}\n')
    assert_one_line_error(run_cli_here("moderation-eval", str(broken), "--url", url, env=cli_env), ":2 needs a string 'text'")


LABELLED = Path(__file__).parent / "data" / "moderation_eval.jsonl"
GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def test_scored_label_tokens_are_checked_like_every_other_token_field() -> None:
    from cluster.engine.scheduler import check_request
    from cluster.errors import FieldError

    check_request([1, 2], SamplingParams(max_tokens=1, score_token_ids=(3, 4)), max_model_len=16, vocab_size=8)
    with pytest.raises(FieldError, match=r"score_token_ids must be in \[0, 8\)"):
        check_request([1, 2], SamplingParams(max_tokens=1, score_token_ids=(3, 8)), max_model_len=16, vocab_size=8)
    with pytest.raises(FieldError, match="at most 16 token ids"):
        SamplingParams(max_tokens=1, score_token_ids=tuple(range(17))).validate()


def test_the_judge_is_the_one_named_else_the_moderation_model_else_the_serving_one_else_the_first() -> None:
    def served(name: str) -> ServedModel:
        return ServedModel((name,), InProcessEngine(None), tokenizer=None, chat=None)  # type: ignore[arg-type]  # never called

    big, small = served("big"), served("small")
    plain = Frontend([big, small])
    assert plain.judge_of(None) is big and plain.judge_of(None, serving=small) is small and plain.judge_of("small") is small
    pinned = Frontend([big, small], moderation=ModerationSettings(model="small"))
    assert pinned.judge_of(None) is small and pinned.judge_of(None, serving=big) is small and pinned.judge_of("big") is big
    with pytest.raises(UserError, match="--moderation-model 'tiny' is not a served model"):
        Frontend([big, small], moderation=ModerationSettings(model="tiny"))
