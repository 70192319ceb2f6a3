"""The README's curl and openai snippets work as pasted against a served tiny checkpoint.

The snippets are read from README.md (not copied here), so the test fails when the README's examples
stop working. Only the port changes: the README's 127.0.0.1:8000 becomes this module's server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray import serve

from cluster.serve.app import build_app
from cluster.serve.args import ServeArgs

README = Path(__file__).resolve().parent.parent / "README.md"
ADDRESS = "127.0.0.1:8000"  # where the README's snippets point: `./dev serve`
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def snippet(language: str, marker: str) -> str:
    """The one fenced block of `language` in README.md that contains `marker`."""
    blocks = [body for lang, body in FENCE.findall(README.read_text()) if lang == language and marker in body]
    assert len(blocks) == 1, f"README.md should have exactly one ```{language} block containing {marker!r}; found {len(blocks)}"
    assert ADDRESS in blocks[0], f"the README's {language} snippet should address {ADDRESS}, as `./dev serve` serves"
    return blocks[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def port(ray_session, make_ckpt) -> Iterator[int]:  # type: ignore[no-untyped-def]
    checkpoint = make_ckpt(tokenizer=True, vocab_size=32000)  # the real Mixtral tokenizer, as the tiny preset has
    http_port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    # One worker of all eight experts: the fewest actors to start; the answers are the same. No API key,
    # as `./dev serve` on a machine without MOE_API_KEY: the snippets send none.
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MOE_API_KEY", raising=False)
        app = build_app(ServeArgs(checkpoint=str(checkpoint), experts_per_worker=8, served_model_name="tiny"))
    serve.run(app, name="moe", route_prefix="/")
    yield http_port
    serve.shutdown()


def local_env() -> dict[str, str]:
    """This environment, with any HTTP proxy bypassed for the local server."""
    return os.environ | {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def test_curl_snippet_as_pasted(port: int) -> None:
    command = snippet("bash", "curl").replace(ADDRESS, f"127.0.0.1:{port}")
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed; the README's curl snippet needs it (apt-get install curl)")
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, env=local_env())
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["model"] == "tiny"
    assert len(reply["choices"]) == 1 and isinstance(reply["choices"][0]["text"], str), reply
    assert reply["usage"]["completion_tokens"] >= 1, reply


def test_openai_snippet_as_pasted(port: int) -> None:
    code = snippet("python", "OpenAI(").replace(ADDRESS, f"127.0.0.1:{port}")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=local_env())
    assert done.returncode == 0, done.stderr
