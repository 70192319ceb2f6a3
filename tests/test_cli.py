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
from typing import Any

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
        ("not mixtral", "model_type is 'llama'; moe-cluster serves MixtralForCausalLM"),
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
        (["--prompt-ids", ",".join(["5"] * 300), "--max-tokens", "1"], "context length is 256"),
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
    from cluster.cli.options import primary_flag
    from cluster.serve.args import ServeArgs

    proc = run_cli("serve", "--help", env=cli_env | {"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    for name in ServeArgs.model_fields:
        if name not in ("checkpoint", "models"):  # the positional arguments; a config file's list of models
            assert primary_flag(ServeArgs, name) in proc.stdout, name


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


def parsed(command: list[str], *argv: str) -> Any:
    """What the real command line makes of `argv`: typer's parse, then the command's model."""
    import typer.main

    from cluster.cli import app
    from cluster.cli.options import validate

    group: Any = typer.main.get_command(app)
    for name in command[:-1]:
        group = group.get_command(None, name)
    cli = group.get_command(None, command[-1])
    with cli.make_context(command[-1], list(argv)) as ctx:
        return validate(MODELS[tuple(command)], ctx.params)


def command_models() -> dict[tuple[str, ...], Any]:
    from cluster.cli.client import ModelServerArgs, StatsArgs
    from cluster.cli.generate import GenerateArgs
    from cluster.cli.serve import ServeCommandArgs

    return {
        ("serve",): ServeCommandArgs,
        ("generate",): GenerateArgs,
        ("stats",): StatsArgs,
        ("experts", "rebalance"): ModelServerArgs,
    }


MODELS = command_models()


def test_version_prints_the_installed_package_version(cli_env) -> None:  # type: ignore[no-untyped-def]
    from importlib.metadata import version

    proc = run_cli_here("--version", env=cli_env)
    assert (proc.returncode, proc.stdout.strip()) == (0, f"moe-cluster {version('moe-cluster')}")


@pytest.mark.parametrize(
    "argv,field,value",
    [
        (["--served-model-name", "mixtral-chat"], "served_model_name", "mixtral-chat"),
        (["--model-name", "mixtral-chat"], "served_model_name", "mixtral-chat"),  # the deprecated spelling
        ([], "enable_prefix_caching", True),
        (["--no-enable-prefix-caching"], "enable_prefix_caching", False),
        (["--no-prefix-caching"], "enable_prefix_caching", False),  # the deprecated spelling
        (["--gpu-memory-utilization", "0.5"], "gpu_memory_utilization", 0.5),
        ([], "dtype", "auto"),
        (["--dtype", "half"], "dtype", "half"),
        ([], "guardrail", False),
        (["--guardrail"], "guardrail", True),
        (["--no-guardrail"], "guardrail", False),
    ],
)
def test_serve_options_reach_their_settings_by_vllms_names_and_old_spellings(argv: list[str], field: str, value: object) -> None:
    assert getattr(parsed(["serve"], "tiny", *argv).app_args(), field) == value


def test_several_checkpoints_are_served_as_several_models_with_the_options_of_all() -> None:
    one = parsed(["serve"], "tiny", "--served-model-name", "a", "--served-model-name", "b").app_args()
    assert (one.checkpoint, one.names, one.models) == ("tiny", ["a", "b"], None)  # vLLM's aliases of one model
    argv = ["tiny", "mistral-tiny", "--served-model-name", "moe", "--served-model-name", "dense", "--min-replicas", "2"]
    several = parsed(["serve"], *argv, "--route", "chat=dense:75,moe:25", "--route", "big=moe:1").app_args()
    models = several.per_model()
    assert [(m.checkpoint, m.names, m.min_replicas) for m in models] == [("tiny", ["moe"], 2), ("mistral-tiny", ["dense"], 2)]
    assert several.routes == ["chat=dense:75,moe:25", "big=moe:1"]
    unnamed = parsed(["serve"], "tiny", "mistral-tiny").app_args().per_model()
    assert [m.names for m in unnamed] == [[], []]  # each its checkpoint's name


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["MOE", "DENSE", "--served-model-name", "x"], "one name per checkpoint, in order (2 checkpoints, 1 names)"),
        (["MOE", "--route", "chat=model"], "has no ':WEIGHT'"),
        (["MOE", "--route", "chat=gpt-4:1"], "'gpt-4' is not a served model; route to one of: model"),
        (["MOE", "DENSE"], "several served models are called 'model'"),  # both directories are called model
        (["DENSE", "--experts-per-worker", "2"], "is a dense model (no experts to place): drop --experts-per-worker"),
    ],
)
def test_a_bad_set_of_models_or_routes_is_one_clear_line(argv: list[str], fragment: str, make_ckpt, cli_env) -> None:  # type: ignore[no-untyped-def]
    paths = {"MOE": str(make_ckpt()), "DENSE": str(make_ckpt(preset="mistral-tiny"))}
    assert_one_line_error(run_cli_here("serve", *(paths.get(a, a) for a in argv), env=cli_env), fragment)


