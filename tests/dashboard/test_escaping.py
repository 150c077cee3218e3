"""User-supplied text rendered in Streamlit markdown shows literally (dashboard.views.common.md)."""
from __future__ import annotations

import re

from dashboard.views.common import md


def test_markdown_and_directives_are_neutralised() -> None:
    for raw in ("mallory[/]", "evil[/bold]", "[click](javascript:alert(1))", "![x](http://evil/t.png)",
                ":red[alarm]", "*bold* _it_ `code` $x^2$ ~~s~~ # h | t", "a\\[b"):
        out = md(raw)
        assert re.search(r"(?<!\\)[\[\]`*_$~#|]", out.replace("\\\\", "")) is None, out  # every special escaped
        assert re.sub(r"\\(.)", r"\1", out) == raw  # and nothing else changes: unescaping gives the text back
    assert md("job 3 (failed): could not load the adapter: boom") == "job 3 (failed): could not load the adapter: boom"
