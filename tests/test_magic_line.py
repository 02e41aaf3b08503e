"""A trailing ``# comment`` after a magic's arguments, and the ``#`` that are not comments."""

import pytest

from kernel_magics.core.magic_line import strip_comment


@pytest.mark.parametrize("line, args", [
    ("--port 8080  # serve it", "--port 8080"),
    ("# only a comment", ""),
    ("./out # config.yaml, model/model.py", "./out"),
    ('{"prompt": "#1 hit"}  # a JSON string holds a #', '{"prompt": "#1 hit"}'),
    ('{"q": "say \\"#\\" twice"} # escaped quotes', '{"q": "say \\"#\\" twice"}'),
    ("'my #dir' --force  # quoted path", "'my #dir' --force"),
    ('"it\'s #here"  # one quote inside the other', '"it\'s #here"'),
    ("a#b c", "a#b c"),  # not at a word's start: part of the word, as in the shell
    ("x;  # hide the result", "x;"),
    ("", ""),
    ("--why", "--why"),
])
def test_strip_comment(line, args):
    assert strip_comment(line) == args
