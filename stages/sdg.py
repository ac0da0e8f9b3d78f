"""Stage `sdg`: passages -> synthetic question-answer pairs (data/sdg/qa.jsonl), judged and filtered.

Generators: an LLM (any OpenAI-compatible endpoint, or an embedded llama.cpp server when
sdg.llm.base_url is empty) and the LLM-free inverse cloze. Gates, cheapest first: junk -> dedup ->
retrieval consistency -> LLM judge. Every LLM request is cached in cache/llm/ (outside DVC outs),
so an interrupted run resumes without repeating finished requests.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click
import numpy as np
from tqdm import tqdm

from embedpipe import sdg
from embedpipe.console import alert, summary, warn
from embedpipe.io import FormatError, load_corpus, passage_text, write_json, write_jsonl
from embedpipe.llm import LLMClient, LLMConfig, LLMFatalError, RequestCache, Result
from embedpipe.llm_server import EmbeddedServer, ServerError, model_file
from embedpipe.models import ModelNotAvailable, encode, load_model
from embedpipe.params import ParamsError, load_params, section
from embedpipe.retrieval import search


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


def plan_jobs(corpus: dict[str, dict], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """LLM jobs: single-hop questions on sampled passages plus multi-hop over neighbouring passages."""
    ids = list(corpus)
    limit = int(cfg.get("max_passages") or 0)
    if limit and limit < len(ids):  # evenly spread over the corpus, so every document is represented
        ids = [ids[int(i)] for i in np.linspace(0, len(ids) - 1, limit).round().astype(int)]
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


def generate(client: LLMClient, corpus: dict[str, dict], job: dict[str, Any]) -> Result:
    texts = [passage_text(corpus[i]) for i in job["segment_ids"]]
    if client.cfg.api == "chat":
        req = client.build(
            messages=sdg.chat_messages(texts, job["query_type"], job["reasoning_type"], job["question_complexity"]),
            response_format=sdg.chat_response_format("qa_pair", sdg.QA_SCHEMA),
            seed=job["seed"],
        )
        return client.ask(req, sdg.parse_chat_qa)
    req = client.build(prompt=sdg.completion_prompt(texts, job["seed"]), stop=sdg.COMPLETION_STOP, seed=job["seed"])
    return client.ask(req, sdg.parse_completion_qa)


def judge(client: LLMClient, corpus: dict[str, dict], pair: dict[str, Any]) -> Result:
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


def generator_is_chat(qa: dict[str, Any]) -> bool:
    return "reasoning_type" in qa


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="Params file.")
@click.option("--corpus", "corpus_path", default="data/chunks/corpus.jsonl", show_default=True, help="Passages.")
@click.option("--out", "out_dir", default="data/sdg", show_default=True, help="Output folder.")
@click.option("--metrics", "metrics_path", default="metrics/sdg.json", show_default=True)
@click.option("--cache-dir", default="cache/llm", show_default=True, help="LLM request cache (keep it: resumes runs).")
@click.option("--retry-failed", is_flag=True, help="Ask again the requests recorded as failed in the cache.")
def main(params_path: str, corpus_path: str, out_dir: str, metrics_path: str, cache_dir: str, retry_failed: bool):
    """Generate question-answer pairs from passages with an LLM and/or inverse cloze, then filter them.

    The LLM is any OpenAI-compatible endpoint (sdg.llm.base_url, sdg.llm.model, the API key read from the
    environment variable named by sdg.llm.api_key_env), or, when base_url is empty, an embedded llama.cpp
    server started and stopped by this stage. Writes OUT/qa.jsonl (accepted pairs), OUT/rejected.jsonl
    (with the reason) and a metrics JSON. Interrupt it at any time: a rerun resumes from cache-dir.
    """
    started = time.time()
    try:
        params = load_params(params_path)
        cfg, mcfg = section(params, "sdg"), section(params, "model")
        corpus = load_corpus(corpus_path)
    except (ParamsError, FormatError) as e:
        raise click.ClickException(str(e)) from None
    if not corpus:
        raise click.ClickException(f"{corpus_path}: no passages")
    try:
        embedder = load_model(mcfg["base_model"], device=mcfg.get("device"), max_seq_length=mcfg.get("max_seq_length"))
    except ModelNotAvailable as e:
        raise click.ClickException(str(e)) from None
    ids = list(corpus)
    row = {pid: n for n, pid in enumerate(ids)}
    corpus_emb = encode(embedder, [passage_text(corpus[i]) for i in ids], mcfg.get("passage_prompt", ""),
                        show_progress_bar=len(ids) > 500)

    llm_cfg = cfg["llm"]
    gates = cfg["gates"]
    jobs = plan_jobs(corpus, cfg) if llm_cfg.get("enabled", True) else []
    candidates: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    failures: Counter = Counter()
    client: LLMClient | None = None
    server: EmbeddedServer | None = None
    server_start_s = 0.0
    generator = ""
    cache = RequestCache(Path(cache_dir) / "requests.sqlite")
    try:
        if jobs:
            base_url = llm_cfg.get("base_url") or ""
            generator = llm_cfg["model"]
            if not base_url:
                t0 = time.time()
                try:
                    path = model_file(llm_cfg["model"], llm_cfg.get("models_dir") or "cache/models")
                    server = EmbeddedServer(path, alias=llm_cfg["model"], n_ctx=int(llm_cfg.get("n_ctx", 2048)),
                                            n_threads=int(llm_cfg.get("n_threads", 2)),
                                            log_path=Path(cache_dir) / "server.log")
                    base_url = server.start()
                except ServerError as e:
                    raise click.ClickException(str(e)) from None
                server_start_s = time.time() - t0
            client = LLMClient(
                LLMConfig(
                    base_url=base_url, model=llm_cfg["model"], api=llm_cfg.get("api", "chat"),
                    api_key_env=llm_cfg.get("api_key_env") or "", temperature=float(llm_cfg["temperature"]),
                    max_tokens=int(llm_cfg["max_tokens"]), timeout=float(llm_cfg["timeout"]),
                    max_retries=int(llm_cfg["max_retries"]), parse_retries=int(llm_cfg["parse_retries"]),
                    concurrency=int(llm_cfg["concurrency"]), grammar=server is not None or bool(llm_cfg.get("grammar")),
                    backoff_base=float(llm_cfg.get("backoff_base", 1.0)),
                ),
                cache,
                retry_failed=retry_failed,
            )
            # 1. generation
            results: dict[int, Result] = {}
            with tqdm(total=len(jobs), desc="sdg generate", unit="req", disable=None) as bar:
                for i, res in client.map(lambda j: generate(client, corpus, j), jobs, progress=bar):
                    results[i] = res
            for i, job in enumerate(jobs):
                res = results[i]
                if not res.ok:
                    failures["generate:" + res.error.split(":")[0].split(" (")[0]] += 1
                    rejected.append({"segment_ids": job["segment_ids"], "query_type": job["query_type"],
                                     "generator": generator, "raw": res.text, "reason": f"llm failure: {res.error}"})
                    continue
                candidates.append(to_record(job, res.value, corpus, generator))

        # 2. inverse cloze (no LLM)
        ict = cfg["inverse_cloze"]
        if ict.get("enabled", True):
            for pid, rec in corpus.items():
                for s in sdg.inverse_cloze(rec, int(ict["per_passage"]), int(ict["min_words"]), int(ict["max_words"])):
                    job = {"segment_ids": [pid], "query_type": "inverse_cloze"}
                    candidates.append(to_record(job, {"question": s, "answer": s}, corpus, "inverse_cloze"))
        generated = Counter(c["query_type"] for c in candidates)
        removed: dict[str, int] = {}

        def drop(keep: list[bool], gate: str, reasons: list[str] | None = None) -> None:
            nonlocal candidates
            removed[gate] = removed.get(gate, 0) + keep.count(False)
            for n, (c, k) in enumerate(zip(candidates, keep, strict=True)):
                if not k:
                    rejected.append({**c, "reason": f"{gate}: {reasons[n]}" if reasons else gate})
            candidates = [c for c, k in zip(candidates, keep, strict=True) if k]

        # 3. junk
        if gates["junk"]["enabled"]:
            reasons = [sdg.junk_reason(c, [passage_text(corpus[i]) for i in c["segment_ids"]], gates["junk"])
                       for c in candidates]
            drop([r is None for r in reasons], "junk", [r or "" for r in reasons])
        # 4. dedup + 5. retrieval consistency (base embedder)
        q_emb = encode(embedder, [c["question"] for c in candidates], mcfg.get("query_prompt", ""))
        if gates["dedup"]["enabled"] and candidates:
            mask = sdg.dedup_mask(q_emb, float(gates["dedup"]["threshold"]))
            drop(mask.tolist(), "dedup")
            q_emb = q_emb[mask]
        if gates["retrieval"]["enabled"] and candidates:
            k = int(gates["retrieval"]["top_k"])
            _, top = search(q_emb, corpus_emb, k)
            keep = [any(row[s] in set(t.tolist()) for s in c["segment_ids"]) for c, t in zip(candidates, top, strict=True)]
            drop(keep, "retrieval", [f"no positive in base-embedder top-{k}"] * len(candidates))
        # 6. LLM judge (LLM pairs only; inverse-cloze pairs have no answer to judge)
        jcfg = gates["judge"]
        judged = [n for n, c in enumerate(candidates) if c["generator"] != "inverse_cloze"]
        judge_on = (server is None) if jcfg["enabled"] == "auto" else bool(jcfg["enabled"])
        if judge_on and client is not None and judged:
            keep = [True] * len(candidates)
            reasons = [""] * len(candidates)
            with tqdm(total=len(judged), desc="sdg judge", unit="req", disable=None) as bar:
                for n, res in client.map(lambda m: judge(client, corpus, candidates[m]), judged, progress=bar):
                    c = candidates[judged[n]]
                    if not res.ok:
                        failures["judge:" + res.error.split(":")[0].split(" (")[0]] += 1
                        keep[judged[n]], reasons[judged[n]] = False, f"judge failed: {res.error}"
                        continue
                    c["scores"] = {k: v for k, v in res.value.items() if k != "justification"}
                    c["quality_score"] = float(res.value["overall"])
                    if res.value.get("justification"):
                        c["judge_justification"] = res.value["justification"]
                    if not sdg.judge_passes(res.value, float(jcfg["threshold"]), jcfg.get("floors") or {}):
                        keep[judged[n]] = False
                        reasons[judged[n]] = "scores " + " ".join(f"{k}={v}" for k, v in c["scores"].items())
            drop(keep, "judge", reasons)
    except LLMFatalError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        alert("interrupted: finished LLM requests are saved in the cache; rerun to resume")
        sys.exit(130)
    finally:
        if server is not None:
            server.stop()
        cache.close()

    out = Path(out_dir)
    write_jsonl(out / "qa.jsonl", candidates)
    write_jsonl(out / "rejected.jsonl", rejected)
    total_generated = sum(generated.values())
    scored = [c["scores"] for c in candidates if c.get("scores")]
    stats = client.stats.as_dict() if client else {}
    metrics = {
        "passages": len(corpus),
        "llm_jobs": len(jobs),
        "generator": generator or "inverse_cloze",
        **{k: stats.get(k) for k in ("requests", "cache_hits", "prompt_tokens", "completion_tokens",
                                     "latency_p50_s", "latency_mean_s")},
        "retries_by_kind": stats.get("retries_by_kind", {}),
        "failures_by_kind": dict(failures),
        "generated": total_generated,
        "generated_by_type": dict(generated),
        "removed_by_gate": removed,
        "accepted": len(candidates),
        "acceptance_rate": round(len(candidates) / total_generated, 4) if total_generated else 0.0,
        "accepted_llm": sum(c["generator"] != "inverse_cloze" for c in candidates),
        "acceptance_rate_llm": round(sum(c["generator"] != "inverse_cloze" for c in candidates) / max(1, len(jobs)), 4),
        "mix_query_type": dict(Counter(c["query_type"] for c in candidates)),
        "mix_reasoning_type": dict(Counter(c["reasoning_type"] for c in candidates)),
        "mix_hop_count": {str(k): v for k, v in sorted(Counter(c["hop_count"] for c in candidates).items())},
        "mix_complexity": {str(k): v for k, v in sorted(Counter(c["question_complexity"] for c in candidates).items())},
        "mean_judge_scores": {k: round(float(np.mean([s[k] for s in scored])), 3) for k in (*sdg.SCORE_KEYS, "overall")}
        if scored else {},
        "server_start_s": round(server_start_s, 2),
        "wall_time_s": round(time.time() - started, 2),
    }
    write_json(metrics_path, metrics)
    if not candidates:
        warn("no pair passed the gates: relax sdg.gates or check the LLM output in rejected.jsonl")
    summary("sdg", {
        "passages": len(corpus), "LLM jobs": len(jobs), "requests made": stats.get("requests", 0),
        "cache hits": stats.get("cache_hits", 0), "failures": sum(failures.values()), "generated": total_generated,
        **{f"removed by {g}": n for g, n in removed.items()},
        "accepted": len(candidates), "acceptance rate": metrics["acceptance_rate"],
        "accepted (LLM)": metrics["accepted_llm"], "wall time s": metrics["wall_time_s"],
    })


if __name__ == "__main__":
    sys.exit(main())
