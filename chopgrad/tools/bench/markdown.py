"""Markdown sections of a results file that a benchmark script owns and rewrites."""
from __future__ import annotations

import os
from typing import Optional


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_section(path: str, name: str, body: str, heading: Optional[str] = None) -> None:
    """Put `body` between the `name` markers of the markdown file at `path`.

    The markers' old content is replaced; without markers the section is appended (under `heading`, when
    given). A missing file is created.
    """
    start, end = markers(name)
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    section = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + (f"## {heading}\n\n" if heading else "") + section + "\n"
    with open(path, "w") as f:
        f.write(text)


def publish_table(header: str, lines: list[str], results: Optional[str], name: str, heading: str) -> str:
    """The table (`header`, a blank line, the markdown `lines`), printed and, when `results` names a file, put
    into its `name` section."""
    table = "\n".join([header, "", *lines])
    print("\n" + table)
    if results:
        replace_section(results, name, table, heading=heading)
    return table
