"""A small, safe Markdown to HTML renderer for release notes.

Covers what release notes use: headings, paragraphs, bullet and numbered lists, fenced code
blocks, inline code, bold, italics and http(s)/mailto links. Everything is HTML-escaped
first; no raw HTML from the notes ever reaches the output.
"""

from __future__ import annotations

import re
from html import escape

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^\s*[-*+]\s+(.*)$")
_NUMBERED = re.compile(r"^\s*\d+[.)]\s+(.*)$")
_CODE_SPAN = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*|__(.+?)__")
_ITALIC = re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])|(?<!\w)_(?!\s)(.+?)(?<!\s)_(?!\w)")
_LINK = re.compile(r"\[([^\]]+)\]\(((?:https?://|mailto:)[^)\s]+)\)")


def inline(text: str) -> str:
    """Render one line's inline markup; code spans are kept verbatim (escaped)."""
    parts: list[str] = []
    last = 0
    for match in _CODE_SPAN.finditer(text):
        parts.append(_emphasis(text[last : match.start()]))
        parts.append(f"<code>{escape(match.group(1))}</code>")
        last = match.end()
    parts.append(_emphasis(text[last:]))
    return "".join(parts)


def _emphasis(raw: str) -> str:
    out = escape(raw)
    out = _LINK.sub(lambda m: f'<a href="{m.group(2)}">{m.group(1)}</a>', out)
    out = _BOLD.sub(lambda m: f"<strong>{m.group(1) or m.group(2)}</strong>", out)
    return _ITALIC.sub(lambda m: f"<em>{m.group(1) or m.group(2)}</em>", out)


def to_html(markdown: str) -> str:
    """Render ``markdown`` as an HTML fragment."""
    blocks: list[str] = []
    paragraph: list[str] = []
    items: list[str] = []
    list_tag = ""

    def flush() -> None:
        nonlocal list_tag
        if paragraph:
            blocks.append("<p>" + "<br>\n".join(inline(line) for line in paragraph) + "</p>")
            paragraph.clear()
        if items:
            body = "".join(f"<li>{inline(item)}</li>" for item in items)
            blocks.append(f"<{list_tag}>{body}</{list_tag}>")
            items.clear()
            list_tag = ""

    lines = markdown.replace("\r\n", "\n").split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.strip().startswith("```"):
            flush()
            code: list[str] = []
            while i < len(lines) and not lines[i].strip().startswith("```"):
                code.append(lines[i])
                i += 1
            i += 1  # the closing fence
            blocks.append("<pre><code>" + escape("\n".join(code)) + "</code></pre>")
        elif not line.strip():
            flush()
        elif heading := _HEADING.match(line):
            flush()
            level = min(6, len(heading.group(1)) + 2)
            blocks.append(f"<h{level}>{inline(heading.group(2))}</h{level}>")
        elif item := _BULLET.match(line) or _NUMBERED.match(line):
            tag = "ul" if item.re is _BULLET else "ol"
            if paragraph or (items and list_tag != tag):
                flush()
            list_tag = tag
            items.append(item.group(1))
        elif items and line.startswith((" ", "\t")):
            items[-1] += " " + line.strip()
        else:
            if items:
                flush()
            paragraph.append(line.strip())
    flush()
    return "\n".join(blocks)
