"""mkdocs hooks: the configuration and command references, generated from the code at each build.

A page names what it wants with a marker on a line of its own: ``<!-- generated: settings -->``
(every field of ``archiver.config.Settings``, its variable, flag, default and meaning) or
``<!-- generated: commands -->`` (every command of ``archiver.cli``'s parser, with its options).
A setting or a command added to the code is in the next build; one without a description fails
it (``mkdocs build --strict`` runs in the test suite).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's archiver, installed or not

from archiver.cli import _config_options, build_parser
from archiver.config import ENV_NAMES, Settings

SETTINGS_MARKER = "<!-- generated: settings -->"
COMMANDS_MARKER = "<!-- generated: commands -->"


class UndocumentedError(Exception):
    """A setting or an option of the code has no text to document it with."""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def setting_flags() -> dict[str, tuple[str, list[str]]]:
    """Each setting a flag can give: the flag, and the commands that take it."""
    commands = _subcommands(build_parser())
    found: dict[str, tuple[str, list[str]]] = {}
    for name, sub in commands.items():
        for action in _options(sub):
            if action.dest in Settings.model_fields:
                _, users = found.setdefault(action.dest, (action.option_strings[0], []))
                users.append(name)
    return found


def _default(name: str) -> str:
    value = Settings.model_fields[name].default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def settings_table() -> str:
    """One row per setting: variable, flag, default, meaning."""
    flags = setting_flags()
    every = set(_subcommands(build_parser()))
    lines = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        if not field.description:
            raise UndocumentedError(f"archiver.config.Settings.{name} has no description")
        flag = ""
        if name in flags:
            option, users = flags[name]
            flag = f"`{option}`" + ("" if set(users) == every else f" ({', '.join(f'`{u}`' for u in users)})")
        lines.append(f"| `{ENV_NAMES[name]}` | {flag} | {_default(name)} | {_cell(field.description)} |")
    return "\n".join(lines)


def _option_text(action: argparse.Action) -> str:
    names = ", ".join(f"`{o}`" for o in action.option_strings)
    if action.metavar or (action.nargs != 0 and action.choices is None):
        names += f" `{action.metavar or action.dest.upper()}`"
    elif action.choices is not None:
        names += " `{" + ",".join(str(c) for c in action.choices) + "}`"
    return names


def _usage(parser: argparse.ArgumentParser) -> str:
    """The usage line at a fixed width, whatever the terminal building the site."""
    formatter = argparse.HelpFormatter(parser.prog, width=100)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def commands_reference() -> str:
    """Every command: what it does, its usage, its own options and its example."""
    parser = build_parser()
    shared = {a.dest for a in _options(_config_options())}
    out: list[str] = []
    for name, sub in _subcommands(parser).items():
        if not sub.description or not sub.epilog:
            raise UndocumentedError(f"the command '{name}' has no description or example")
        out += [f"### `desto-archiver {name}`", "", sub.description, "", "```", _usage(sub), "```", ""]
        rows: list[str] = []
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or action.dest in shared:
                continue
            if not action.help:
                raise UndocumentedError(f"'{name}': {action.dest} has no help text")
            label = _option_text(action) if action.option_strings else f"`{action.metavar or action.dest}`"
            choices = (
                "" if action.option_strings or action.choices is None else f" (one of: {', '.join(action.choices)})"
            )
            rows.append(f"| {label} | {_cell(action.help)}{choices} |")
        if rows:
            out += ["| argument | meaning |", "|---|---|", *rows, ""]
        example = sub.epilog.removeprefix("Example:").strip()
        out += ["Example:", "", "```sh", example, "```", ""]
    return "\n".join(out).rstrip() + "\n"


def shared_options() -> str:
    """The configuration options every command takes."""
    rows = [f"| {_option_text(a)} | {_cell(a.help or '')} |" for a in _options(_config_options())]
    return "\n".join(["| option | meaning |", "|---|---|", *rows])


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    if SETTINGS_MARKER in markdown:
        markdown = markdown.replace(SETTINGS_MARKER, settings_table())
    if COMMANDS_MARKER in markdown:
        markdown = markdown.replace(COMMANDS_MARKER, shared_options() + "\n\n" + commands_reference())
    return markdown
