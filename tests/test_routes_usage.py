"""Traffic splits (cluster.serve.routes) and usage by model and user (cluster.serve.usage): what an operator
staging a model rollout and reading /v1/engine/stats relies on."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from cluster.errors import UserError
from cluster.serve.routes import RouteTable, Split
from cluster.serve.usage import UsageBook

ROOT = Path(__file__).resolve().parents[1]
USERS = [f"user-{i}" for i in range(200)]


def test_a_route_parses_into_its_alias_and_weighted_targets() -> None:
    split = Split.parse("chat=A:75,B:25")
    assert split == Split("chat", (("A", 75.0), ("B", 25.0)))
    assert Split.parse(" chat = A : 75 , B:25 ") == split  # spaces around the parts are allowed
    assert Split.of("chat", "A:75,B:25") == split
    # The weight is after the last ':', so a model name may hold one.
    assert Split.parse("chat=llama3:8b:1,B:0").targets == (("llama3:8b", 1.0), ("B", 0.0))
    assert split.to_json() == {"alias": "chat", "targets": [{"model": "A", "weight": 75.0}, {"model": "B", "weight": 25.0}]}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("chatA:75", "no '='"),
        ("=A:75,B:25", "alias before '=' is empty"),
        ("chat=", "no targets"),
        ("chat=A", "'A' has no ':WEIGHT'"),
        ("chat=A:75,,B:25", "empty target"),
        ("chat=:75", "empty model name"),
        ("chat=A:lots", "'lots' of 'A' is not a number"),
        ("chat=A:", "'' of 'A' is not a number"),
        ("chat=A:nan", "weight of 'A' is nan"),
        ("chat=A:inf", "weight of 'A' is inf"),
        ("chat=A:75,B:-25", "weight of 'B' is -25"),
        ("chat=A:0,B:0", "every weight is 0"),
        ("chat=A:50,A:50", "'A' is named twice"),
    ],
)
def test_every_malformed_route_is_refused_with_the_bad_part_and_the_expected_form(text: str, problem: str) -> None:
    with pytest.raises(UserError) as raised:
        Split.parse(text)
    message = str(raised.value)
    assert problem in message and "--route chat=A:75,B:25" in message
    alias, _, targets = text.partition("=")
    if "=" in text:  # the part after '=' is refused the same way on its own
        with pytest.raises(UserError, match="--route chat=A:75,B:25"):
            Split.of(alias, targets)


def test_split_objects_built_directly_are_checked_too() -> None:
    with pytest.raises(UserError, match="finite number"):
        Split("chat", (("A", float("nan")),))
    with pytest.raises(UserError, match="no targets"):
        Split("chat", ())


def test_two_hundred_users_are_split_by_the_weights_and_each_stays_on_one_model() -> None:
    split = Split.parse("chat=A:75,B:25")
    picks = {user: split.pick(user) for user in USERS}
    shares = Counter(picks.values())
    assert abs(shares["A"] / len(USERS) - 0.75) <= 0.10
    assert abs(shares["B"] / len(USERS) - 0.25) <= 0.10
    for user in USERS:
        assert {split.pick(user) for _ in range(5)} == {picks[user]}  # sticky over repeated requests
    # An equal split of another alias is drawn independently: its users are not the same users as chat's.
    other = Split.parse("code=A:75,B:25")
    assert {u for u in USERS if other.pick(u) == "B"} != {u for u in USERS if picks[u] == "B"}


def test_requests_without_a_user_are_split_at_random_by_the_weights_and_never_reach_a_zero_weight() -> None:
    random.seed(7)
    split = Split.parse("chat=A:75,Z:0,B:25")
    picks = Counter(split.pick(None) for _ in range(2000)) + Counter(split.pick("") for _ in range(2000))
    assert set(picks) == {"A", "B"}
    assert abs(picks["A"] / 4000 - 0.75) <= 0.05
    assert not any(Split.parse("chat=A:75,Z:0,B:25").pick(u) == "Z" for u in USERS)


def test_a_user_keeps_their_model_across_processes_whatever_python_hash_seed() -> None:
    code = (
        "from cluster.serve.routes import Split; s = Split.parse('chat=A:50,B:50'); "
        "print(''.join(s.pick(f'user-{i}') for i in range(64)))"
    )
    runs = set()
    for seed in ("1", "2"):
        env = os.environ | {"PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        runs.add(out.stdout.strip())
    assert len(runs) == 1


def test_a_weight_change_applies_to_later_requests_and_an_alias_is_the_only_name_resolved() -> None:
    table = RouteTable([Split.parse("chat=A:75,B:25")], models=["A", "B", "C"])
    before = table.get("chat")
    assert {table.resolve("chat", u) for u in USERS} == {"A", "B"}
    assert table.resolve("C", "user-1") == "C" and table.resolve("nope", None) == "nope"  # not an alias: as sent

    table.set(Split.parse("chat=A:0,B:100"))
    assert {table.resolve("chat", u) for u in USERS} == {"B"}
    assert before is not None and before.targets == (("A", 75.0), ("B", 25.0))  # a reader's old split is unchanged

    # Moving weight from A to B only moves users from A to B: nobody goes back in a staged rollout.
    staged = RouteTable([Split.parse("chat=A:75,B:25")], models=["A", "B"])
    on_b = {u for u in USERS if staged.resolve("chat", u) == "B"}
    staged.set(Split.parse("chat=A:50,B:50"))
    assert on_b < {u for u in USERS if staged.resolve("chat", u) == "B"}

    table.set(Split.parse("code=C:1"))  # set adds an alias too
    assert table.aliases() == ["chat", "code"]
    assert table.to_json() == [Split.parse("chat=A:0,B:100").to_json(), Split.parse("code=C:1").to_json()]


def test_routes_to_unknown_models_and_aliases_named_like_a_model_are_refused_with_the_served_names() -> None:
    served = ["mistral", "mixtral"]
    with pytest.raises(UserError, match=r"'gpt' is not a served model; route to one of: mistral, mixtral"):
        RouteTable([Split.parse("chat=mistral:1,gpt:1")], served)
    with pytest.raises(UserError, match=r"'mistral' is the name of a served model.*served: mistral, mixtral"):
        RouteTable([Split.parse("mistral=mixtral:1")], served)
    with pytest.raises(UserError, match="given twice"):
        RouteTable([Split.parse("chat=mistral:1"), Split.parse("chat=mixtral:1")], served)

    table = RouteTable([Split.parse("chat=mistral:1")], served)
    with pytest.raises(UserError, match="route to one of: mistral, mixtral"):
        table.set(Split.parse("chat=mistral:1,gpt:1"))
    assert table.get("chat") == Split.parse("chat=mistral:1")  # a refused change leaves the route as it was


def brute_force(requests: list[tuple[str, str | None, int, int]]) -> tuple[dict, dict, list[str | None]]:
    """Totals by model and by user (None for no user), and the users in order of first request."""
    models: dict[str, list[int]] = {}
    users: dict[str | None, list[int]] = {}
    for model, user, prompt, completion in requests:
        for row in (models.setdefault(model, [0, 0, 0]), users.setdefault(user or None, [0, 0, 0])):
            row[0] += 1
            row[1] += prompt
            row[2] += completion
    return models, users, list(users)


@pytest.mark.parametrize(("top_users", "max_tracked_users"), [(3, 5), (0, 2), (4, 1000)])
def test_usage_sums_are_exact_against_a_brute_force_count(top_users: int, max_tracked_users: int) -> None:
    rng = random.Random(top_users * 1000 + max_tracked_users)
    names: list[str | None] = [None, "", *(f"u{i}" for i in range(30))]
    requests = [
        (rng.choice(["A", "B", "C"]), rng.choice(names), rng.randrange(0, 500), rng.randrange(0, 300)) for _ in range(600)
    ]
    book = UsageBook(top_users=top_users, max_tracked_users=max_tracked_users)
    for request in requests:
        book.record(*request)
    report = book.report()
    models, users, order = brute_force(requests)

    names_keys = ("requests", "prompt_tokens", "completion_tokens")
    assert report["models"] == {m: dict(zip(names_keys, row)) for m, row in models.items()}
    # The first max_tracked_users named users are counted exactly, and the no-user row always is.
    tracked = [None, *[u for u in order if u is not None][:max_tracked_users]]
    assert report["users"]["tracked"] == len(tracked)
    top = report["users"]["top"]
    assert len(top) == min(top_users, len(tracked))
    for row in top:
        assert row["user"] in tracked
        assert [row[k] for k in names_keys] == users[row["user"]]
    # Top plus others add up to the totals over models, exactly.
    others = report["users"]["others"]
    for i, key in enumerate(names_keys):
        assert sum(row[key] for row in top) + others[key] == sum(row[i] for row in models.values())
    assert others["users"] == len(tracked) - len(top)
    assert others["untracked"] == (len(order) - 1 > max_tracked_users)


def test_the_top_list_is_the_heaviest_users_sorted_by_tokens_then_name_and_bounded() -> None:
    book = UsageBook(top_users=3)
    for user, prompt, completion in [("dave", 10, 0), ("carol", 5, 5), ("bob", 30, 1), ("alice", 2, 8), ("erin", 1, 0)]:
        book.record("A", user, prompt, completion)
    book.record("A", None, 3, 3)
    top = book.report()["users"]["top"]
    assert [(row["user"], row["prompt_tokens"] + row["completion_tokens"]) for row in top] == [
        ("bob", 31),
        ("alice", 10),  # ties at 10 tokens: alice, carol, dave in order of name
        ("carol", 10),
    ]
    others = book.report()["users"]["others"]
    assert others == {"users": 3, "untracked": False, "requests": 3, "prompt_tokens": 14, "completion_tokens": 3}


def test_monthly_volumes_extrapolate_completion_tokens_over_the_measured_window() -> None:
    now = [100.0]
    book = UsageBook(clock=lambda: now[0])
    with pytest.raises(UserError, match="usage window is 0.0 s long"):
        UsageBook.monthly_volumes(book.report())
    book.record("A", "u1", prompt_tokens=5000, completion_tokens=1000)
    book.record("B", None, prompt_tokens=0, completion_tokens=250)
    now[0] = 100.0 + 3600  # one hour measured
    report = book.report()
    assert report["window_s"] == 3600
    assert UsageBook.monthly_volumes(report) == {"A": 730_000.0, "B": 182_500.0}
    assert UsageBook.monthly_volumes(report, hours_per_month=24) == {"A": 24_000.0, "B": 6_000.0}


def test_a_route_keeps_its_targets_order_so_reordered_weights_move_nobody() -> None:
    from cluster.serve.routes import RouteTable, Split

    table = RouteTable([Split.parse("chat=A:75,B:25")], ["A", "B", "C"])
    users = [f"user-{i}" for i in range(500)]
    before = [table.resolve("chat", u) for u in users]
    table.set(Split.parse("chat=B:25,A:75"))  # the same weights, written the other way round
    assert [table.resolve("chat", u) for u in users] == before
    table.set(Split.parse("chat=C:10,B:25,A:65"))  # a new target goes after the old ones
    split = table.get("chat")
    assert split is not None and [name for name, _ in split.targets] == ["A", "B", "C"]
