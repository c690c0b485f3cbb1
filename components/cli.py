"""One command-line style for every command: jsonargparse over a typed dataclass.

``train.py`` is a LightningCLI; the other commands (``sample.py``, ``evaluate.py``,
``python -m miniworld.study``, ...) parse their options the same way: each option is a
field of a dataclass (its type checks the value, its ``Args:`` docstring line is the
``--help`` text), ``--config file.yaml`` loads keys of the same names (repeatable: a
later file, and any later option, overrides an earlier one) and ``--print_config``
prints the resolved options as YAML that ``--config`` reads back.

The canonical spelling of an option is the field's name (``--num_images``, as in the
YAML). The older dashed spellings (``--num-images``) keep working: :func:`normalise_argv`
rewrites them, and a command may map a retired flag onto the canonical one
(``--no-dino`` -> ``--dino null``).

    parser = command_parser(SampleOptions, prog="sample.py", description="...")
    options = parse_options(parser, SampleOptions, argv, aliases={"--set": set_alias})
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence, TypeVar, Union

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

from components.errors import UserError, debug_requested, exit_user_error

T = TypeVar("T")

CONFIG_HELP = ("YAML file (or inline YAML) of these options' keys; repeatable: a later --config, and any option "
               "after it, overrides what came before. --print_config prints the resolved options as such a file")
SPELLING_NOTE = ("Options are spelled as their YAML keys (--num_images), the canonical form;\n"
                 "the older dashed spellings (--num-images) still work.")

#: an alias: the replacement words for a flag, or a function of the flag's value -> words
Alias = Union[Sequence[str], Callable[[str], Sequence[str]]]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help (types, defaults, ENV) that keeps the description and epilog's line breaks."""


def command_parser(options: type, prog: str, description: str, epilog: str | None = None,
                   skip: set[str] | None = None, positional: bool = False) -> ArgumentParser:
    """A parser of ``options`` (a dataclass) with ``--config`` and ``--print_config``;
    ``positional``: its fields without a default are positional arguments."""
    parser = ArgumentParser(prog=prog, description=f"{description}\n\n{SPELLING_NOTE}", epilog=epilog,
                            formatter_class=HelpFormatter, print_config="--print_config")
    parser.add_argument("--config", action=ActionConfigFile, help=CONFIG_HELP)
    parser.add_class_arguments(options, as_group=False, as_positional=positional, skip=skip, fail_untyped=False,
                               instantiate=False)
    return parser


def option_names(parser: ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings if s.startswith("--")}


def normalise_argv(argv: Sequence[str], parser: ArgumentParser, aliases: dict[str, Alias] | None = None,
                   lists: set[str] = frozenset(), bare: dict[str, str] | None = None) -> list[str]:
    """``argv`` with the old spellings rewritten: ``--foo-bar`` -> ``--foo_bar`` (when that is an
    option), ``--foo-bar=v`` -> ``--foo_bar=v``, each alias flag replaced by its words (an
    alias that is a function takes the flag's value, the next word), and the words after a
    list option (``lists``), up to the next option, made one list (``--concepts a b`` ->
    ``--concepts '["a", "b"]'``, as argparse's ``nargs="+"`` took them); a ``bare`` flag
    given without a value takes its value there (``--compile`` -> ``--compile default``, as
    argparse's ``nargs="?"`` with a ``const``). Values are never rewritten."""
    known, aliases, out = option_names(parser), aliases or {}, []
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if not word.startswith("--") or word == "--":
            out.append(word)
            continue
        flag, eq, value = word.partition("=")
        if flag in aliases:
            alias = aliases[flag]
            if callable(alias):
                if not eq:
                    if i >= len(words):
                        raise UserError(f"{flag} needs a value")
                    value, i = words[i], i + 1
                out.extend(alias(value))
                continue
            flag, *rest = alias
            if rest:  # an alias with its value: --no-dino -> --dino null
                out.extend([flag, *rest])
                continue
        elif "-" in flag[2:]:
            canonical = "--" + flag[2:].replace("-", "_")
            if canonical in known or canonical.split(".")[0] in known:
                flag = canonical
        if bare and flag in bare and not eq and (i >= len(words) or words[i].startswith("--")):
            out.extend([flag, bare[flag]])
            continue
        if flag in lists and not eq:
            items = []
            while i < len(words) and not (words[i].startswith("--") and len(words[i]) > 2):
                items.append(words[i])
                i += 1
            if len(items) == 1 and items[0].lstrip().startswith("["):
                out.extend([flag, items[0]])  # already a list
            else:
                out.extend([flag, json.dumps(items)])
            continue
        out.append(flag + eq + value)
    return out


