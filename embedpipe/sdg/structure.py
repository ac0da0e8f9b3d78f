"""LLM-free pairs from the documents' own structure: heading, anchor (cross-reference) and definition queries.

Both read the `structure` field the chunker writes into each passage (docs/sdg.md, "Structure fields"):
the sections a passage covers, the ids that point into it and the internal links it holds.

- **Heading queries** (`sdg.headings`): a descriptive section heading ("Automatic retry for known
  exceptions") is the query, the section's passages the positives. The heading is *removed from the
  positive*: from its title (the heading path) and from the `Heading:` line the chunker writes into the
  text when a passage crosses into the section. Otherwise the model learns string overlap with a title it
  also sees at search time. The positive keeps the rest of its title (page title and parent headings):
  they are context a searcher sees too and do not repeat the query.
- **Anchor queries** (`sdg.anchors`): the visible text of an internal link ("[Task Request](tasks.md#task-
  request-info)") is the query, the passage its target starts in the positive. Markdown and HTML links
  (relative paths, `<a id>` anchors, heading slugs), and reStructuredText's `:ref:` (labels),
  `:doc:` (documents) and object roles (`:func:` & co., resolved to a signature directive). When the anchor
  text repeats the target's heading, the heading is removed from the positive as above.

- **Definition pairs** (`sdg.definitions`): a glossary term -> the passage defining it, the term cut out
  (`definition_records`; glossary sections only).

The positive without the heading travels in the record as `positive_texts` / `positive_titles`
({passage id: text / title}); prep and finetune train on them instead of the corpus text and title.
Every candidate dropped here is counted by reason (`metrics/sdg.json` `structure`).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from embedpipe.documents.reading import heading_slug
from embedpipe.sdg import rules as sdg

_WORD = re.compile(r"\w+")
# Headings that name a kind of content, not a topic: a query made of them finds nothing in particular.
GENERIC_HEADINGS = {
    "example", "examples", "notes", "note", "parameters", "params", "arguments", "args", "returns", "return value",
    "raises", "see also", "changelog", "changes", "change log", "release notes", "whats new", "overview",
    "introduction", "intro", "summary", "usage", "description", "reference", "api reference", "api", "contents",
    "table of contents", "index", "references", "footnotes", "faq", "todo", "warning", "warnings", "background",
    "details", "installation", "getting started", "conclusion", "next steps", "related", "related topics",
    "methods", "attributes", "properties", "functions", "classes", "exceptions", "other", "misc",
    "miscellaneous", "options", "synopsis", "module contents", "further reading", "more information",
    "license", "credits", "acknowledgements", "deprecated", "removed", "added", "fixed", "bug fixes",
    "new features", "features", "limitations", "known issues", "troubleshooting", "glossary", "appendix",
}
# Link texts that say where to click, not what is there.
FUNCTIONAL_ANCHORS = {
    "here", "click here", "this", "this section", "this page", "this document", "this chapter", "this link",
    "see below", "see above", "below", "above", "link", "links", "docs", "doc", "documentation", "the docs",
    "the documentation", "more", "read more", "learn more", "more info", "more information", "more details",
    "details", "see here", "source", "source code", "example", "examples", "this example", "next", "previous",
    "prev", "back", "top", "back to top", "index", "home", "page", "section", "there", "it", "see", "that",
    "following", "the following", "as follows", "above section", "below section", "later", "earlier",
    "the faq entry", "faq", "notes", "note", "reference", "api reference", "changelog", "full list",
}
_VERSION = re.compile(r"^(?:(?:version|release|v)\s*)?\d+(?:\.\d+)+[\w.-]*$|^(?:version|release|v)\s*\d+$", re.I)
_SIGNATURE = re.compile(r"^[\w.:]+\s*\(.*\)$")
_NUMBERING = re.compile(r"^\s*(?:\d+(?:\.\d+)*[.:)]?|[A-Z][.)])\s+(?=\S)")
_API_NAME = re.compile(r"^[A-Za-z_][\w]*(?:(?:\.|::)[A-Za-z_]\w*)*(?:\(\))?$")


def _norm(text: str) -> str:
    return " ".join(_WORD.findall(text.lower().replace("'", "")))


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def clean_heading(heading: str) -> str:
    """A heading as a query: numbering ("3.2 ", "A. ") and a trailing colon dropped."""
    return _NUMBERING.sub("", heading).strip().rstrip(":").strip()


def heading_reason(heading: str, min_words: int, max_words: int) -> str | None:
    """Why a heading is not a descriptive query (None if it is one)."""
    text = clean_heading(heading)
    if not re.search(r"[A-Za-z]", text):
        return "no words"
    if _VERSION.match(text) or re.match(r"^(?:version|release|what'?s new in)\b.*\d", text, re.I):
        return "version number"
    if _norm(text) in GENERIC_HEADINGS:
        return "generic heading"
    if _SIGNATURE.match(text) or len(text.split()) == 1:
        return "API name or one token"  # foo.bar(), proj/tasks.py, Session
    n = len(text.split())
    if n < min_words:
        return "too few words"
    if n > max_words:
        return "too many words"
    if sdg.context_reason(text, [], check_grounding=False):
        return "points at its context"  # "When to use this procedure": the context gate's patterns
    return None


def is_api_name(text: str) -> bool:
    """A descriptive identifier: one token of at least two parts (`broker_connection_timeout`, `Session.merge`,
    `gen_task_name()`, `CamelCase`), not a bare word such as `imports`."""
    text = text.strip()
    if " " in text or not _API_NAME.match(text):
        return False
    parts = [p for p in re.split(r"[._:()]+|(?<=[a-z])(?=[A-Z])", text) if p]
    return len(parts) >= 2 and len(text) >= 6


def anchor_reason(text: str, min_words: int, max_words: int, api_names: bool) -> str | None:
    """Why a link's visible text is not a query (None if it is one)."""
    text = text.strip()
    if not re.search(r"[A-Za-z0-9]", text):
        return "punctuation"
    norm = _norm(text)
    if norm in FUNCTIONAL_ANCHORS:
        return "functional anchor"
    if _VERSION.match(text):
        return "version number"
    if re.fullmatch(r"[\d\s.,#§-]+", text) or re.fullmatch(r"(?:pep|rfc|issue|#)\s*\d+", norm):
        return "number"
    n = len(words(text))
    if n < min_words and not (api_names and is_api_name(text)):
        return "too few words"
    if n > max_words:
        return "too many words"
    if sdg.context_reason(text, [], check_grounding=False):
        return "points at its context"  # "the example above", "this module's options"
    return None


