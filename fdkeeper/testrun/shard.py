"""`fdkeeper run --shard K/N`: the Kth of N shares of the test files, for a CI matrix.

Every machine of the matrix is given the same files (the same glob in the same repository)
and must pick the same share without talking to the others, so the choice depends on
nothing but the files' paths below their common folder (not where the checkout is, not the
order the shell listed them): sorted by that relative path, the file at index i goes to
shard i mod N + 1. By index rather than by a hash of the path, so the shares differ by one
file at most (a hash leaves a small suite's shards uneven, some empty); the price, a file
added may move others to another shard, costs nothing, as each CI run shards afresh.
A file given twice is run once.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import click

_FORM = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    index: int  # K: 1 to count
    count: int  # N

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def select(self, paths: list[Path]) -> list[Path]:
        """This shard's files of ``paths``, in the order of their relative paths."""
        ordered = sorted(_by_relative_path(paths).items())
        return [path for number, (_, path) in enumerate(ordered) if number % self.count == self.index - 1]


def parse_shard(text: str) -> Shard:
    """'2/3' -> Shard(2, 3); ValueError saying the form otherwise."""
    match = _FORM.match(text)
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise ValueError(f"expected K/N with 1 <= K <= N (this machine's share of N, e.g. 2/3), got {text!r}")
    return Shard(int(match.group(1)), int(match.group(2)))


def _by_relative_path(paths: list[Path]) -> dict[str, Path]:
    """Each file by its path below the folder all of them share, as '/'-separated text."""
    absolute = [os.path.abspath(path) for path in paths]  # lexical: a symlinked checkout shards alike
    if not absolute:
        return {}
    root = os.path.commonpath([os.path.dirname(path) for path in absolute])
    keyed: dict[str, Path] = {}
    for path, full in zip(paths, absolute, strict=True):
        keyed.setdefault(Path(os.path.relpath(full, root)).as_posix(), path)
    return keyed


def shard_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Shard | None:
    """The --shard option's callback: K/N as a Shard, or a usage error (exit 2) saying the form."""
    try:
        return parse_shard(value) if value is not None else None
    except ValueError as error:
        raise click.BadParameter(str(error), ctx, param) from None
