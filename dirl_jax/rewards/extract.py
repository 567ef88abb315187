"""Answer extraction (DIRL_SPEC §3.1)."""

from __future__ import annotations


def extract_last_boxed(text: str) -> str | None:
    """Contents of the last ``boxed{...}`` (backslash optional), brace-balanced; None if absent
    or unbalanced."""
    start = text.rfind("boxed{")
    if start < 0:
        return None
    i = start + len("boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None
