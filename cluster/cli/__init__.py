"""The `moe-cluster` command line: a module per command group, each command's options one pydantic model.

- generate: `generate`, `make-checkpoint`
- serve: `serve`
- client: `stats`, `experts rebalance`, `route set`, `replay` (a running server)
- moderation: `moderation-eval` (a running server's self-moderation against a labelled set)
- bench: `bench`, `agreement`
- plan: `plan`, `experiments`
"""

from __future__ import annotations

import sys
from importlib import import_module

from cluster.cli.root import app

# Each group adds its commands to the root; `--help` lists them in this order.
for group in ("generate", "serve", "client", "moderation", "bench", "plan"):
    import_module(f"cluster.cli.{group}")

__all__ = ["app", "main"]


def main() -> None:
    """Usage mistakes (a wrong choice, a missing argument) as one line, like every other user error."""
    try:
        code = app(standalone_mode=False)
    except Exception as e:
        # click's usage errors (typer vendors click, so they are matched by what they carry).
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise
        if type(e).__name__ == "NoArgsIsHelpError":
            if e.format_message():  # the help text, unless typer's rich formatter printed it already
                print(e.format_message(), file=sys.stderr)
        else:
            ctx = getattr(e, "ctx", None)
            print(
                f"moe-cluster: error: {e.format_message()} (see `{ctx.command_path if ctx else 'moe-cluster'} --help`)",
                file=sys.stderr,
            )
        code = e.exit_code
    sys.exit(code if isinstance(code, int) else 0)
