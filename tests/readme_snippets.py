"""The README's curl and openai snippets, read from README.md (not copied), run as pasted against a
served tiny checkpoint (tests/test_models.py serves it as "tiny", with no API key, as `./dev serve`
does): a test fails when the README's examples stop working. Only the port changes: the README's
127.0.0.1:8000 becomes the test's server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
ADDRESS = "127.0.0.1:8000"  # where the README's snippets point: `./dev serve`
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def snippet(language: str, marker: str) -> str:
    """The one fenced block of `language` in README.md that contains `marker`."""
    blocks = [body for lang, body in FENCE.findall(README.read_text()) if lang == language and marker in body]
    assert len(blocks) == 1, f"README.md should have exactly one ```{language} block containing {marker!r}; found {len(blocks)}"
    assert ADDRESS in blocks[0], f"the README's {language} snippet should address {ADDRESS}, as `./dev serve` serves"
    return blocks[0]


def local_env() -> dict[str, str]:
    """This environment, with any HTTP proxy bypassed for the local server."""
    return os.environ | {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def run_curl_snippet(port: int) -> None:
    command = snippet("bash", "curl").replace(ADDRESS, f"127.0.0.1:{port}")
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed; the README's curl snippet needs it (apt-get install curl)")
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, env=local_env())
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["model"] == "tiny"
    assert len(reply["choices"]) == 1 and isinstance(reply["choices"][0]["text"], str), reply
    assert reply["usage"]["completion_tokens"] >= 1, reply


def run_openai_snippet(port: int) -> None:
    code = snippet("python", "OpenAI(").replace(ADDRESS, f"127.0.0.1:{port}")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=local_env())
    assert done.returncode == 0, done.stderr
