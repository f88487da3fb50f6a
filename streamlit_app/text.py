"""How text is shown: user text literally, model replies as Markdown with nothing executable.

User text: every Markdown (and Streamlit directive: colours, emoji shortcodes, LaTeX) character
is escaped and line breaks kept, so it reads exactly as typed.

Model replies: rendered as the Markdown they are (code blocks highlighted with a copy button,
lists, tables, headings), as every chat assistant does. Outside code: `<` is escaped, so no
HTML tag is ever a tag (Streamlit also refuses HTML unless `unsafe_allow_html`); `$` and `:` are
escaped, so prices are not LaTeX and `:red[...]` is not a directive; links go only to http(s)
and mailto, and images are never fetched: any other link or image is shown as its text.
Inside code blocks and inline code nothing is escaped (Markdown shows code literally). A block
still open while the reply streams is treated as code to its end.
"""

import re

_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~<>$:&=\"'^])")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
_UNSAFE_LINK = re.compile(
    r"!\[[^\]\n]*\]\([^)\n]*\)"  # any image
    r"|\[[^\]\n]*\]\(\s*<?(?!https?://|mailto:)[^)\n]*\)")  # a link to anything else
_PROSE = re.compile(r"([<$:])")


def as_text(content: str) -> str:
    escaped = _SPECIAL.sub(r"\\\1", content)
    return escaped.replace("\n", "  \n")


def _prose(text: str) -> str:
    parts = []
    last = 0
    for m in _UNSAFE_LINK.finditer(text):
        parts.append(_safe_prose(text[last:m.start()]))
        parts.append(_SPECIAL.sub(r"\\\1", m.group(0)))
        last = m.end()
    parts.append(_safe_prose(text[last:]))
    return "".join(parts)


def _safe_prose(text: str) -> str:
    # keep the colon of a link's own http(s):// destination, escape every other one
    out = _PROSE.sub(r"\\\1", text)
    return re.sub(r"\]\((\s*<?)(https?|mailto)\\:", r"](\1\2:", out)


def _line(line: str) -> str:
    out, last = [], 0
    for m in _INLINE_CODE.finditer(line):
        out.append(_prose(line[last:m.start()]))
        out.append(m.group(0))
        last = m.end()
    out.append(_prose(line[last:]))
    return "".join(out)


def as_markdown(content: str) -> str:
    """A model reply as safe Markdown (see the module's docstring)."""
    lines, fence = [], None
    for line in content.split("\n"):
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
            lines.append(line)
        elif fence is not None:
            lines.append(line)
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) \
                    and not line.strip()[len(m.group(1)):].strip():
                fence = None
        else:
            lines.append(_line(line))
    return "\n".join(lines)
