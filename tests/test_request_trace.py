"""Request traces as `replay` reads them: JSONL of seconds from the start, or the Azure LLM inference
traces' CSV with date-times; every malformed file a one-line error naming the file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.errors import UserError
from cluster.planning.request_trace import TracedRequest, read_request_trace


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_jsonl_and_azure_csv_read_as_requests_in_arrival_order(tmp_path: Path) -> None:
    jsonl = write(
        tmp_path,
        "t.jsonl",
        '{"timestamp": 1.5, "prompt_tokens": 100, "output_tokens": 20}\n\n'
        '{"timestamp": 0, "prompt_tokens": 7, "output_tokens": 1, "user": "ignored"}\n',
    )
    assert read_request_trace(jsonl) == [TracedRequest(0.0, 7, 1), TracedRequest(1.5, 100, 20)]
    azure = write(
        tmp_path,
        "AzureLLMInferenceTrace_conv.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:16:06.7655370,879,42\n",
    )
    requests = read_request_trace(azure)
    assert [(r.prompt_tokens, r.output_tokens) for r in requests] == [(374, 44), (396, 109), (879, 42)]
    assert [r.timestamp for r in requests] == pytest.approx([0.0, 4.314579, 20.084947])


@pytest.mark.parametrize(
    "name, text, fragment",
    [
        ("t.jsonl", "", "the trace has no requests"),
        ("t.jsonl", "{not json\n", "t.jsonl line 1: not JSON"),
        ("t.jsonl", "[1, 2, 3]\n", "line 1: expected an object with timestamp, prompt_tokens, output_tokens"),
        ("t.jsonl", '{"prompt_tokens": 3, "output_tokens": 2}\n', "line 1: timestamp must be a number, not None"),
        ("t.jsonl", '{"timestamp": -1, "prompt_tokens": 3, "output_tokens": 2}\n', "timestamp must be seconds from"),
        ("t.jsonl", '{"timestamp": NaN, "prompt_tokens": 3, "output_tokens": 2}\n', "timestamp must be a number, not nan"),
        ("t.jsonl", '{"timestamp": 0, "prompt_tokens": 2.5, "output_tokens": 2}\n', "prompt_tokens must be a whole number"),
        (
            "t.jsonl",
            '{"timestamp": 0, "prompt_tokens": 3, "output_tokens": 0}\n',
            "output_tokens must be a whole number of at least 1",
        ),
        ("t.csv", "time,tokens\n1,2\n", "an Azure LLM inference trace has the columns TIMESTAMP, ContextTokens, GeneratedTokens"),
        (
            "t.csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,3,4\n",
            "t.csv line 2: TIMESTAMP 'yesterday' is not a date-time",
        ),
        ("t.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,3,x\n", "line 2: output_tokens must be a number"),
    ],
)
def test_a_malformed_trace_is_one_error_naming_the_file_and_line(tmp_path: Path, name: str, text: str, fragment: str) -> None:
    with pytest.raises(UserError, match=None) as raised:
        read_request_trace(write(tmp_path, name, text))
    assert fragment in str(raised.value) and "\n" not in str(raised.value)


def test_a_missing_trace_says_so(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read a request trace there"):
        read_request_trace(tmp_path / "nothing.jsonl")


def test_a_jsonl_trace_starts_at_its_first_request_as_a_csv_one_does(tmp_path: Path) -> None:
    late = write(
        tmp_path,
        "late.jsonl",
        '{"timestamp": 7.5, "prompt_tokens": 3, "output_tokens": 2}\n{"timestamp": 5, "prompt_tokens": 4, "output_tokens": 1}\n',
    )
    assert read_request_trace(late) == [TracedRequest(0.0, 4, 1), TracedRequest(2.5, 3, 2)]


def test_serve_settings_refuse_a_request_log_nobody_can_write_and_make_it_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import ValidationError

    from cluster.serve.args import ServeArgs

    monkeypatch.chdir(tmp_path)
    assert ServeArgs(checkpoint="tiny", record_requests="requests.jsonl").record_requests == str(tmp_path / "requests.jsonl")
    for wrong in (str(tmp_path / "missing" / "r.jsonl"), str(tmp_path)):
        with pytest.raises(ValidationError, match="give a file in a directory that exists and can be written"):
            ServeArgs(checkpoint="tiny", record_requests=wrong)
