"""`moe-cluster moderation-eval`: a running server's self-moderation against a labelled set."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from cluster.cli.client import ServerArgs
from cluster.cli.options import command
from cluster.cli.root import app
from cluster.errors import UserError


class ModerationEvalArgs(ServerArgs):
    file: Path = Field(description="A labelled set: one JSON object a line, with 'text' and 'acceptable' (true or false).")
    model: str | None = Field(None, description="The served model that judges; default: the server's choice.")


def read_labelled(path: Path) -> tuple[list[str], list[bool]]:
    """The texts and their labels; UserError naming the line for anything else."""
    if not path.is_file():
        raise UserError(f'{path} does not exist; give a JSONL file of {{"text": ..., "acceptable": true|false}} lines')
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} cannot be read as UTF-8 text ({e})") from None
    texts, labels = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number} is not JSON ({e.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not isinstance(item.get("acceptable"), bool):
            raise UserError(f"{path}:{number} needs a string 'text' and a true/false 'acceptable'")
        texts.append(item["text"])
        labels.append(item["acceptable"])
    if not texts:
        raise UserError(f"{path} holds no labelled text")
    return texts, labels


@command(app, ModerationEvalArgs, name="moderation-eval", arguments=("file",))
def moderation_eval(args: ModerationEvalArgs) -> None:
    """Judge every text of a labelled set with the server's self-moderation (POST /v1/moderations), and
    print precision and recall by the Mistral 7B paper's convention (acceptable texts are the positives)."""
    from cluster.serve.moderation import Confusion
    from cluster.serve.openai_api import MAX_MODERATION_INPUTS
    from cluster.serve.stats_view import post_moderations

    texts, labels = read_labelled(args.file)
    flagged: list[bool] = []
    judge = ""
    for start in range(0, len(texts), MAX_MODERATION_INPUTS):
        answer = post_moderations(args.base_url, texts[start : start + MAX_MODERATION_INPUTS], args.key(), model=args.model)
        flagged += [r["flagged"] for r in answer["results"]]
        judge = answer["model"]
    confusion = Confusion.of(labels, flagged)
    if args.as_json:
        print(json.dumps({"model": judge, "texts": len(texts)} | confusion.to_json()))
    else:
        print(f"{len(texts)} texts judged by {judge}: {confusion.summary()}")
