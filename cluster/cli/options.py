"""Commands whose options come from one pydantic model each: typer reads the signature, pydantic checks.

A model field becomes an option named after it (`max_tokens` -> `--max-tokens`; a bool, `--x/--no-x`), or the flags its
`json_schema_extra={"flags": [...]}` lists (the first is the primary spelling, the rest deprecated
aliases); its description is the help, its default the default. A list field is comma-separated
text, or with `"repeatable": True` an option given once per item (`--route A --route B`); a field
with `"cli": False` is a config file's only. Ranges and cross-field rules live on
the model, so a bad value prints one line naming the option, the same line a Serve config's key gets.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar, get_args, get_origin

import typer
from pydantic import BaseModel, BeforeValidator, ValidationError
from pydantic.fields import FieldInfo

from cluster.errors import USER_ERRORS, UserError

M = TypeVar("M", bound=BaseModel)


def finite(value: float) -> float:
    """A pydantic field validator: NaN and infinities are no figures."""
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number; got {value}")
    return value


@contextmanager
def user_errors() -> Iterator[None]:
    """Print a user's mistake as one line on stderr and exit 2, without a traceback."""
    try:
        yield
    except USER_ERRORS as e:
        print(f"moe-cluster: error: {e}", file=sys.stderr)
        raise typer.Exit(2) from None


def extra(field: FieldInfo) -> dict[str, Any]:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def flags(name: str, field: FieldInfo) -> list[str]:
    """The option's spellings, primary first."""
    listed = extra(field).get("flags")
    if isinstance(listed, list):
        return [str(f) for f in listed]
    option = f"--{name.replace('_', '-')}"
    return [f"{option}/--no-{option[2:]}"] if field.annotation is bool else [option]


def primary_flag(model: type[BaseModel], name: str) -> str:
    field = model.model_fields.get(name)
    return flags(name, field)[0].split("/")[0] if field is not None else f"--{name.replace('_', '-')}"


def is_list(annotation: Any) -> bool:
    return get_origin(annotation) is list or any(get_origin(a) is list for a in get_args(annotation))


def parameter(name: str, field: FieldInfo, *, positional: bool) -> inspect.Parameter:
    """The typer parameter of one model field; a list field is read as comma-separated text, which
    the model's validator parses (`--concurrency 1,8,64`)."""
    default = None if field.is_required() else field.default
    annotation = field.annotation
    if extra(field).get("repeatable"):  # given once per item; none given: the field's default
        annotation, default = list[str] | None, None
    elif is_list(annotation):
        annotation, default = str | None, None if default is None else ",".join(map(str, default))
    if positional:
        info: Any = typer.Argument(help=field.description, show_default=not field.is_required())
    else:
        info = typer.Option(*flags(name, field), help=field.description)
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if positional else inspect.Parameter.KEYWORD_ONLY
    return inspect.Parameter(
        name, kind, default=inspect.Parameter.empty if field.is_required() else default, annotation=Annotated[annotation, info]
    )


def validate(model: type[M], values: dict[str, Any]) -> M:
    """The model of these values, or UserError naming the option (or, for a rule across options, saying it)."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        first = e.errors()[0]
        message = plain_message(first)
        if not first["loc"]:  # a rule across fields (a model validator): its message names the settings
            raise UserError(message.replace("_", "-")) from None
        raise UserError(f"{primary_flag(model, str(first['loc'][0]))}: {message}") from None


def plain_message(error: Any) -> str:
    """pydantic's message, in the words of a command line for the common range checks, with the value given."""
    bound = error.get("ctx", {})
    kind, given = error["type"], f"; got {error['input']!r}" if "input" in error else ""
    if kind == "greater_than":
        return ("must be positive" if bound["gt"] == 0 else f"must be greater than {bound['gt']}") + given
    if kind == "greater_than_equal":
        return f"must be at least {bound['ge']}{given}"
    if kind in ("less_than_equal", "less_than"):
        return f"must be at most {bound.get('le', bound.get('lt'))}{given}"
    if kind == "literal_error":
        return f"must be one of {bound['expected']}{given}"
    return str(error["msg"]).removeprefix("Value error, ")


def command(
    app: typer.Typer, model: type[M], *, name: str | None = None, arguments: tuple[str, ...] = ()
) -> Callable[[Callable[[M], None]], Callable[[M], None]]:
    """Register `handler(args: model)` as a command whose options are `model`'s fields (`arguments`
    positional, in that order); the values are validated into the model before the handler runs."""

    def register(handler: Callable[[M], None]) -> Callable[[M], None]:
        fields = {n: f for n, f in model.model_fields.items() if extra(f).get("cli", True)}
        repeatable = {n for n, f in fields.items() if extra(f).get("repeatable")}

        def run(**values: Any) -> None:
            with user_errors():
                # A repeatable option not given is left to the model's default; one given once is its one value.
                given = {n: v for n, v in values.items() if not (n in repeatable and not v)}
                args = validate(model, given)
                handler(args)

        params = [parameter(a, fields[a], positional=True) for a in arguments]
        params += [parameter(n, f, positional=False) for n, f in fields.items() if n not in arguments]
        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__doc__ = handler.__doc__
        app.command(name or handler.__name__.replace("_", "-"))(run)
        return handler

    return register


def comma_separated(kind: type, example: str, *, at_least: float | None = None) -> BeforeValidator:
    """For a list field read as text (`--concurrency 1,8,64`): the parsed list, each item finite and at
    least `at_least`; a ValueError that shows an example otherwise."""

    def parse(text: Any) -> Any:
        if not isinstance(text, str):
            return text
        try:
            items = [kind(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(f"takes comma-separated values such as {example}; got {text!r}") from None
        if at_least is not None and not all(math.isfinite(i) and i >= at_least for i in items):
            raise ValueError(f"takes values of at least {at_least:g}, such as {example}; got {text!r}")
        return items

    return BeforeValidator(parse)


Levels = Annotated[list[int], comma_separated(int, "1,8,64", at_least=1)]  # concurrency levels, batches


def start_ray() -> None:
    """Join RAY_ADDRESS when set, else start a local Ray instance for this process."""
    import ray

    ray.init(
        address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False
    )
