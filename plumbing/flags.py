"""Command-line flags generated from config dataclasses, so that each setting is written down once.

Every field of a config dataclass is a flag `--field-name`; its help is the docstring written under the field (as
CleanRL's `Args`), its default the field's. `given(parser, argv)` returns only the flags the command line set, in
any form argparse accepts (`--lr 3e-6`, `--lr=3e-6`, an unambiguous prefix such as `--l 3e-6`), so that a caller
can lay them over presets and defaults: what the user typed always wins.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap


def flag(name: str) -> str:
    """A field's flag: `kl_coef` -> `--kl-coef`."""
    return "--" + name.replace("_", "-")


def check(obj, *rules: tuple[str, bool, str]) -> None:
    """Raise ValueError naming the flag of the first rule `(field, holds, what it must be)` that does not hold."""
    for name, holds, rule in rules:
        if not holds:
            raise ValueError(f"{flag(name)} must be {rule}, got {getattr(obj, name)!r}")


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of dataclass `cls` and of the dataclasses it derives from."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for field, doc in zip(body, body[1:]):
            if (isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr)
                    and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
                docs[field.target.id] = " ".join(doc.value.value.split())
    return docs


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return "(empty)" if value == "" else str(value)


def table(cls) -> list[tuple[str, str, str]]:
    """(flag, default, help) of every field of `cls`, in field order: what `--help` and docs/flags.md show."""
    docs = field_docs(cls)
    return [(flag(f.name), _shown(f.default), docs[f.name]) for f in dataclasses.fields(cls)]


def parser(cls, description: str, sections: dict[type, str] | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser with one flag per field of `cls`: booleans as `--x` / `--no-x`, tuples take as many
    values as their default has, `metadata={"choices": ...}` restricts a value. Flags are grouped under the
    title `sections[C]` of the dataclass C that declares them, in the order of `sections`. Unset flags stay out of the namespace."""
    ap = argparse.ArgumentParser(description=description)
    docs = field_docs(cls)
    owner = {}  # field -> the dataclass that declares it (the first in reverse MRO order that has it)
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            for f in dataclasses.fields(klass):
                owner.setdefault(f.name, klass)
    groups = {klass: ap.add_argument_group(title) for klass, title in (sections or {}).items()}
    for f in dataclasses.fields(cls):
        klass = owner[f.name]
        if klass not in groups:
            groups[klass] = ap.add_argument_group(klass.__name__)
        kw = dict(help=f"{docs[f.name]} (default: {_shown(f.default)})".replace("%", "%%"), default=argparse.SUPPRESS)
        if isinstance(f.default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(f.default, tuple):
            kw.update(nargs=len(f.default), type=type(f.default[0]))
        else:
            kw["type"] = type(f.default)
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        groups[klass].add_argument(flag(f.name), **kw)
    return ap


def given(ap: argparse.ArgumentParser, argv: list[str] | None) -> dict:
    """The flags the command line `argv` sets (None: sys.argv), as {field name: value}, tuples as tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(ap.parse_args(argv)).items()}
