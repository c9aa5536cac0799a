"""Command-line pieces every command shares (``launch/*.py``, ``python -m data_prep ...``).

- :class:`HelpFormatter`: ``--help`` keeps the line breaks of the description and epilog, ends every option's
  help with its default as a user would type it (lists space-separated, a flag ``off``) unless the text already
  says it, and shows the reST markup of docstrings as plain text.
- :func:`add_list_argument`: a list flag given either way, ``--langs en fr`` or ``--langs en,fr`` (or mixed).

Imports nothing heavy: the CLI modules use it before torch is loaded.
"""
from __future__ import annotations

import argparse
import re
from pathlib import PurePath
from typing import Any, Callable

_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")  # :func:`x`, :mod:`x` -> x
_LITERAL = re.compile(r"``([^`]*)``")  # ``x`` -> x
_INTERPRETED = re.compile(r"`([^`]+)`")  # `x` -> 'x'


def plain_text(text: str) -> str:
    """``text`` without reST markup: roles and literals become their content, `interpreted` text is quoted."""
    return _INTERPRETED.sub(r"'\1'", _LITERAL.sub(r"\1", _ROLE.sub(r"\1", text)))


def default_text(value: Any) -> str:
    """A default as typed on a command line: ``on``/``off`` for booleans, lists space-separated."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple, set, frozenset)):
        return " ".join(default_text(v) for v in value) or "none"
    if isinstance(value, PurePath):
        return str(value)
    return str(value)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Raw description and epilog (markup removed); each optional flag's help ends with ``(default: X)``.

    Not added where the help already speaks of its default, for required options, and for options whose
    default is None: their help must say in words what happens without them (a test checks every command).
    A flag (no value) shows ``(default: off)``. ``%(default)s`` in a help text is written the same way.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return super()._fill_text(plain_text(text), width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if text is argparse.SUPPRESS:
            return text
        shown = default_text(action.default).replace("%", "%%")
        text = plain_text(text)
        if "%(default)s" in text:  # the help places the default itself
            return text.replace("%(default)s", shown)
        if (not action.option_strings or action.required or action.default is argparse.SUPPRESS
                or "default" in text.lower() or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        if action.nargs == 0:
            return f"{text} (default: off)"
        if action.default is None:
            return text
        return f"{text} (default: {shown})"


def split_list(item_type: Callable[[str], Any] = str) -> Callable[[str], list]:
    """argparse ``type`` of one list-flag word: ``"en,fr"`` -> ``["en", "fr"]``, each item converted."""

    def convert(text: str) -> list:
        items = [item for item in text.replace(",", " ").split() if item]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a value, got {text!r}")
        return [item_type(item) for item in items]

    convert.__name__ = getattr(item_type, "__name__", "value")  # argparse's "invalid int value: ..." message
    return convert


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (argparse then names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def lang_code(text: str) -> str:
    """argparse ``type`` of one language code: any code of the form :data:`ds_kd.schema.LANG_CODE` (``sw``,
    ``zh-hans``, ``pt_br``); another form is an error naming the flag and the code."""
    from ds_kd.schema import lang_code_problem

    if (problem := lang_code_problem(text)) is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


class ListAction(argparse.Action):
    """Store the words of a ``nargs="+"`` flag, each split on commas by :func:`split_list`, as one flat list."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [item for value in values for item in value])


def add_list_argument(container, *flags: str, item_type: Callable[[str], Any] = str, **kwargs) -> argparse.Action:
    """Add a list flag to a parser or group: ``--langs en fr``, ``--langs en,fr`` and ``--langs "en fr"`` all
    give ``["en", "fr"]``. ``item_type`` converts each item (e.g. int for seeds)."""
    return container.add_argument(*flags, nargs="+", type=split_list(item_type), action=ListAction, **kwargs)


def field_doc(cls: type, name: str) -> str:
    """The docstring under dataclass ``cls``'s field ``name`` (empty if none), so that ``--help`` and the dataclass
    say the same."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(cls)).body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and node.target.id == name and isinstance(nxt, ast.Expr):
            return " ".join(nxt.value.value.split())
    return ""