def strip_heading(record: dict[str, Any], heading: str) -> tuple[str, str]:
    """(title, text) of a passage without `heading`: left out of the heading path, and its `Heading:` line
    (the chunker's mark where a passage crosses into the section) left out of the text."""
    sections = (record.get("structure") or {}).get("sections") or []
    path = sections[0]["path"] if sections else [p.strip() for p in (record.get("title") or "").split(" > ")]
    title = " > ".join(p for p in path if p != heading)
    lines = [ln for ln in (record.get("text") or "").split("\n") if ln != heading + ":"]
    return title, "\n".join(lines)


def _record(question: str, generator: str, ids: list[str], corpus: dict[str, dict], stripped: dict[str, tuple[str, str]],
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A pair in the data/sdg/qa.jsonl format (as `embedpipe.sdg.jobs.to_record` writes them)."""
    rec: dict[str, Any] = {
        "id": sdg.qa_id(question, ids),
        "question": question,
        "answer": "",
        "query_type": generator,
        "reasoning_type": "factual",
        "question_complexity": 1,
        "segment_ids": ids,
        "hop_count": 1,  # a section's passages are each an answer on its own, not hops to combine
        "hop_contexts": [{"segment_id": i, "summary": stripped[i][0] if i in stripped else corpus[i].get("title", "")}
                         for i in ids],
        "doc": corpus[ids[0]].get("doc", ""),
        "generator": generator,
        "scores": None,
        "quality_score": None,
    }
    texts = {i: stripped[i][1] for i in ids if i in stripped and stripped[i][1] != corpus[i].get("text")}
    titles = {i: stripped[i][0] for i in ids if i in stripped and stripped[i][0] != corpus[i].get("title")}
    if texts:
        rec["positive_texts"] = texts
    if titles:
        rec["positive_titles"] = titles
    return {**rec, **(extra or {})}


@dataclass
class StructureStats:
    """What one generator found, made and left out (`metrics/sdg.json` `structure.<generator>`)."""

    candidates: int = 0
    pairs: int = 0
    filtered: Counter = field(default_factory=Counter)
    unresolved: Counter = field(default_factory=Counter)
    links: bool = False  # a link generator: `unresolved_links` is reported (even when 0)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"candidates": self.candidates, "pairs": self.pairs,
                               "filtered": dict(sorted(self.filtered.items()))}
        if self.links:
            out["unresolved_links"] = dict(sorted(self.unresolved.items()))
        return out


def _ordered(corpus: dict[str, dict]) -> list[str]:
    return sorted(corpus, key=lambda pid: (str(corpus[pid].get("doc", "")), int(corpus[pid].get("position", 0))))


def _seeded(records: list[dict[str, Any]], seed: Any) -> list[dict[str, Any]]:
    """A seeded random order, so that a share cap keeps pairs spread over the corpus."""
    return sorted(records, key=lambda r: sdg.stable_int(seed, r["id"], "structure-order"))


# --- heading queries --------------------------------------------------------------------------------
def heading_records(corpus: dict[str, dict], cfg: dict[str, Any], seed: Any = 0) -> tuple[list[dict], StructureStats]:
    """Heading -> the passages of its section, the heading removed from each positive (see the module doc).

    A heading that names more than one section (the same words in two documents, or twice in one) is
    ambiguous as a query and is left out; so is a positive left with fewer than `min_positive_words`.
    """
    stats = StructureStats()
    min_words, max_words = int(cfg.get("min_words", 3)), int(cfg.get("max_words", 16))
    max_positives = int(cfg.get("max_positives", 3))
    min_positive_words = int(cfg.get("min_positive_words", 12))
    sections: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for pid in _ordered(corpus):
        rec = corpus[pid]
        for entry in (rec.get("structure") or {}).get("sections") or []:
            if entry.get("named", True):
                sections.setdefault((str(rec.get("doc", "")), tuple(entry["path"])), []).append(pid)
    by_query: dict[str, list[tuple[str, tuple[str, ...]]]] = defaultdict(list)
    for key in sections:
        by_query[_norm(clean_heading(key[1][-1]))].append(key)
    out = []
    for (_doc, path), pids in sections.items():
        stats.candidates += 1
        heading = path[-1]
        reason = heading_reason(heading, min_words, max_words)
        if reason is None and len(by_query[_norm(clean_heading(heading))]) > 1:
            reason = "names several sections"
        if reason:
            stats.filtered[reason] += 1
            continue
        stripped = {pid: strip_heading(corpus[pid], heading) for pid in pids}
        ids = [pid for pid in pids if len(stripped[pid][1].split()) >= min_positive_words][:max_positives]
        if not ids:
            stats.filtered["positive too short without the heading"] += 1
            continue
        out.append(_record(clean_heading(heading), "headings", ids, corpus, stripped, {"heading_path": list(path)}))
    stats.pairs = len(out)
    return _seeded(out, seed), stats


# --- anchor queries ---------------------------------------------------------------------------------
@dataclass
class _Target:
    pid: str
    path: list[str]  # heading path of the section the id is in
    heading: bool  # the id names the section (its heading), not a paragraph inside it
    own: str | None = None  # when the section starts at the end of an earlier section's passage: its own first passage


class LinkIndex:
    """Where every id, label, object and document of the corpus starts: (doc, id) -> passage."""

    def __init__(self, corpus: dict[str, dict]):
        self.ids: dict[tuple[str, str], _Target] = {}
        self.labels: dict[str, _Target] = {}
        self.objects: dict[str, _Target] = {}
        self.by_last: dict[str, list[str]] = defaultdict(list)
        self.first: dict[str, _Target] = {}
        self.docs_by_stem: dict[str, str] = {}
        own: dict[tuple[str, tuple[str, ...]], str] = {}  # (doc, path) -> first passage titled with it
        for pid in _ordered(corpus):
            secs = (corpus[pid].get("structure") or {}).get("sections") or []
            if secs:
                own.setdefault((str(corpus[pid].get("doc", "")), tuple(secs[0]["path"])), pid)
        for pid in _ordered(corpus):
            rec = corpus[pid]
            doc = str(rec.get("doc", ""))
            st = rec.get("structure") or {}
            secs = st.get("sections") or [{"path": (rec.get("title") or "").split(" > ")}]
            if doc not in self.first:
                self.first[doc] = _Target(pid, secs[0]["path"], True)
                self.docs_by_stem.setdefault(_stem(doc), doc)
            for entry in st.get("ids") or []:
                path = secs[entry["section"]]["path"] if entry["section"] < len(secs) else secs[0]["path"]
                target = _Target(pid, path, bool(entry.get("heading")))
                if target.heading and entry["section"] > 0:
                    target.own = own.get((doc, tuple(path)))
                name, id_doc = entry["id"], entry.get("doc", doc)  # "doc": an id of a duplicate passage elsewhere
                if not name:  # a duplicate passage that opens another document: links to that page land here
                    self.first.setdefault(id_doc, target)
                    self.docs_by_stem.setdefault(_stem(id_doc), id_doc)
                    continue
                self.ids.setdefault((id_doc, name), target)
                if name.startswith("obj:"):
                    if name[4:] not in self.objects:
                        self.objects[name[4:]] = target
                        self.by_last[name[4:].rsplit(".", 1)[-1]].append(name[4:])
                else:
                    self.labels.setdefault(name.lower(), target)

    def doc(self, path: str) -> str | None:
        if path in self.first:
            return path
        return self.docs_by_stem.get(_stem(path)) or self.docs_by_stem.get(_stem(path.rstrip("/") + "/index"))

    def resolve(self, target: str) -> tuple[_Target | None, str]:
        """The passage a link target starts in, or None and why ("missing document", "missing section", ...)."""
        if target.startswith("ref:"):
            found = self.labels.get(target[4:].lower())
            return found, "" if found else "unknown label"
        if target.startswith("obj:"):
            name = target[4:]
            if name in self.objects:
                return self.objects[name], ""
            near = [n for n in self.by_last.get(name.rsplit(".", 1)[-1], [])
                    if n.endswith("." + name) or name.endswith("." + n)]
            return (self.objects[near[0]], "") if near else (None, "unknown object")
        if target.startswith("doc:"):
            doc = self.doc(target[4:])
            return (self.first[doc], "") if doc else (None, "missing document")
        path, _, fragment = target.partition("#")
        doc = self.doc(path)
        if doc is None:
            return None, "missing document"
        if not fragment:
            return self.first[doc], ""
        for name in (fragment, fragment.lower(), heading_slug(fragment)):
            if (doc, name) in self.ids:
                return self.ids[(doc, name)], ""
        return None, "missing section"


def _stem(path: str) -> str:
    return re.sub(r"\.(md|markdown|rst|txt|html?|pdf)$", "", path, flags=re.I)


def anchor_records(corpus: dict[str, dict], cfg: dict[str, Any], seed: Any = 0) -> tuple[list[dict], StructureStats]:
    """Link text (or, with `query: sentence`, the sentence around the link) -> the passage its target starts in
    (and, when a section starts at the end of an earlier section's passage, also the section's own first passage).

    Left out, counted by reason: functional or too short anchor texts (`anchor_reason`), a link whose anchor
    sits inside its own target (the same passage, or inside the section the link points to), a repeat of a
    (text, target) pair already made, and links whose target does not resolve (`unresolved_links`).
    """
    stats = StructureStats(links=True)
    index = LinkIndex(corpus)
    min_words, max_words = int(cfg.get("min_words", 2)), int(cfg.get("max_words", 16))
    api_names = bool(cfg.get("api_names", True))
    as_sentence = str(cfg.get("query", "anchor")) == "sentence"
    max_sentence_words = int(cfg.get("max_sentence_words", 40))
    seen: set[tuple[str, str]] = set()
    out = []
    for pid in _ordered(corpus):
        rec = corpus[pid]
        st = rec.get("structure") or {}
        secs = st.get("sections") or []
        for link in st.get("links") or []:
            stats.candidates += 1
            text = " ".join(link["text"].split())
            target, why = index.resolve(link["target"])
            if target is None:
                stats.unresolved[why] += 1
                continue
            reason = anchor_reason(text, min_words, max_words, api_names)
            source_path = secs[link["section"]]["path"] if link.get("section", 0) < len(secs) else []
            same_doc = corpus[target.pid].get("doc") == rec.get("doc")
            if reason is None and (target.pid == pid or (
                    same_doc and target.heading and source_path[: len(target.path)] == target.path)):
                reason = "inside its own target"
            key = (_norm(text), target.pid)
            if reason is None and key in seen:
                reason = "repeat of an earlier pair"
            if reason:
                stats.filtered[reason] += 1
                continue
            seen.add(key)
            query = text
            sentence = link.get("sentence") or ""
            if as_sentence and sentence and len(sentence.split()) <= max_sentence_words:
                query = sentence
            heading = target.path[-1] if target.path else ""
            stripped = {}
            ids = [target.pid] + ([target.own] if target.own and target.own != pid else [])
            anchor_words = set(words(text))
            if heading and anchor_words and len(anchor_words & set(words(heading))) / len(anchor_words) >= 0.5:
                stripped = {i: strip_heading(corpus[i], heading) for i in ids}  # the anchor repeats the heading
            out.append(_record(query, "anchors", ids, corpus, stripped,
                               {"anchor": {"text": text, "source": pid, "target": link["target"]}}))
    stats.pairs = len(out)
    return _seeded(out, seed), stats


# --- definition pairs -------------------------------------------------------------------------------
GLOSSARY = re.compile(r"\b(glossary|glossaries|terminology|definitions|definition of terms)\b", re.I)
_LABEL = re.compile(r"^(?:- )?([^:.!?`]{2,80}?): (.+)$")
# Labels the parser writes before admonitions and version notes ("Note: ...", "New in version 3.1: ...").
ADMONITION_LABELS = re.compile(
    r"^(note|warning|tip|hint|important|caution|danger|error|attention|see also|todo|example|seealso|"
    r"(new|changed|deprecated|removed) in version.*|deprecated since version.*)$", re.I)


def _is_term_line(line: str, max_words: int) -> bool:
    """A glossary term on its own line: short, no sentence or label punctuation at its end, not a list item or code."""
    line = line.strip()
    return (bool(line) and len(line.split()) <= max_words and not line.startswith(("- ", "```", "|"))
            and line[-1] not in ".!?:;,)" and bool(re.search(r"[A-Za-z]", line)))


def definition_records(corpus: dict[str, dict], cfg: dict[str, Any], seed: Any = 0) -> tuple[list[dict], StructureStats]:
    """Glossary term -> the passage defining it, the term removed from the positive (as a heading is).

    Only inside glossary sections (a heading or page title with "Glossary", "Terminology", "Definitions"): there a
    term is its own line followed by its definition (HTML <dl> turned Markdown, a Markdown glossary), or a
    `term: definition` line (reStructuredText definition lists and `.. glossary::`). Elsewhere a `label: text`
    line is mostly an admonition ("Note: ...", "See also: ...") and is not used. Terms are filtered like anchor
    texts (`anchor_reason`); a definition shorter than `min_definition_words` is left out.
    """
    stats = StructureStats()
    min_words, max_words = int(cfg.get("min_words", 2)), int(cfg.get("max_words", 8))
    min_def = int(cfg.get("min_definition_words", 6))
    api_names = bool(cfg.get("api_names", True))
    seen: set[str] = set()
    out = []
    for pid in _ordered(corpus):
        rec = corpus[pid]
        secs = (rec.get("structure") or {}).get("sections") or [{"path": (rec.get("title") or "").split(" > ")}]
        if not any(GLOSSARY.search(h) for entry in secs for h in entry["path"]):
            continue
        headings = {entry["path"][-1] + ":" for entry in secs}
        lines = (rec.get("text") or "").split("\n")
        in_code = False
        for i, line in enumerate(lines):
            if line == "```":
                in_code = not in_code
            if in_code or line in headings:
                continue
            label = _LABEL.match(line)
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if label:
                term, definition, rest = label.group(1).strip(), label.group(2), lines[:i] + [label.group(2)] + lines[i + 1:]
            elif _is_term_line(line, max_words) and nxt and not nxt.startswith("```") and nxt not in headings \
                    and not _is_term_line(nxt, max_words):
                term, definition, rest = line.strip(), nxt, lines[:i] + lines[i + 1:]
            else:
                continue
            stats.candidates += 1
            reason = "admonition label" if label and ADMONITION_LABELS.match(term) else None
            reason = reason or anchor_reason(term, min_words, max_words, api_names)
            if reason is None and len(definition.split()) < min_def:
                reason = "definition too short"
            if reason is None and _norm(term) in seen:
                reason = "repeat of an earlier pair"
            if reason:
                stats.filtered[reason] += 1
                continue
            seen.add(_norm(term))
            stripped = {pid: (rec.get("title") or "", "\n".join(rest))}
            out.append(_record(term, "definitions", [pid], corpus, stripped, {"definition": definition}))
    stats.pairs = len(out)
    return _seeded(out, seed), stats