@pytest.mark.parametrize("choice,dtype", [("auto", None), ("half", "float16"), ("float16", "float16"), ("bfloat16", "bfloat16")])
def test_dtype_choices_reach_the_engine_as_compute_dtypes(choice: str, dtype: str | None) -> None:
    from cluster.serve.app import engine_options

    assert engine_options(parsed(["serve"], "tiny", "--dtype", choice).app_args()).dtype == dtype
    assert engine_options(parsed(["serve"], "tiny", "--gpu-memory-utilization", "0.5").app_args()).gpu_memory_utilization == 0.5
    assert parsed(["generate"], "tiny", "--prompt-ids", "1", "--dtype", choice).dtype == choice


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--gpu-memory-utilization", "0"], "--gpu-memory-utilization: must be positive"),
        (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization: must be at most 1"),
        (["--dtype", "double"], "--dtype"),
    ],
)
def test_a_bad_vllm_named_option_is_one_clear_line(argv: list[str], fragment: str, make_ckpt, cli_env) -> None:  # type: ignore[no-untyped-def]
    assert_one_line_error(run_cli_here("serve", str(make_ckpt()), *argv, env=cli_env), fragment)


def test_a_serve_config_with_the_old_keys_still_loads_and_one_with_both_spellings_fails() -> None:
    from pydantic import ValidationError

    from cluster.serve.args import ServeArgs

    old = ServeArgs.model_validate({"checkpoint": "tiny", "model_name": "m", "prefix_caching": False, "dtype": None})
    assert (old.served_model_name, old.enable_prefix_caching, old.dtype) == ("m", False, "auto")
    with pytest.raises(ValidationError, match="give served_model_name only"):
        ServeArgs.model_validate({"model_name": "m", "served_model_name": "n"})


def test_api_keys_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, cli_env) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MOE_API_KEY", "key-from-env")
    monkeypatch.setenv("MY_KEY", "key-named-by-option")
    assert parsed(["stats"]).key() == "key-from-env"
    assert parsed(["experts", "rebalance"], "--api-key-env", "MY_KEY").key() == "key-named-by-option"
    assert parsed(["stats"], "--api-key", "given-on-line").key() == "given-on-line"
    assert parsed(["stats"], "--url", "http://h:1").base_url == parsed(["stats"], "http://h:1").base_url == "http://h:1"
    # serve: a key in the environment is a key, so other machines may be served; without one they may not.
    assert parsed(["serve"], "tiny", "--host", "0.0.0.0").host == "0.0.0.0"
    from cluster.serve.app import api_key

    assert api_key(parsed(["serve"], "tiny").app_args()) == "key-from-env"
    monkeypatch.delenv("MOE_API_KEY")
    assert_one_line_error(run_cli_here("serve", "--host", "0.0.0.0", env=cli_env), "--api-key", "MOE_API_KEY")
    assert_one_line_error(run_cli_here("stats", "--api-key-env", "UNSET_VARIABLE", env=cli_env), "set UNSET_VARIABLE")
    assert_one_line_error(run_cli_here("stats", "http://a:1", "--url", "http://b:1", env=cli_env), "once")


