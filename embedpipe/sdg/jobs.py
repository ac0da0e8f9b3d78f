"""The SDG run's moving parts, kept out of the stage: LLM job planning, requests, records, inverse cloze.

`embedpipe.sdg.rules` holds prompts, parsers and gates (pure functions of text); this module turns a corpus and
the `sdg` params into jobs, asks the LLM, and builds the `data/sdg/qa.jsonl` records.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from embedpipe.core.console import progress
from embedpipe.core.io import passage_text
from embedpipe.sdg import rules as sdg
from embedpipe.sdg.llm import LLMClient, Result


def pick(weights: dict[str, float], key: int) -> str:
    """Deterministic weighted choice (the target mix of query/reasoning types)."""
    names = sorted(weights)
    total = sum(float(weights[n]) for n in names) or 1.0
    x = (key % 10_000) / 10_000 * total
    for n in names:
        x -= float(weights[n])
        if x < 0:
            return n
    return names[-1]


def spread_order(n: int) -> list[int]:
    """0..n-1 in van der Corput order (0, n/2, n/4, 3n/4, ...): every prefix is spread over the range.

    Jobs run in this order so that a time budget that cuts the LLM phase still leaves questions from
    the whole corpus, not only from its first documents.
    """
    def radical_inverse(i: int) -> float:
        x, f = 0.0, 0.5
        while i:
            x += f * (i & 1)
            i >>= 1
            f /= 2
        return x

    return sorted(range(n), key=lambda i: (radical_inverse(i), i))


def plan_jobs(corpus: dict[str, dict], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """LLM jobs: single-hop questions on sampled passages plus multi-hop over neighbouring passages.

    Passages are sampled evenly over the corpus (every document represented) and the jobs are ordered
    by `spread_order`, so any prefix (what a time budget lets run) is itself spread over the corpus.
    """
    ids = list(corpus)
    limit = int(cfg.get("max_passages") or 0)
    if limit and limit < len(ids):
        ids = [ids[int(i)] for i in np.linspace(0, len(ids) - 1, limit).round().astype(int)]
    ids = [ids[i] for i in spread_order(len(ids))]
    groups = sdg.neighbour_groups(corpus)
    hmin, hmax = (int(h) for h in cfg["hops"])
    seed = cfg.get("seed", 0)
    jobs = []
    for pid in ids:
        for k in range(int(cfg["questions_per_passage"])):
            jobs.append({"segment_ids": [pid], "k": k})
        r = sdg.stable_int(seed, pid, "multi_hop")
        if hmax >= 2 and (r % 10_000) / 10_000 < float(cfg["multi_hop_fraction"]):
            doc = groups[str(corpus[pid].get("doc", ""))]
            hops = min(len(doc), max(2, hmin) + r % (hmax - max(2, hmin) + 1))
            if hops >= 2:
                start = min(doc.index(pid), len(doc) - hops)
                jobs.append({"segment_ids": doc[start : start + hops], "k": 0})
    unique = {(tuple(j["segment_ids"]), j["k"]): j for j in jobs}  # neighbouring starts can give one group twice
    jobs = list(unique.values())
    for job in jobs:
        key = sdg.stable_int(seed, *job["segment_ids"], job["k"])
        multi = len(job["segment_ids"]) > 1
        job["query_type"] = "multi_hop" if multi else pick(cfg["query_types"], key)
        job["reasoning_type"] = pick(cfg["reasoning_types"], key // 10_000)
        lo, hi = (int(c) for c in cfg["complexity"])
        job["question_complexity"] = lo + (key // 100_000_000) % (hi - lo + 1)
        job["seed"] = key % 2**31
    return jobs


def generate(client: LLMClient, corpus: dict[str, dict], job: dict[str, Any], compact: bool = False) -> Result:
    """One question-answer pair for a job (chat: JSON schema, `compact` or full; completions: few-shot continuation)."""
    texts = [passage_text(corpus[i]) for i in job["segment_ids"]]
    if client.cfg.api == "chat":
        req = client.build(
            messages=sdg.chat_messages(texts, job["query_type"], job["reasoning_type"], job["question_complexity"],
                                       compact=compact),
            response_format=sdg.chat_response_format("qa_pair", sdg.COMPACT_QA_SCHEMA if compact else sdg.QA_SCHEMA),
            seed=job["seed"],
        )
        return client.ask(req, sdg.parse_chat_qa)
    req = client.build(prompt=sdg.completion_prompt(texts, job["seed"]), stop=sdg.COMPLETION_STOP, seed=job["seed"])
    return client.ask(req, sdg.parse_completion_qa)


def failure_kind(error: str) -> str:
    """'timeout: read timed out (attempt 3)' -> 'timeout': the key of metrics/sdg.json `failures_by_kind`."""
    return error.split(":")[0].split(" (")[0]


def generate_pairs(
    client: LLMClient, corpus: dict[str, dict], jobs: list[dict[str, Any]], generator: str, compact: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Counter, int]:
    """Ask the LLM for every job (with a progress bar) -> (records, rejected failures, failures by kind, jobs the
    time budget left unasked). Jobs are in spread order, so a budget cut keeps a spread over the corpus."""
    results: dict[int, Result] = {}
    n_ok = not_run = 0
    with progress(len(jobs), "sdg generate", unit="req") as bar:
        for i, res in client.map(lambda j: generate(client, corpus, j, compact), jobs, progress=bar):
            results[i] = res
            n_ok += res.ok
            if res.not_run:
                not_run += 1
            bar.set_postfix(pairs=n_ok, cut_by_budget=not_run)
    records: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    failures: Counter = Counter()
    for i, job in enumerate(jobs):
        res = results[i]
        if res.not_run:
            continue  # never asked: not a rejection, counted in not_run
        if not res.ok:
            failures["generate:" + failure_kind(res.error)] += 1
            rejected.append({"segment_ids": job["segment_ids"], "query_type": job["query_type"],
                             "generator": generator, "raw": res.text, "reason": f"llm failure: {res.error}"})
            continue
        records.append(to_record(job, res.value, corpus, generator))
    return records, rejected, failures, not_run


def judge(client: LLMClient, corpus: dict[str, dict], pair: dict[str, Any]) -> Result:
    """The judge's scores for one pair (chat: JSON schema with justification; completions: GBNF grammar)."""
    texts = [passage_text(corpus[i]) for i in pair["segment_ids"]]
    if client.cfg.api == "chat":
        req = client.build(
            messages=sdg.judge_messages(texts, pair["question"], pair["answer"]),
            response_format=sdg.chat_response_format("judgement", sdg.JUDGE_SCHEMA),
            temperature=0.0, max_tokens=160,
        )
        return client.ask(req, sdg.parse_judge_chat)
    req = client.build(
        prompt=sdg.judge_prompt(texts, pair["question"], pair["answer"]),
        temperature=0.0, max_tokens=24, stop=["\n"], grammar=sdg.JUDGE_GRAMMAR,
    )
    return client.ask(req, sdg.parse_judge_completion)


