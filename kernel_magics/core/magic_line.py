"""What follows a magic's name on its line, as a user writes it: a trailing ``# comment`` is not part of it.

IPython hands everything after a line magic's name to the magic, comment included;
the magics and the CLI's reading of a saved notebook both drop it the same way.
"""

from __future__ import annotations

__all__ = ["strip_comment"]


def strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment``.

    A ``#`` starts a comment where the shell's would: at the start of a word, outside quotes (so
    ``{"tag": "#1"}``, ``'my #dir'`` and ``a#b`` keep theirs). Inside quotes a backslash escapes the
    next character, as in JSON, Python and the shell's double quotes.
    """
    quote = None
    escaped = False
    for i, char in enumerate(line):
        if quote is not None:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line