def _is_list(annotation) -> bool:
    """``list[...]``, optionally in a union with None (``list[str] | None``, ``Optional[list[str]]``)."""
    if typing.get_origin(annotation) is list:
        return True
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1 and _is_list(args[0])


def list_options(options: type) -> set[str]:
    """The flags of ``options``' list-typed fields."""
    hints = typing.get_type_hints(options)
    return {f"--{f.name}" for f in dataclasses.fields(options) if _is_list(hints[f.name])}


def parse_options(parser: ArgumentParser, options: type[T], argv: Sequence[str] | None,
                  aliases: dict[str, Alias] | None = None, bare: dict[str, str] | None = None) -> T:
    """``options`` from the command line (``sys.argv[1:]`` when ``argv`` is None), old
    spellings rewritten by :func:`normalise_argv`."""
    argv = sys.argv[1:] if argv is None else argv
    namespace = parser.parse_args(normalise_argv(argv, parser, aliases, list_options(options), bare))
    return _as_options(options, namespace.as_dict())


def _as_options(options: type[T], values: dict) -> T:
    """The dataclass from parsed values (jsonargparse's own keys, ``config`` and the like, left out)."""
    names = {f.name for f in dataclasses.fields(options)}
    return options(**{k: v for k, v in values.items() if k in names})


def subcommands_parser(prog: str, description: str, commands: dict[str, tuple[type, str]],
                       positional: bool = False) -> ArgumentParser:
    """A parser of ``prog <command> ...``: one :func:`command_parser` per command
    (``commands``: name -> (options dataclass, one-line help))."""
    parser = ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    sub = parser.add_subcommands(dest="command", required=True)
    for name, (options, help_) in commands.items():
        sub.add_subcommand(name, command_parser(options, prog=f"{prog} {name}", description=help_,
                                                positional=positional), help=help_)
    return parser


def parse_subcommand(parser: ArgumentParser, commands: dict[str, tuple[type, str]], argv: Sequence[str] | None,
                     aliases: dict[str, Alias] | None = None) -> tuple[str, object]:
    """(command, its options dataclass) from the command line, old spellings rewritten."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in commands), None)
    if command is not None:
        at = argv.index(command)
        sub = parser._subcommands_action._name_parser_map[command]
        argv[at + 1:] = normalise_argv(argv[at + 1:], sub, aliases, list_options(commands[command][0]))
    namespace = parser.parse_args(argv)
    return namespace.command, _as_options(commands[namespace.command][0], namespace[namespace.command].as_dict())


def set_alias(option: str = "--settings", flag: str = "--set") -> Callable[[str], list[str]]:
    """The alias of the old ``--set KEY=VALUE`` (repeatable): ``--settings.KEY VALUE``, one key
    of a mapping option (the value is YAML, as before)."""

    def words(item: str) -> list[str]:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} {item!r}: write KEY=VALUE, e.g. {flag} guidance=5",
                            fix=f"or {option}.guidance 5")
        return [f"{option}.{key.strip()}", value]

    return words


@contextmanager
def user_errors(prog: str, kinds: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)) -> Iterator[None]:
    """Inside: an exception of ``kinds`` is a user mistake, printed as one message (``prog: error:
    ...``, its fix on the next line) with exit status 2, no traceback. For the checks a
    command runs before any work (settings, files, names); ``PERSONALIZE_DEBUG=1`` (which
    ``--debug`` sets) lets them raise with their traceback."""
    try:
        yield
    except kinds as err:
        if debug_requested([]):
            raise
        exit_user_error(prog, err)
