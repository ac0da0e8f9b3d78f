"""Splitting documents into passages of about `target_tokens` tokens of the base model.

Passages respect structure: they are packed from whole sentences, never cross a document, start a
new passage at a heading once the current one is big enough, and carry `overlap_tokens` of trailing
sentences into the next passage of the same section. The heading path becomes the passage title.
A fenced code block (`embedpipe.documents.reading.fence_code`) is one unit: it is never cut while it fits
in a passage; a longer one is cut at line ends into pieces that each keep their fences.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

from embedpipe.documents.reading import CODE_FENCE, Document, is_code_block, link_target

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
    structures = _structures(doc, units, chunks)
    records = []
    for position, chunk in enumerate(chunks):
        title = " > ".join(doc.sections[chunk[0].section].headings)
        text = _join(chunk)
        records.append(
            {"_id": passage_id(title, text), "title": title, "text": text, "doc": doc.path, "position": position,
             "structure": structures[position]}
        )
    return records


def merge_duplicate(kept: dict, duplicate: dict) -> None:
    """A passage dropped as a duplicate of `kept` (same title and text) still has ids pointing at it: they join
    `kept`'s ids, with their document when it differs (`"doc"`), so links to them still resolve. A duplicate that
    opens its document also adds an empty id for that document (a link to the page)."""
    structure = kept.get("structure")
    if structure is None or "structure" not in duplicate:
        return
    other = duplicate.get("doc") != kept.get("doc")
    extra = [{**entry, "doc": duplicate["doc"]} if other else entry for entry in duplicate["structure"]["ids"]]
    if other and duplicate.get("position") == 0:
        extra.append({"id": "", "doc": duplicate["doc"], "section": 0, "heading": True})
    known = {(e.get("doc"), e["id"]) for e in structure["ids"]}
    structure["ids"].extend(e for e in extra if (e.get("doc"), e["id"]) not in known)


def _structures(doc: Document, units: list[_Unit], chunks: list[list[_Unit]]) -> list[dict]:
    """Each passage's `structure` (docs/sdg.md, "Structure fields"): the sections it covers (heading paths,
    and whether the section starts in it), the ids that point into it, and the internal links it holds
    (visible text, target, the sentence around it). An id or link belongs to the first passage holding
    its paragraph (overlap repeats sentences in the next passage)."""
    first_chunk: dict[int, int] = {}
    for k, chunk in enumerate(chunks):
        for unit in chunk:
            first_chunk.setdefault(id(unit), k)
    offsets, total = [], 0
    for section in doc.sections:
        offsets.append(total)
        total += len(section.paragraphs)
    by_paragraph: dict[int, list[_Unit]] = {}
    section_start: dict[int, _Unit] = {}
    for unit in units:
        by_paragraph.setdefault(unit.paragraph, []).append(unit)
        section_start.setdefault(unit.section, unit)
    out = [{"sections": [], "ids": [], "links": []} for _ in chunks]
    index: list[dict[int, int]] = [{} for _ in chunks]  # section -> its position in the passage's list

    def section_index(k: int, s: int) -> int:
        if s not in index[k]:
            index[k][s] = len(out[k]["sections"])
            entry: dict = {"path": doc.sections[s].headings, "start": first_chunk.get(id(section_start[s])) == k}
            if not doc.sections[s].named:
                entry["named"] = False
            out[k]["sections"].append(entry)
        return index[k][s]

    for k, chunk in enumerate(chunks):
        for unit in chunk:
            section_index(k, unit.section)
    for s, section in enumerate(doc.sections):
        last = len(section.paragraphs) - 1
        for name, p in section.anchors.items():
            paragraph_units = by_paragraph.get(offsets[s] + min(p, last) + 1)
            if paragraph_units:
                k = first_chunk[id(paragraph_units[0])]
                out[k]["ids"].append({"id": name, "section": section_index(k, s), "heading": p == 0})
        for link in section.links:
            target = link_target(link.href, doc.path)
            paragraph_units = by_paragraph.get(offsets[s] + link.paragraph + 1)
            if target is None or not paragraph_units:
                continue
            unit = next((u for u in paragraph_units if link.text in u.text), None)
            k = first_chunk[id(unit or paragraph_units[0])]
            out[k]["links"].append({"text": link.text, "target": target, "section": section_index(k, s),
                                    "sentence": unit.text if unit is not None else None})
    return out


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