def hub_cache(root: Path, repo_id: str, checkpoint: Path) -> Path:
    """A Hugging Face cache holding `checkpoint` as `repo_id`'s main revision, laid out as huggingface_hub lays it out."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_a_hugging_face_repo_id_is_served_from_the_local_cache(make_ckpt, cli_env, ray_address, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from mixtral.checkpoint import CheckpointReader
    from tests.reference import hf_greedy, hf_model

    checkpoint = make_ckpt()
    hub_cache(tmp_path / "hub", "acme/tiny-moe", checkpoint)
    env = cli_env | {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ray_address}
    proc = run_cli("generate", "acme/tiny-moe", "--prompt-ids", "1,2,3", "--max-tokens", "4", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    ids, _ = hf_greedy(hf_model(checkpoint), [1, 2, 3], 4)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["token_ids"] == ids
    missing = run_cli("generate", "acme/not-cached", "--prompt-ids", "1", env=env)
    assert_one_line_error(missing, "'acme/not-cached'", "Hugging Face", "local cache")
    # An actor on a node whose disk lacks the driver's path takes the repo from its own cache, and the
    # model is called by its repo id.
    probe = (
        "import dataclasses, pathlib\n"
        "from mixtral.synthetic import open_checkpoint\n"
        "here = open_checkpoint('acme/tiny-moe')\n"
        "elsewhere = dataclasses.replace(here, path=pathlib.Path('/another/node/snapshots/x'))\n"
        "print(here.name, elsewhere.local_path() == here.path, len(elsewhere.reader().weight_map))"
    )
    node = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=os.environ | env, timeout=120)
    assert node.returncode == 0, node.stderr
    assert node.stdout.split() == ["acme/tiny-moe", "True", str(len(CheckpointReader(checkpoint).weight_map))]


def test_a_serve_config_gives_each_model_its_own_settings_over_the_top_levels() -> None:
    from pydantic import ValidationError

    from cluster.serve.args import ServeArgs

    config = {
        "max_num_seqs": 16,
        "min_replicas": 2,
        "routes": ["chat=small:90,big:10"],
        "models": [
            {"checkpoint": "/models/mixtral", "served_model_name": "big", "max_replicas": 6},
            {"checkpoint": "/models/mistral", "served_model_name": "small", "min_replicas": 1, "max_num_seqs": 128},
        ],
    }
    big, small = ServeArgs.model_validate(config).per_model()
    assert (big.checkpoint, big.names, big.min_replicas, big.max_replicas, big.max_num_seqs) == (
        "/models/mixtral",
        ["big"],
        2,
        6,
        16,
    )
    assert (small.names, small.min_replicas, small.max_replicas, small.max_num_seqs) == (["small"], 1, None, 128)
    assert big.autoscaling and not small.autoscaling
    # An entry's old key names, and its own way of placing experts, over the top level's.
    top = {"enable_prefix_caching": True, "experts_per_worker": 4}
    entry = {"checkpoint": "a", "prefix_caching": False, "expert_map": '{"workers": []}'}
    [merged] = ServeArgs.model_validate(top | {"models": [entry]}).per_model()
    assert (merged.enable_prefix_caching, merged.experts_per_worker, merged.expert_map) == (False, None, '{"workers": []}')
    for wrong, fragment in [
        ({"models": [{"served_model_name": "x"}]}, "has no checkpoint"),
        ({"models": [{"checkpoint": "a", "api_key_env": "K"}]}, "the endpoint's settings go at the top level"),
        ({"checkpoint": "a", "models": [{"checkpoint": "b"}]}, "in each entry, not at the top level"),
        ({"models": []}, "models is empty"),
        (
            {"models": [{"checkpoint": "a", "max_num_seqs": 0}]},
            "models entry 0 max_num_seqs: Input should be greater than or equal to 1",
        ),
        ({"models": [{"checkpoint": "a", "max_num_sqes": 8}]}, "models entry 0 max_num_sqes: Extra inputs are not permitted"),
    ]:
        with pytest.raises(ValidationError, match=fragment):
            ServeArgs.model_validate(wrong)
