"""The house a newcomer walks into: a short README that starts with the set-up, docs by topic, small CLI modules,
and no text that points at the tracker or tells the story of the code instead of saying why it is so."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ("architecture", "serving", "operations", "performance", "planning", "development")
# Built from parts, so that this file does not match itself.
TRACKER_WORDS = re.compile(r"\bissues? #?\d+|" + "design" + r"\s+sketch", re.IGNORECASE)


def test_the_readme_is_short_and_starts_with_the_two_set_up_commands() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 200
    head = "\n".join(lines[:40])
    assert "./dev serve" in head and "./dev test" in head


@pytest.mark.parametrize("page", DOCS)
def test_each_docs_page_exists_and_the_readme_links_it(page: str) -> None:
    assert (ROOT / "docs" / f"{page}.md").read_text().startswith("# ")
    assert f"](docs/{page}.md)" in README.read_text()


def test_every_relative_link_in_the_readme_and_docs_resolves() -> None:
    for page in [README, *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links {target}, which does not exist"


def test_no_text_points_at_the_tracker() -> None:
    places = [README, *(ROOT / "docs").glob("*.md")]
    for package in ("cluster", "router", "workers", "mixtral", "protos", "tests", "deploy"):
        places += [p for p in (ROOT / package).rglob("*") if p.suffix in (".py", ".md", ".yaml", ".proto")]
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in places for m in TRACKER_WORDS.finditer(p.read_text())]
    assert not found


def test_no_cli_module_is_over_250_lines() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "cluster" / "cli").glob("*.py")}
    assert sizes and max(sizes.values()) <= 250, sizes


def test_docs_serving_lists_every_serve_setting() -> None:
    from cluster.cli.options import primary_flag
    from cluster.serve.args import ServeArgs

    text = (ROOT / "docs" / "serving.md").read_text()
    spelled = {name: primary_flag(ServeArgs, name) for name in ServeArgs.model_fields if name != "checkpoint"}
    spelled["models"] = "`models`"  # a config file's key only
    missing = [name for name, flag in spelled.items() if flag not in text]
    assert not missing
