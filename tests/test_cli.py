"""The moe-cluster command line, run as a user runs it: a subprocess, or its entry point here for mistakes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray


def run_cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `moe-cluster` with this process's environment as it is now, plus `env`.

    Read at call time: a Ray session in this process sets RAY_AUTH_MODE, which a CLI joining a
    cluster started from here needs too. RAY_ADDRESS is dropped unless `env` sets it.
    """
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | env
    return subprocess.run([sys.executable, "-m", "cluster", *args], capture_output=True, text=True, env=full_env, timeout=timeout)


def run_cli_here(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`moe-cluster` through its entry point, cluster.cli.main, in this process: for the paths that
    end in a user's mistake before Ray starts, without an interpreter start and a torch import each
    (3 s apiece on two busy cores). Exit status and output are what a subprocess would give."""
    from cluster.cli import main

    def no_ray(*_: object, **__: object) -> None:
        raise AssertionError("the CLI went on to start Ray: a user's mistake must be caught before")

    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray, "init", no_ray)
        patch.setattr(sys, "argv", ["moe-cluster", *args])
        patch.delenv("RAY_ADDRESS", raising=False)
        for key, value in env.items():
            patch.setenv(key, value)
        code: int | str | None = 0
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                main()
            except SystemExit as e:
                code = e.code
    return subprocess.CompletedProcess(
        ["moe-cluster", *args], code if isinstance(code, int) else 1, stdout.getvalue(), stderr.getvalue()
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("moe-cluster: error: ")
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def corrupt_checkpoints(make_ckpt, tmp_path_factory) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    good = make_ckpt()
    root = tmp_path_factory.mktemp("bad")
    made = {}
    for kind in ("truncated shard", "bad index", "not mixtral", "no weights"):
        path = root / kind.replace(" ", "-")
        shutil.copytree(good, path)
        made[kind] = path
    shard = sorted(made["truncated shard"].glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    (made["bad index"] / "model.safetensors.index.json").write_text("{not json")
    config = json.loads((made["not mixtral"] / "config.json").read_text())
    (made["not mixtral"] / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    for f in made["no weights"].glob("model*"):
        f.unlink()
    return made


@pytest.mark.parametrize(
    "case,fragment",
    [
        ("missing", "not a directory"),
        ("truncated shard", "corrupt"),
        ("bad index", "corrupt"),
        ("not mixtral", "not 'mixtral'"),
        ("no weights", "safetensors"),
    ],
)
def test_bad_checkpoint_is_one_clear_line(case: str, fragment: str, corrupt_checkpoints, tmp_path, cli_env) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "nowhere" if case == "missing" else corrupt_checkpoints[case]
    proc = run_cli_here("generate", str(path), "--prompt-ids", "1,2,3", "--max-tokens", "4", env=cli_env)
    assert_one_line_error(proc, fragment)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--prompt-ids", "1,x,3", "--max-tokens", "4"], "--prompt-ids"),
        (["--prompt-ids", "1,,3", "--max-tokens", "4"], "--prompt-ids"),
        (["--prompt-ids", "1,2", "--max-tokens", "0"], "max_tokens"),
        (["--prompt-ids", ",".join(["5"] * 300), "--max-tokens", "1"], "context of 256"),
        (["--prompt-ids", "1,99999", "--max-tokens", "1"], "vocabulary"),
        (["--max-tokens", "3"], "exactly one of"),
        (["--prompt-ids", "1", "--max-tokens", "3", "--temperature", "-1"], "temperature"),
        (["--prompt-ids", "1", "--max-tokens", "3", "--strategy", "ROUND"], "--strategy"),
        (["--prompt-ids", "1", "--max-tokens", "3", "--dtype", "int8"], "dtype"),
    ],
)
def test_bad_request_is_one_clear_line(args: list[str], fragment: str, make_ckpt, cli_env) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli_here("generate", str(make_ckpt()), *args, env=cli_env)
    assert_one_line_error(proc, fragment)


def test_make_checkpoint_refuses_a_full_directory(make_ckpt, cli_env) -> None:  # type: ignore[no-untyped-def]
    assert_one_line_error(run_cli_here("make-checkpoint", str(make_ckpt()), env=cli_env), "not empty")


def test_serve_has_an_option_for_every_app_setting(cli_env) -> None:  # type: ignore[no-untyped-def]
    from cluster.serve.args import ServeArgs

    proc = run_cli("serve", "--help", env=cli_env | {"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    for name in ServeArgs.model_fields:
        if name != "checkpoint":  # the positional argument
            assert f"--{name.replace('_', '-')}" in proc.stdout, name


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--strategy", "ROUND"], "--strategy"),
        (["--max-num-seqs", "0"], "--max-num-seqs"),
        (["--dtype", "int4"], "--dtype"),
        (["--kv-cache-memory", "0"], "--kv-cache-memory"),
        (["--min-replicas", "2", "--max-replicas", "1"], "max-replicas (1) is below min-replicas (2)"),
        (["--api-key", "long-enough", "--api-key-env", "KEY"], "not both"),
        (["--api-key-env", "MOE_TEST_UNSET_KEY"], "set MOE_TEST_UNSET_KEY to the API key"),
    ],
)
def test_a_bad_serve_setting_is_one_clear_line(args: list[str], fragment: str, make_ckpt, cli_env) -> None:  # type: ignore[no-untyped-def]
    assert_one_line_error(run_cli_here("serve", str(make_ckpt()), *args, env=cli_env), fragment)


def test_a_kv_budget_below_one_sequence_is_one_clear_line(make_ckpt, cli_env) -> None:  # type: ignore[no-untyped-def]
    # 256 tokens of context in 16 blocks of 8 KiB; 0.0001 GiB holds 13 of them.
    proc = run_cli_here("serve", str(make_ckpt()), "--kv-cache-memory", "0.0001", env=cli_env)
    assert_one_line_error(proc, "holds 13 blocks", "needs 16 blocks", "--kv-cache-memory 0.0002", "--max-model-len to 208")


def test_serving_other_machines_needs_an_api_key(cli_env) -> None:  # type: ignore[no-untyped-def]
    assert_one_line_error(run_cli_here("serve", "--host", "0.0.0.0", env=cli_env), "--api-key")


def test_grpc_needs_an_api_key_since_it_listens_on_every_interface(cli_env) -> None:  # type: ignore[no-untyped-def]
    assert_one_line_error(run_cli_here("serve", "--grpc-port", "9000", env=cli_env), "--api-key")
    assert_one_line_error(run_cli_here("serve", "--api-key", "short", env=cli_env), "--api-key")  # at least 8 characters
