"""Staged traffic splits: an alias that clients put in the OpenAI `model` field, served by several models by weight.

`--route chat=mistral:75,mixtral:25` sends about three requests in four that ask for `chat` to mistral and
the rest to mixtral, so a new model can take a share of the traffic before it takes all of it.
A request's `user` field keeps that user on one model while the weights stand, so a conversation does not
switch models between turns; requests without a `user` are split at random.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from cluster.errors import UserError

EXAMPLE = "--route chat=A:75,B:25"  # the expected form, shown in every parsing error


def _bad(text: str, problem: str) -> UserError:
    return UserError(f"route {text!r}: {problem}; write ALIAS=NAME:WEIGHT,..., as in {EXAMPLE}")


@dataclass(frozen=True)
class Split:
    """Requests for `alias` go to the named models in proportion to their weights (zero: none)."""

    alias: str
    targets: tuple[tuple[str, float], ...]  # (served model, weight)

    def __post_init__(self) -> None:
        text = f"{self.alias}={','.join(f'{name}:{weight:g}' for name, weight in self.targets)}"
        if not self.alias:
            raise _bad(text, "the alias before '=' is empty")
        if not self.targets:
            raise _bad(text, "there are no targets after '='")
        seen: set[str] = set()
        for name, weight in self.targets:
            if not name:
                raise _bad(text, "a target has an empty model name")
            if name in seen:
                raise _bad(text, f"{name!r} is named twice; give each model one weight")
            seen.add(name)
            if not math.isfinite(weight) or weight < 0:
                raise _bad(text, f"the weight of {name!r} is {weight}; a weight is a finite number, 0 or more")
        if not any(weight > 0 for _, weight in self.targets):
            raise _bad(text, "every weight is 0; give at least one model a weight above 0")

    @classmethod
    def parse(cls, text: str) -> Split:
        """A split from `ALIAS=NAME:WEIGHT,NAME:WEIGHT,...`, the value of one --route."""
        alias, equals, targets_text = text.partition("=")
        if not equals:
            raise _bad(text, "there is no '=' between the alias and its targets")
        return cls.of(alias, targets_text)

    @classmethod
    def of(cls, alias: str, targets_text: str) -> Split:
        """A split of `alias` from `NAME:WEIGHT,NAME:WEIGHT,...`, the part of a --route after '='."""
        alias, text = alias.strip(), f"{alias}={targets_text}"
        if not alias:
            raise _bad(text, "the alias before '=' is empty")
        if not targets_text.strip():
            raise _bad(text, "there are no targets after '='")
        return cls(alias, tuple(_target(text, part.strip()) for part in targets_text.split(",")))

    def pick(self, user: str | None) -> str:
        """The model that serves this request: always the same one for a user while the weights stand."""
        # An empty `user` names no one: hashing it would put every such request on one model.
        u = _unit(f"{self.alias}\0{user}") if user else random.random()
        total = sum(weight for _, weight in self.targets)
        # Users take their model from where u falls among the cumulative shares. Moving weight from the
        # first target to the second moves users only that way, so a staged rollout never sends users back.
        reached = 0.0
        for name, weight in self.targets:
            reached += weight / total
            if u < reached:
                return name
        # Rounding can leave the last share just short of 1: u is then in the last model with a weight.
        return next(name for name, weight in reversed(self.targets) if weight > 0)

    def to_json(self) -> dict[str, Any]:
        return {"alias": self.alias, "targets": [{"model": name, "weight": weight} for name, weight in self.targets]}


def _target(text: str, part: str) -> tuple[str, float]:
    """One `NAME:WEIGHT`; the weight is after the last ':', so a model name may hold ':' itself."""
    if not part:
        raise _bad(text, "there is an empty target between two commas")
    name, colon, weight_text = part.rpartition(":")
    if not colon:
        raise _bad(text, f"target {part!r} has no ':WEIGHT'")
    try:
        weight = float(weight_text)
    except ValueError:
        raise _bad(text, f"the weight {weight_text!r} of {name.strip()!r} is not a number") from None
    return name.strip(), weight


def _unit(key: str) -> float:
    """`key` hashed to [0, 1): the same in every process, unlike Python's hash(), which is salted per process."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class RouteTable:
    """The live splits by alias. Read on every request and changed by an operator's command on the same asyncio
    loop: a change replaces the whole mapping and the immutable Splits in it, so a reader never sees half of one."""

    def __init__(self, splits: Iterable[Split], models: Collection[str]) -> None:
        self.models = tuple(models)
        table: dict[str, Split] = {}
        for split in splits:
            if split.alias in table:
                raise UserError(f"--route {split.alias}=... is given twice; give one --route per alias")
            self._check(split)
            table[split.alias] = split
        self._splits = table

    def _check(self, split: Split) -> None:
        served = ", ".join(self.models) or "(none)"
        if split.alias in self.models:
            raise UserError(
                f"route alias {split.alias!r} is the name of a served model; choose an alias that is not (served: {served})"
            )
        for name, _ in split.targets:
            if name not in self.models:
                raise UserError(f"route {split.alias!r}: {name!r} is not a served model; route to one of: {served}")

    def resolve(self, model: str, user: str | None) -> str:
        """The served model for a request's `model` and `user`: the alias's pick, or `model` if it is no alias."""
        split = self._splits.get(model)
        return split.pick(user) if split is not None else model

    def set(self, split: Split) -> None:
        """Replace (or add) the alias's split; requests resolved from now on follow it. The targets keep
        the order they had (new ones after them): a user's place on the line of cumulative weights is
        fixed, so weight moved between neighbours moves users only that way."""
        self._check(split)
        if (old := self._splits.get(split.alias)) is not None:
            place = {name: i for i, (name, _) in enumerate(old.targets)}
            ordered = sorted(split.targets, key=lambda t: place.get(t[0], len(place)))
            split = Split(split.alias, tuple(ordered))
        self._splits = {**self._splits, split.alias: split}

    def aliases(self) -> list[str]:
        return sorted(self._splits)

    def get(self, alias: str) -> Split | None:
        return self._splits.get(alias)

    def splits(self) -> list[Split]:
        return [self._splits[alias] for alias in self.aliases()]

    def to_json(self) -> list[dict[str, Any]]:
        return [self._splits[alias].to_json() for alias in self.aliases()]
