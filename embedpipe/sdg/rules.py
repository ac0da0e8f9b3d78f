"""Synthetic question-answer pairs from passages: prompts, generators, the LLM judge and quality gates.

Two LLM protocols share one code path (`embedpipe.sdg.llm`):
- `completions` for *base* models (the embedded Gemma-3-270M): a few-shot `Passage/Question/Answer`
  continuation with rotating examples, stopped at a blank line. Tiny base models fail in chat mode.
- `chat` for instruction-tuned or remote models: a system prompt and a JSON-schema `response_format`.

Multi-hop "related passages" are *neighbouring passages of the same document* (consecutive `position`s):
they share a topic by construction, need no embedder, and are what a reader would combine to answer a
"how does A relate to B" question. Nearest neighbours by embedding tend to pick near-duplicates
(overlapping chunks, sibling product manuals), which make weak multi-hop questions.

The LLM-free inverse-cloze generator (query = one prose sentence cut out of a passage, positive = the
passage *without* that sentence) needs no model at all; it supplements the LLM questions (capped share).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from embedpipe.core.io import STRUCTURE_QUERY_TYPES
from embedpipe.sdg.llm import ParseError, parse_json_object
from embedpipe.sdg.sentences import query_sentences, remove_span

SCORE_KEYS = ("relevance", "accuracy", "context_support", "clarity")

# --- few-shot examples (completions protocol) ---------------------------------------------------
# Varied domains and question shapes, so that the model copies a *pattern*, not a topic.
SHOTS: list[tuple[str, str, str]] = [
    ("Pumps > Priming\nBefore the first start, fill the pump casing with liquid through the priming plug. "
     "Running the pump dry for more than 30 seconds damages the mechanical seal.",
     "How long can the pump run dry before the mechanical seal is damaged?", "More than 30 seconds of dry running damages it."),
    ("Invoices > Payment terms\nInvoices are payable within 30 days. A late fee of 2% per month is charged "
     "on overdue amounts, starting on day 31.",
     "What late fee applies to overdue invoices?", "2% per month, starting on day 31."),
    ("Router > Factory reset\nHold the reset button for 10 seconds until the status light flashes amber. "
     "All settings, including the Wi-Fi password, return to their defaults.",
     "How do you restore the router to its factory settings?", "Hold the reset button for 10 seconds until the light flashes amber."),
    ("Clinic > Opening hours\nThe clinic is open 8:00-18:00 on weekdays. Emergency calls after hours are "
     "forwarded to the regional hospital.",
     "Where are emergency calls forwarded after opening hours?", "To the regional hospital."),
    ("Release 2.4 > Changes\nVersion 2.4 removes support for the legacy XML export because it could not "
     "represent nested tables. Use the JSON export instead.",
     "Why was the XML export removed in version 2.4?", "It could not represent nested tables."),
    ("Bicycle > Brakes\nHydraulic disc brakes need new pads when the lining is thinner than 1 mm. "
     "Bleed the brake system once a year with mineral oil only.",
     "Which fluid should be used to bleed the hydraulic brakes?", "Mineral oil only."),
]
MULTI_SHOTS: list[tuple[list[str], str, str]] = [
    (["Heater > Power\nThe heater draws 2.2 kW at full power.",
      "Heater > Installation\nCircuits rated below 10 A must not supply appliances above 2 kW."],
     "Can the heater run at full power on a circuit rated below 10 A?",
     "No: it draws 2.2 kW, above the 2 kW limit for such circuits."),
    (["Library > Loans\nBooks can be borrowed for 21 days.",
      "Library > Renewals\nA loan can be renewed twice unless another reader has reserved the book."],
     "What is the longest a book can be kept if nobody reserves it?",
     "63 days: 21 days plus two renewals of 21 days."),
    (["Sensor > Calibration\nThe sensor drifts by up to 0.5 degrees per year.",
      "Sensor > Maintenance\nRecalibrate whenever the accumulated drift may exceed 1 degree."],
     "How often does the sensor need recalibration?",
     "About every two years, since drift of 0.5 degrees a year reaches 1 degree after two years."),
]
JUDGE_SHOTS: list[tuple[str, str, str, tuple[int, int, int, int]]] = [
    ("The filter must be replaced every 6 months or after 500 litres.", "How often must the filter be replaced?",
     "Every 6 months or after 500 litres.", (10, 10, 10, 9)),
    ("The filter must be replaced every 6 months or after 500 litres.", "What colour is the filter housing?",
     "Blue.", (3, 1, 1, 8)),
    ("Set the thermostat to 55 C to prevent legionella growth.", "Why set the thermostat to 55 C?",
     "To prevent legionella growth.", (10, 10, 10, 9)),
    ("Set the thermostat to 55 C to prevent legionella growth.", "thermostat the what 55",
     "55", (4, 3, 4, 1)),
]


def stable_int(*parts: Any) -> int:
    """A deterministic integer from arbitrary parts (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big")


def _rotate(seq: Sequence[Any], n: int, key: int) -> list[Any]:
    start = key % len(seq)
    return [seq[(start + i) % len(seq)] for i in range(min(n, len(seq)))]


# --- prompts ------------------------------------------------------------------------------------
def completion_prompt(passages: list[str], key: int, n_shots: int = 2) -> str:
    """Few-shot Passage/Question/Answer continuation; the model writes `<question>\\nAnswer: <answer>`."""
    if len(passages) == 1:
        parts = [f"Passage: {p}\nQuestion: {q}\nAnswer: {a}\n\n" for p, q, a in _rotate(SHOTS, n_shots, key)]
        return "".join(parts) + f"Passage: {passages[0]}\nQuestion:"
    parts = []
    for ps, q, a in _rotate(MULTI_SHOTS, 2, key):
        ctx = "".join(f"Passage {i + 1}: {p}\n" for i, p in enumerate(ps))
        parts.append(f"{ctx}Question (needs all passages): {q}\nAnswer: {a}\n\n")
    ctx = "".join(f"Passage {i + 1}: {p}\n" for i, p in enumerate(passages))
    return "".join(parts) + f"{ctx}Question (needs all passages):"


COMPLETION_STOP = ["\n\n", "\nPassage", "\nQuestion"]

CHAT_SYSTEM = (
    "You write search queries for training a retrieval model. Given document passages, write ONE question a "
    "user of this documentation would ask, answerable only from the passages, and its answer. Do not copy "
    "sentences verbatim; do not mention 'the passage'. Reply with JSON only."
)
QA_SCHEMA = {
    "type": "object",
    "properties": {
        "question": {"type": "string"},
        "answer": {"type": "string"},
        "reasoning_type": {"type": "string"},
        "question_complexity": {"type": "integer"},
        "hop_summaries": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["question", "answer", "reasoning_type", "question_complexity", "hop_summaries"],
}
SCHEMAS = ("auto", "full", "compact")  # sdg.llm.schema; auto = compact for the embedded server, full for endpoints
# The same pair with nothing but what training and the judge use, lengths capped: a small local model writes
# ~7 tokens/s on 2 CPU cores, and the full schema's labels and hop summaries cost it 2-3x the tokens.
COMPACT_QA_SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string", "maxLength": 200}, "answer": {"type": "string", "maxLength": 200}},
    "required": ["question", "answer"],
}


def chat_messages(passages: list[str], query_type: str, reasoning_type: str, complexity: int,
                  compact: bool = False) -> list[dict]:
    """The generation request; `compact` asks for COMPACT_QA_SCHEMA (question and a one-sentence answer)."""
    ctx = "\n\n".join(f"Passage {i + 1}:\n{p}" for i, p in enumerate(passages))
    need = "that needs ALL passages together to answer" if len(passages) > 1 else "about this passage"
    style = {
        "structural": "about where something is or how the document is organised (sections, steps, tables)",
        "multi_hop": "that connects facts across the passages",
    }.get(query_type, "about a specific fact or explanation in the text")
    task = f"{ctx}\n\nWrite one {reasoning_type} question {need}, {style}, of complexity {complexity} on a 2-5 scale. "
    if compact:
        user = task + "Name what it is about instead of saying 'this'. JSON keys: question, answer (one short sentence)."
    else:
        user = task + ("hop_summaries: one short sentence per passage saying what it contributes. JSON keys: question, "
                       "answer, reasoning_type, question_complexity, hop_summaries.")
    return [{"role": "system", "content": CHAT_SYSTEM}, {"role": "user", "content": user}]


def chat_response_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


# --- parsing ------------------------------------------------------------------------------------
def parse_completion_qa(text: str) -> dict[str, Any]:
    """`<question>\\nAnswer: <answer>` -> {question, answer}; ParseError when either is missing."""
    head, sep, answer = text.partition("\nAnswer:")
    question, answer = head.strip(), answer.strip()
    if not sep or not question or not answer:
        raise ParseError(f"expected '<question>\\nAnswer: <answer>', got {text[:80]!r}")
    return {"question": question, "answer": answer}


def parse_chat_qa(text: str) -> dict[str, Any]:
    obj = parse_json_object(text)
    q, a = str(obj.get("question") or "").strip(), str(obj.get("answer") or "").strip()
    if not q or not a:
        raise ParseError("JSON reply lacks question or answer")
    try:
        complexity = int(obj.get("question_complexity") or 0)
    except (TypeError, ValueError):
        complexity = 0
    summaries = obj.get("hop_summaries") if isinstance(obj.get("hop_summaries"), list) else []
    return {"question": q, "answer": a, "reasoning_type": str(obj.get("reasoning_type") or "").lower().strip(),
            "question_complexity": complexity, "hop_summaries": [str(s) for s in summaries]}


# --- judge --------------------------------------------------------------------------------------
JUDGE_GRAMMAR = (
    'root ::= " relevance=" n " accuracy=" n " context_support=" n " clarity=" n\n'
    'n ::= "10" | [1-9]\n'
)
JUDGE_SCHEMA = {
    "type": "object",
    "properties": {
        **{k: {"type": "integer"} for k in SCORE_KEYS},
        "overall": {"type": "number"},
        "justification": {"type": "string"},
    },
    "required": [*SCORE_KEYS, "overall", "justification"],
}
_SCORE_RE = re.compile(r"(relevance|accuracy|context_support|clarity)\s*[=:]\s*(10|[1-9])")


def judge_prompt(passages: list[str], question: str, answer: str) -> str:
    """Few-shot scoring completion: the model continues `Scores:` with four 1-10 integers."""
    head = ("Each example rates a question-answer pair against its passage, 1-10: relevance (a real user question "
            "about the passage), accuracy (answer correct), context_support (answer stated in the passage), "
            "clarity (well-formed question).\n\n")
    shots = "".join(
        f"Passage: {p}\nQuestion: {q}\nAnswer: {a}\nScores: relevance={s[0]} accuracy={s[1]} "
        f"context_support={s[2]} clarity={s[3]}\n\n" for p, q, a, s in JUDGE_SHOTS
    )
    ctx = "\n".join(passages)
    return f"{head}{shots}Passage: {ctx}\nQuestion: {question}\nAnswer: {answer}\nScores:"


def judge_messages(passages: list[str], question: str, answer: str) -> list[dict]:
    ctx = "\n\n".join(f"Passage {i + 1}:\n{p}" for i, p in enumerate(passages))
    user = (f"{ctx}\n\nQuestion: {question}\nAnswer: {answer}\n\nScore this question-answer pair for training a "
            "retrieval model, each an integer 1-10: relevance (a question a real user would ask about these "
            "passages), accuracy (the answer is correct), context_support (the answer is fully supported by the "
            "passages), clarity (the question is clear and self-contained). overall: your overall 1-10 rating. "
            "justification: one line. Reply with JSON only.")
    return [{"role": "system", "content": "You are a strict data-quality judge."}, {"role": "user", "content": user}]


def parse_judge_completion(text: str) -> dict[str, float]:
    found = dict(_SCORE_RE.findall(text))
    if set(found) != set(SCORE_KEYS):
        raise ParseError(f"expected four scores, got {text[:80]!r}")
    scores: dict[str, Any] = {k: int(found[k]) for k in SCORE_KEYS}
    scores["overall"] = round(sum(scores[k] for k in SCORE_KEYS) / len(SCORE_KEYS), 2)
    return scores


def parse_judge_chat(text: str) -> dict[str, Any]:
    obj = parse_json_object(text)
    try:
        scores: dict[str, Any] = {k: int(obj[k]) for k in SCORE_KEYS}
        scores["overall"] = float(obj.get("overall", sum(scores.values()) / 4))
    except (KeyError, TypeError, ValueError):
        raise ParseError("judge JSON lacks integer scores") from None
    if not all(1 <= v <= 10 for v in scores.values()):
        raise ParseError("judge scores outside 1-10")
    scores["justification"] = str(obj.get("justification") or "")[:300]
    return scores


def judge_passes(scores: dict[str, Any], threshold: float, floors: dict[str, float]) -> bool:
    """Overall >= threshold AND every sub-score >= its floor (the recipe checks only overall)."""
    return scores["overall"] >= threshold and all(scores[k] >= floors.get(k, 0) for k in SCORE_KEYS)


# --- heuristics for labels a base model does not produce -----------------------------------------
def guess_reasoning_type(question: str) -> str:
    q = question.lower()
    if q.startswith("why") or " cause" in q or "because" in q or "what happens" in q:
        return "causal"
    if q.startswith("how do") or q.startswith("how to") or q.startswith("how should") or "steps" in q or "procedure" in q:
        return "procedural"
    if "differ" in q or "compare" in q or " versus " in q or " vs" in q or "better" in q:
        return "comparative"
    if q.startswith("when") or "how long" in q or "how often" in q or "before" in q or "after" in q:
        return "temporal"
    return "factual"


def guess_complexity(question: str, hops: int) -> int:
    words = len(question.split())
    return int(min(5, max(2, 1 + hops + (words > 12) + (words > 20))))


# --- junk gate ----------------------------------------------------------------------------------
_WORD = re.compile(r"\w+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def longest_common_run(a: str, b: str) -> int:
    """Longest run of consecutive words shared by a and b (verbatim quoting)."""
    wa, wb = _words(a), _words(b)
    best, prev = 0, [0] * (len(wb) + 1)
    for x in wa:
        cur = [0] * (len(wb) + 1)
        for j, y in enumerate(wb, 1):
            if x == y:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best


def junk_reason(pair: dict[str, Any], passages: list[str], cfg: dict[str, Any]) -> str | None:
    """Why a pair is junk (None if it is fine). Inverse-cloze pairs quote their passage by design; heading and
    anchor pairs have their own filters (`embedpipe.sdg.structure`: a 3-word heading is a fine query)."""
    if pair["query_type"] in STRUCTURE_QUERY_TYPES:
        return None
    q, a = pair["question"].strip(), (pair.get("answer") or "").strip()
    n = len(_words(q))
    if not q:
        return "empty question"
    if n < cfg["min_question_words"]:
        return "question too short"
    if n > cfg["max_question_words"]:
        return "question too long"
    if pair["query_type"] == "inverse_cloze":
        return None
    if not a:
        return "empty answer"
    if cfg.get("require_question_mark", True) and not q.endswith("?"):
        return "not a question"
    wq, wa = set(_words(q)), set(_words(a))
    if wq and len(wq & wa) / len(wq) >= 0.9:
        return "answer copied as question"
    if any(longest_common_run(q, p) >= cfg["max_verbatim_words"] for p in passages):
        return "question quotes the passage"
    return None


# --- context gate -------------------------------------------------------------------------------
# A retrieval query is read without its passage: "What is the purpose of this module?" names nothing a
# user could search for. These patterns point at the context instead of naming the thing.
_CONTEXT_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("points at 'this/these ...'", re.compile(r"\b(this|these)\b", re.I)),
    ("points at 'the above/following'", re.compile(
        r"\b(the\s+)?(above|aforementioned|following|preceding|foregoing|given|provided|previous)"
        r"(\s+[\w-]+){0,2}\s+(passage|text|document|section|excerpt|snippet|example|code|paragraph|context|"
        r"module|program|setting|function|list|table|steps?|article|page|chapter|information|statement|sentence|"
        r"description|configuration|command|class|method)s?\b", re.I)),
    ("points at 'the above'", re.compile(r"\b(the\s+above|above-mentioned|aforementioned|below-mentioned)\b", re.I)),
    ("points at 'mentioned/described here'", re.compile(
        r"\b(mentioned|described|shown|listed|discussed|given|used|defined|presented|referred\s+to|explained)"
        r"\s+(here|above|below|earlier|previously)\b", re.I)),
    ("refers to the passage", re.compile(
        r"\b(the|this|that)\s+(passage|excerpt|snippet|text\s+above|paragraph|context|author|document\s+above)\b"
        r"|\b(according\s+to|in|from|based\s+on)\s+the\s+(text|document|section|passage|article|example|code|"
        r"documentation\s+above)\b", re.I)),
]
# Words that say nothing about the topic: a question made only of these (plus words absent from the
# passage) is invented ("How do I create a new movie?" from a programming manual).
_GENERIC = set("""
a an the and or but if of to in on at by for with from as into onto about over under between through during
is are was were be been being am do does did done doing have has had having can could should would will shall
may might must not no yes i you he she it we they me my your our their its his her them us what which who whom
whose when where why how whether there here than then that this these those such so also only just any some all
each every both either neither more most less least many much few other another same new old good best better
use used using uses make makes made making get gets got set sets setting create creates created creating add
adds added work works working need needs needed want wants way ways thing things one two first last main type
kind example purpose difference different differ between value values happen happens happened possible allowed
mean means meaning explain explained describe described called call name named list lists see run runs
""".split())
_CONTENT = re.compile(r"[A-Za-z][A-Za-z0-9_]+")


def _stem(word: str) -> str:
    return word.lower()[:6]


def context_reason(question: str, passages: list[str], check_grounding: bool = True) -> str | None:
    """Why a question depends on its passage being in view or is not about it (None if it is fine)."""
    for reason, pattern in _CONTEXT_PATTERNS:
        if pattern.search(question):
            return reason
    if check_grounding:
        content = {_stem(w) for w in _CONTENT.findall(question) if w.lower() not in _GENERIC and len(w) > 2}
        source = {_stem(w) for p in passages for w in _CONTENT.findall(p)}
        if content and not content & source:
            return "names nothing in its passage"
    return None


# --- inverse cloze (no LLM) ---------------------------------------------------------------------
def inverse_cloze(
    record: dict[str, Any], n: int, min_words: int, max_words: int, keep_probability: float = 0.1,
    seed: Any = 0, min_rest_words: int = 12,
) -> list[tuple[str, str | None]]:
    """Up to n (pseudo-query, positive text) pairs: a prose sentence of the passage, and the passage text
    without that sentence. With probability `keep_probability` (deterministic per seed, passage and sentence)
    the sentence stays in and the positive text is None (= the corpus text), as in the original ICT (Lee et
    al. 2019: kept 10 % of the time, so the model also learns that overlap matters, but cannot rely on it).

    Removing it is the point: with the sentence still inside its positive, the model only learns string
    overlap. Sentences come from `embedpipe.sdg.sentences` (abbreviation-aware, code blocks and code lines skipped).
    A sentence whose removal would leave fewer than `min_rest_words` words is not used.
    """
    text = record.get("text") or ""
    usable = query_sentences(text, min_words, max_words)
    usable.sort(key=lambda s: stable_int(seed, record["_id"], s.text))
    out: list[tuple[str, str | None]] = []
    for s in usable:
        if len(out) >= n:
            break
        rest = remove_span(text, s.start, s.end)
        if len(rest.split()) < min_rest_words:
            continue
        kept = stable_int(seed, record["_id"], s.text, "keep") % 1_000_000 < keep_probability * 1_000_000
        out.append((s.text, None if kept else rest))
    return out


def cap_share(n_other: int, max_share: float) -> int | None:
    """How many inverse-cloze pairs may join n_other LLM pairs so they are at most max_share of the total.

    None = no cap (max_share >= 1, or no LLM pair to supplement: inverse cloze is then all there is).
    """
    if max_share >= 1 or n_other <= 0:
        return None
    return int(max_share / (1 - max_share) * n_other) if max_share > 0 else 0


# --- embedding gates ----------------------------------------------------------------------------
def dedup_mask(embeddings: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy in order: keep a row unless its cosine to an earlier kept row exceeds the threshold."""
    keep = np.zeros(len(embeddings), dtype=bool)
    kept: list[int] = []
    for i, e in enumerate(embeddings):
        if not kept or float(np.max(embeddings[kept] @ e)) <= threshold:
            keep[i] = True
            kept.append(i)
    return keep


def neighbour_groups(corpus: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Passage ids of each document ordered by `position` (for multi-hop neighbours)."""
    docs: dict[str, list[tuple[int, str]]] = {}
    for pid, rec in corpus.items():
        docs.setdefault(str(rec.get("doc", "")), []).append((int(rec.get("position", 0)), pid))
    return {doc: [pid for _, pid in sorted(items)] for doc, items in docs.items()}


def qa_id(question: str, segment_ids: list[str]) -> str:
    return "qa_" + hashlib.sha256((question + "\x1f" + ",".join(segment_ids)).encode()).hexdigest()[:16]
