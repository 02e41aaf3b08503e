"""Tab completion of the magics' options (``%model_export --f<Tab>`` -> ``--force``), from their own argument parsers.

IPython's completer does not read magic_arguments parsers: without this, Tab after ``%model_export --`` offered the
notebook's Python names (Jedi completes ``--f`` as ``- -f``). One matcher (IPython's matcher API v2) for every
``%model_`` line magic: on an option, or the value of an option with choices (``--device c`` -> ``cpu``, ``cuda``),
it answers alone; on an argument that is a path (the directory of ``%model_export``, ``--data``) it answers with
IPython's own file completions alone (Jedi put ``obj``, ``open`` ... first); anywhere else (an input) it answers
nothing, and IPython's completers answer as before.
"""

from __future__ import annotations

import re
from typing import Any

_REGISTERED = "_kernel_magics_completion"  # set on the shell: %reload_ext registers no second matcher
PATH_NAMES = frozenset({"DIR", "PATH"})  # an argument shown as one of these in the usage line takes a path


def install(shell: Any) -> None:
    completer = getattr(shell, "Completer", None)
    if completer is None or getattr(shell, _REGISTERED, False) or not hasattr(completer, "custom_matchers"):
        return

    def kernel_magics_options(context: Any) -> dict:
        found = options_at(shell, context.text_until_cursor)
        if found is None:
            if takes_a_path(shell, context.text_until_cursor):
                return {**completer.file_matcher(context), "suppress": True}
            return {"completions": []}
        from IPython.core.completer import SimpleCompletion

        return {"completions": [SimpleCompletion(text, type="option") for text in found], "suppress": True}

    kernel_magics_options.matcher_api_version = 2
    completer.custom_matchers.append(kernel_magics_options)
    setattr(shell, _REGISTERED, True)


def options_at(shell: Any, before_cursor: str) -> Any:
    """What to offer for the word that ends ``before_cursor`` (one line of a %model_ magic), or None."""
    words = before_cursor.split()
    if not words or not words[0].startswith("%model_") or len(words) == 1 and not before_cursor.endswith(" "):
        return None
    magic = shell.magics_manager.magics.get("line", {}).get(words[0][1:])  # (the one registered now)
    parser = getattr(magic, "parser", None)
    if parser is None:
        return None
    typing = "" if before_cursor.endswith(" ") else words[-1]
    previous = words[-1] if not typing else (words[-2] if len(words) >= 2 else "")
    for action in parser._actions:
        if previous in action.option_strings and action.nargs != 0:  # the value of this option: its choices, if any
            choices = [str(c) for c in action.choices or () if str(c).startswith(typing)]
            return choices or None
    if re.fullmatch(r"--?[\w-]*", typing):  # (not `-np.`, an input, nor `--engine=r`)
        return sorted(option for action in parser._actions for option in action.option_strings
                      if option.startswith("--") and option != "--help" and option.startswith(typing)) or None
    # A positional argument with choices (`%model_show config.yaml`), when no value of it is there yet.
    given = [w for w in words[1:len(words) - bool(typing)] if not w.startswith("-")]
    positional = next((a for a in parser._actions if not a.option_strings and a.choices), None)
    if positional is not None and not any(w in positional.choices for w in given):
        return [str(c) for c in positional.choices if str(c).startswith(typing)] or None
    return None


def takes_a_path(shell: Any, before_cursor: str) -> bool:
    """Whether the word that ends ``before_cursor`` is a path: the value of an option, or a positional argument,
    shown as DIR or PATH in the usage line."""
    words = before_cursor.split()
    if not words or not words[0].startswith("%model_") or len(words) == 1 and not before_cursor.endswith(" "):
        return False
    parser = getattr(shell.magics_manager.magics.get("line", {}).get(words[0][1:]), "parser", None)
    if parser is None:
        return False
    earlier = words[1:] if before_cursor.endswith(" ") else words[1:-1]
    if earlier and earlier[-1].startswith("-"):
        action = next((a for a in parser._actions if earlier[-1] in a.option_strings), None)
        if action is not None and action.nargs != 0:  # the value of that option
            return _shown_as(action) in PATH_NAMES
    # A positional: the how-many-th, once the options' values are left out.
    given, skip = 0, False
    for word in earlier:
        if skip:
            skip = False
        elif word.startswith("-"):
            action = next((a for a in parser._actions if word in a.option_strings), None)
            skip = action is not None and action.nargs != 0
        else:
            given += 1
    positionals = [a for a in parser._actions if not a.option_strings]
    return given < len(positionals) and _shown_as(positionals[given]) in PATH_NAMES


def _shown_as(action: Any) -> str:
    return str(action.metavar or action.dest).upper()
