"""Text normalisation shared by queries and candidates (M-BEIR's `format_string`)."""

from __future__ import annotations


def format_string(text: str | None) -> str:
    """Normalise a text the M-BEIR way: drop carriage returns, strip whitespace and surrounding double
    quotes, capitalise the first character, end with a period unless it ends in . ? or !.

    >>> format_string(' "a photo of a dog\\r" ')
    'A photo of a dog.'
    >>> format_string("")
    ''
    """
    if not text:
        return ""
    text = text.replace("\r", "").strip().strip('"').strip()
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    if text[-1] not in ".?!":
        text += "."
    return text
