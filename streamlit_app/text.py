"""Showing user and model text as text: no Markdown, HTML or script is ever interpreted.

Streamlit already escapes HTML in Markdown; this also escapes every Markdown (and Streamlit
directive: colours, emoji shortcodes, LaTeX) character, and keeps line breaks.
"""

import re

_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~<>$:&=\"'^])")


def as_text(content: str) -> str:
    escaped = _SPECIAL.sub(r"\\\1", content)
    return escaped.replace("\n", "  \n")