def generator_is_chat(qa: dict[str, Any]) -> bool:
    return "reasoning_type" in qa


def to_record(job: dict[str, Any], qa: dict[str, Any], corpus: dict[str, dict], generator: str) -> dict[str, Any]:
    """A pair in the data/sdg/qa.jsonl format; labels a base model cannot give are guessed from the text."""
    ids = job["segment_ids"]
    summaries = qa.get("hop_summaries") or []
    if job["query_type"] == "inverse_cloze":
        reasoning, complexity = "factual", 1
    elif generator_is_chat(qa):
        reasoning = qa.get("reasoning_type") or job["reasoning_type"]
        complexity = qa.get("question_complexity") or job["question_complexity"]
    else:
        reasoning, complexity = sdg.guess_reasoning_type(qa["question"]), sdg.guess_complexity(qa["question"], len(ids))
    return {
        "id": sdg.qa_id(qa["question"], ids),
        "question": qa["question"],
        "answer": qa["answer"],
        "query_type": job["query_type"],
        "reasoning_type": reasoning,
        "question_complexity": int(complexity),
        "segment_ids": ids,
        "hop_count": len(ids),
        "hop_contexts": [
            {"segment_id": i, "summary": summaries[n] if n < len(summaries) else corpus[i].get("title", "")}
            for n, i in enumerate(ids)
        ],
        "doc": corpus[ids[0]].get("doc", ""),
        "generator": generator,
        "scores": None,
        "quality_score": None,
    }


def inverse_cloze_records(
    corpus: dict[str, dict], ict: dict[str, Any], seed: Any, limit: int | None = None
) -> list[dict[str, Any]]:
    """Inverse-cloze pairs, passages in a seeded order (a random spread over the corpus), returned round-robin:
    every passage's first pseudo-query, then every passage's second, ... so that a cap keeps a spread.

    `limit`: stop once that many pairs exist (sentence splitting costs ~10-25 ms a passage; with the cap only
    a few hundred pairs are wanted, not one per sentence of a 10k-passage corpus). A pair whose sentence was
    removed from its positive carries `positive_texts: {passage id: text without the sentence}`; prep and
    finetune train on that text instead of the corpus text.
    """
    rounds: list[list[dict[str, Any]]] = []
    total = 0
    order = sorted(corpus, key=lambda pid: sdg.stable_int(seed, pid, "ict-order"))
    with progress(limit if limit is not None else len(order), "sdg inverse cloze",
                  unit="pair" if limit is not None else "passage") as bar:
        for pid in order:
            if limit is not None and total >= limit:
                break
            pairs = sdg.inverse_cloze(
                corpus[pid], int(ict["per_passage"]), int(ict["min_words"]), int(ict["max_words"]),
                keep_probability=float(ict.get("keep_probability", 0.1)), seed=seed,
            )
            for n, (sentence, rest) in enumerate(pairs):
                job = {"segment_ids": [pid], "query_type": "inverse_cloze"}
                rec = to_record(job, {"question": sentence, "answer": sentence}, corpus, "inverse_cloze")
                if rest is not None:
                    rec["positive_texts"] = {pid: rest}
                while len(rounds) <= n:
                    rounds.append([])
                rounds[n].append(rec)
            total += len(pairs)
            bar.update(len(pairs) if limit is not None else 1)
    out = [rec for r in rounds for rec in r]
    return out if limit is None else out[:limit]
