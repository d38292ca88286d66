"""Two continuations of a prompt rendered side by side in columns: greedy on the left,
nucleus sampling (``TOP_P``) on the right, as the GPT-J release showed its model. Plain text
only, so ``meshline sample`` imports it without JAX.
"""

from __future__ import annotations

import itertools
import textwrap

TOP_P = 0.9
COLUMN = 48


def _wrapped(text: str, width: int) -> list[str]:
    """Lines of at most ``width`` characters, keeping the text's own line breaks."""
    lines = []
    for line in text.split("\n"):
        lines.extend(textwrap.wrap(line, width, replace_whitespace=False, drop_whitespace=False))
        if not line:
            lines.append("")
    return lines


def side_by_side(prompt: str, greedy: str, nucleus: str, width: int = COLUMN) -> str:
    """The prompt, then the two continuations in columns."""
    left = _wrapped(greedy, width)
    right = _wrapped(nucleus, width)
    header = ["greedy".ljust(width), f"nucleus (top_p {TOP_P}, temperature 1)"]
    rows = [f"prompt: {prompt!r}", " | ".join(header).rstrip(), f"{'-' * width}-+-{'-' * width}"]
    for a, b in itertools.zip_longest(left, right, fillvalue=""):
        rows.append(f"{a.ljust(width)} | {b}".rstrip())
    return "\n".join(rows)
