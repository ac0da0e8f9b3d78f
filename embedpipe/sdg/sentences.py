"""Prose sentences of a passage, with their character spans, and code kept out.

Why not a regex on `[.!?] `: documentation is full of periods that end nothing ("e.g.", "i.e.", "etc.",
"Mr.", "3.10.2", "os.path.join()", "section 3.1"), and cutting there gives pseudo-queries such as
"... is a shared library (e.g." that teach a retrieval model nothing. Sentence boundaries come from
pysbd (rule-based, offline, pure Python, with the Golden Rules for abbreviations, numbers and
parentheses); this module decides *what is prose*:

- fenced code blocks (lines of three backticks or tildes, the convention the chunker emits) are code;
- code-like lines outside fences are code too: doctest/shell prompts (`>>>`, `...`, `$`), assignments
  (`name = value`), a call or definition opening a line (`foo(...)`, `def`, `class`, `import`),
  markup lines (`<tag>`, `{`, `}`), table rows (`|`), headings (`#`) and lines dense in symbols;
- a paragraph is a run of prose lines; hard line breaks inside it become spaces (same length, so
  spans stay valid), because wrapped source text must not end a sentence at every line end; a short
  unpunctuated line before a capitalised one is a heading and joins no sentence.

Spans index the original text, so a caller can cut a sentence out of its passage (inverse cloze).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import pysbd

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_START = re.compile(
    r"^\s*(?:>>>|\.\.\.\s|\$\s|%\s|#!|@\w|</?[A-Za-z!][^>]*>|[{}\[\]]\s*$"
    r"|(?:async\s+)?def\s+\w+\s*\(|class\s+\w+\s*[(:]"
    r"|(?:if|elif|else|for|while|try|except|finally|with)\b.*:\s*$"
    r"|import\s+[\w.]+(?:\s+as\s+\w+)?(?:\s*,\s*[\w.]+)*\s*$|from\s+[\w.]+\s+import\s"
    r"|return(?:\s*$|\s+[\w.]+\()|raise\s+\w+(?:Error|Exception)\b)"
)
_ASSIGN = re.compile(r"^\s*[A-Za-z_][\w.\[\]'\"]*\s*(?:[-+*/|&]|\*\*)?=(?!=)\s*\S")
_CALL_START = re.compile(r"^\s*[A-Za-z_][\w.]*\s?\(")
_SYMBOLS = set("{}[]()<>=;$#@\\/*&|~^`'\"_:")
_TERMINAL = re.compile(r"[.!?][\"')\]”’]*$")
_CLOSED = re.compile(r"(?<!\b[ie]\.[ge])[.!?:;][\"')\]”’]*$")  # ends a sentence (not at "i.e.")
_BULLET = re.compile(r"^\s*(?:[-*+•]|\d{1,3}[.)])\s+")
_BULLET_LINE = re.compile(r"^[ \t]*(?:[-*+•]|\d{1,3}[.)])[ \t]+", re.M)
_MARKS = re.compile(r"\*\*|__|``?")
_MARKUP = re.compile(r"::|:\w+:`|`[^`]*`_|\.\. \w+|\{\{|\}\}|\{%|%\}")


@dataclass(frozen=True)
class Sentence:
    """A sentence of prose: its cleaned text and its [start, end) span in the original passage text."""

    text: str
    start: int
    end: int


def symbol_ratio(text: str) -> float:
    """Share of non-space characters that are code punctuation (prose: ~0.02, code: 0.15+)."""
    chars = [c for c in text if not c.isspace()]
    return sum(c in _SYMBOLS for c in chars) / len(chars) if chars else 0.0


def is_code_line(line: str) -> bool:
    """A line that is code, a prompt, markup, a table row or a heading rather than prose."""
    s = line.strip()
    if not s:
        return False
    if s.startswith(("#", "|", "+-", "==", "--")) or s.count("|") >= 2:
        return True
    if _CODE_START.match(s) or _ASSIGN.match(s):
        return True
    if _CALL_START.match(s) and not _TERMINAL.search(s):
        return True  # `foo(bar, baz)` or `setup (name = 'x', ...` opening a line, not a sentence
    if s.endswith(("{", ";", "(", ",")) and symbol_ratio(s) > 0.08:
        return True
    return symbol_ratio(s) > 0.15


def is_code_like(sentence: str) -> bool:
    """A sentence that reads as code or markup (used on candidates that survived the line filter)."""
    return (
        is_code_line(sentence)
        or bool(_MARKUP.search(sentence))
        or sentence.count("(") != sentence.count(")")
        or sentence.count("[") != sentence.count("]")
        or "=" in sentence.replace("==", "")
        and symbol_ratio(sentence) > 0.06
    )


def _is_heading(line: str, next_line: str) -> bool:
    """A short line without closing punctuation followed by a capitalised line: a heading, not wrapped prose."""
    s, nxt = line.strip(), next_line.lstrip()
    return (0 < len(s.split()) <= 8 and not s.endswith((".", "!", "?", ",", ";", "-"))
            and bool(nxt) and (nxt[0].isupper() or nxt[0].isdigit()))


def prose_paragraphs(text: str) -> list[tuple[int, int]]:
    """[start, end) spans of runs of prose lines. Fenced blocks, code-like lines, blank lines and headings
    (short unpunctuated lines before a capitalised one) end a run; headings are never part of one."""
    spans: list[tuple[int, int]] = []
    in_fence = False
    start: int | None = None
    pos = 0
    lines = text.splitlines(keepends=True)
    for n, line in enumerate(lines):
        line_start, pos = pos, pos + len(line)
        if _FENCE.match(line):
            in_fence = not in_fence
            prose = False
        else:
            prose = not in_fence and bool(line.strip()) and not is_code_line(line)
        heading = prose and _is_heading(line, lines[n + 1] if n + 1 < len(lines) else "")
        if start is not None and (not prose or heading or _BULLET.match(line)):  # a list item starts a paragraph
            spans.append((start, line_start))
            start = None
        if prose and not heading and start is None:
            start = line_start
    if start is not None:
        spans.append((start, len(text)))
    return spans


@lru_cache(maxsize=1)
def _segmenter() -> pysbd.Segmenter:
    return pysbd.Segmenter(language="en", clean=False, char_span=True)


def sentences(text: str) -> list[Sentence]:
    """Every sentence of the prose parts of `text`, in order, with spans into `text` (whitespace trimmed).

    pysbd occasionally splits inside a sentence ("every 400 h," | "i.e." | "about 13 ..."): a piece that
    follows one without closing punctuation, or that starts in lower case, is joined back to its predecessor.
    """
    out: list[Sentence] = []
    for p_start, p_end in prose_paragraphs(text):
        # Same-length blanking keeps spans valid: line breaks, list markers and emphasis/inline-code marks.
        para = _MARKS.sub(lambda m: " " * len(m.group()), _BULLET_LINE.sub(lambda m: " " * len(m.group()),
                                                                           text[p_start:p_end]))
        para = para.replace("\r", " ").replace("\n", " ")
        pieces: list[tuple[int, int]] = []
        for span in _segmenter().segment(para):
            raw = para[span.start : span.end]
            start = span.start + len(raw) - len(raw.lstrip())
            body = raw.strip()
            if bullet := _BULLET.match(body):  # an inline list item (" - Open the valve.")
                start, body = start + bullet.end(), body[bullet.end() :]
            if not body:
                continue
            end = start + len(body)
            if pieces and (not _CLOSED.search(para[pieces[-1][0] : pieces[-1][1]]) or body[0].islower()):
                pieces[-1] = (pieces[-1][0], end)
            else:
                pieces.append((start, end))
        out.extend(Sentence(" ".join(para[a:b].split()), p_start + a, p_start + b) for a, b in pieces)
    return out


def query_sentences(text: str, min_words: int = 6, max_words: int = 40) -> list[Sentence]:
    """Sentences fit to be pseudo-queries: prose, complete (terminal punctuation), not code, within length."""
    keep = []
    for s in sentences(text):
        n = len(s.text.split())
        if min_words <= n <= max_words and _TERMINAL.search(s.text) and (s.text[0].isupper() or s.text[0].isdigit()) and not is_code_like(s.text):
            keep.append(s)
    return keep


def remove_span(text: str, start: int, end: int) -> str:
    """`text` without [start, end), joined with one space (or the line break that was there)."""
    before, after = text[:start].rstrip(" \t"), text[end:].lstrip(" \t")
    if not before or not after or before.endswith("\n") or after.startswith("\n"):
        return (before + after).strip()
    return f"{before} {after}"
