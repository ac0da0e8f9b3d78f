"""Splitting documents into passages of about `target_tokens` tokens of the base model.

Passages respect structure: they are packed from whole sentences, never cross a document, start a
new passage at a heading once the current one is big enough, and carry `overlap_tokens` of trailing
sentences into the next passage of the same section. The heading path becomes the passage title.
A fenced code block (`embedpipe.documents.fence_code`) is one unit: it is never cut while it fits
in a passage; a longer one is cut at line ends into pieces that each keep their fences.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

from embedpipe.documents import CODE_FENCE, Document, is_code_block

_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+(?=[A-Z0-9\"'(\[])")

TokenCounter = Callable[[str], int]


@dataclass
class _Unit:
    text: str
    tokens: int
    paragraph: int  # units of one paragraph are joined by spaces, paragraphs by newlines
    section: int
    code: bool = False  # a fenced code block (or piece of one): always on its own lines


def passage_id(title: str, text: str) -> str:
    """Stable id from content: the same passage gets the same id on every run and machine."""
    return "d_" + hashlib.sha256(f"{title}\n{text}".encode()).hexdigest()[:16]


def token_counter(model_location: str) -> TokenCounter:
    """Count tokens with the base model's own tokenizer, so sizes match what the model sees."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_location)
    # verbose=False: counting a text longer than the model's limit is the point here, not an error
    return lambda text: len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _units(doc: Document, count: TokenCounter, target_tokens: int) -> list[_Unit]:
    units: list[_Unit] = []
    paragraph = 0
    for s_idx, section in enumerate(doc.sections):
        for para in section.paragraphs:
            paragraph += 1
            if is_code_block(para):
                pieces = _code_pieces(para, count, target_tokens)
                units.extend(_Unit(piece, n, paragraph, s_idx, code=True) for piece, n in pieces)
                continue
            for sentence in _SENTENCE_END.split(para):
                n = count(sentence)
                if n <= target_tokens:
                    units.append(_Unit(sentence, n, paragraph, s_idx))
                    continue
                words = sentence.split()  # one over-long "sentence" (a run-on, a huge table row): cut by words
                step = max(1, int(len(words) * target_tokens / n * 0.9))
                for i in range(0, len(words), step):
                    piece = " ".join(words[i : i + step])
                    units.append(_Unit(piece, count(piece), paragraph, s_idx))
    return units


def _code_pieces(block: str, count: TokenCounter, target_tokens: int) -> list[tuple[str, int]]:
    """A fenced code block as it is if it fits, else cut at line ends into fenced pieces that fit."""
    n = count(block)
    if n <= target_tokens:
        return [(block, n)]
    budget = max(1, target_tokens - count(f"{CODE_FENCE}\n{CODE_FENCE}"))
    lines: list[tuple[str, int]] = []
    for line in block.split("\n")[1:-1]:
        tokens = count(line)
        if tokens <= budget:
            lines.append((line, tokens))
            continue
        words = line.split(" ")  # one over-long line: cut by words, like an over-long sentence
        step = max(1, int(len(words) * budget / tokens * 0.9))
        lines.extend((" ".join(words[i : i + step]), count(" ".join(words[i : i + step]))) for i in range(0, len(words), step))
    pieces: list[list[str]] = [[]]
    size = 0
    for line, tokens in lines:
        if pieces[-1] and size + tokens > budget:
            pieces.append([])
            size = 0
        pieces[-1].append(line)
        size += tokens
    out = []
    for piece in pieces:
        text = f"{CODE_FENCE}\n" + "\n".join(piece) + f"\n{CODE_FENCE}"
        if not text.strip("`\n "):
            continue  # a piece of blank lines only
        out.append((text, count(text)))
    return out


def _join(units: list[_Unit]) -> str:
    out = ""
    for prev, unit in zip([None, *units], units):
        if prev is None:
            out = unit.text
        else:
            same_line = prev.paragraph == unit.paragraph and not (prev.code or unit.code)
            out += (" " if same_line else "\n") + unit.text
    return out


def chunk_document(
    doc: Document,
    count: TokenCounter,
    target_tokens: int = 200,
    overlap_tokens: int = 30,
    min_tokens: int = 60,
) -> list[dict]:
    """Passages of one document in reading order, as BEIR corpus records (without dedup)."""
    units = _units(doc, count, target_tokens)
    chunks: list[list[_Unit]] = []
    current: list[_Unit] = []
    size = 0
    for unit in units:
        new_section = bool(current) and unit.section != current[-1].section
        if current and (size + unit.tokens > target_tokens or (new_section and size >= min_tokens)):
            chunks.append(current)
            same_section = unit.section == current[-1].section
            room = min(overlap_tokens, target_tokens - unit.tokens)  # the overlap never pushes a unit out of size
            current = _overlap(current, room) if same_section else []
            size = sum(u.tokens for u in current)
        if current and unit.section != current[-1].section:
            heading = doc.sections[unit.section].headings[-1]
            heading_unit = _Unit(heading + ":", count(heading), -unit.section - 1, unit.section)
            current.append(heading_unit)
            size += heading_unit.tokens
        current.append(unit)
        size += unit.tokens
    if current:
        if chunks and size < min_tokens // 2 and chunks[-1][-1].section == current[0].section:
            chunks[-1].extend(u for u in current if u not in chunks[-1])  # a tiny tail joins its neighbour
        else:
            chunks.append(current)
    records = []
    for position, chunk in enumerate(chunks):
        title = " > ".join(doc.sections[chunk[0].section].headings)
        text = _join(chunk)
        records.append(
            {"_id": passage_id(title, text), "title": title, "text": text, "doc": doc.path, "position": position}
        )
    return records


def _overlap(chunk: list[_Unit], overlap_tokens: int) -> list[_Unit]:
    """Trailing whole sentences of a chunk that fit in the overlap budget (never the whole chunk, never code)."""
    tail: list[_Unit] = []
    total = 0
    for unit in reversed(chunk[1:]):
        if unit.code or total + unit.tokens > overlap_tokens:
            break
        tail.insert(0, unit)
        total += unit.tokens
    return tail
