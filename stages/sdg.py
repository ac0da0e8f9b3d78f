"""Stage `sdg`: passages -> synthetic question-answer pairs (data/sdg/qa.jsonl), judged and filtered.

Generators: an LLM (any OpenAI-compatible endpoint, or an embedded llama.cpp server when
sdg.llm.base_url is empty) and the LLM-free inverse cloze, heading, anchor and definition pairs (supplements, each
capped by its max_share; `embedpipe.sdg.structure`). Gates,
cheapest first: junk -> context -> dedup -> retrieval consistency -> LLM judge. The LLM phase stops
issuing requests when sdg.llm.time_budget_s is spent. Every LLM request is cached in cache/llm/ (outside DVC outs),
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

from embedpipe.core.bulk_encoder import use_bulk_encoder
from embedpipe.core.console import alert, summary, warn
from embedpipe.core.embed_store import encode_cached
from embedpipe.core.io import FormatError, load_corpus, passage_text, write_json, write_jsonl
from embedpipe.core.models import ModelNotAvailable, load_model
from embedpipe.core.params import ParamsError, load_params, section
from embedpipe.sdg import rules as sdg
from embedpipe.sdg.gates import CandidatePool, is_llm_free
from embedpipe.sdg.jobs import generate_pairs, inverse_cloze_records, plan_jobs
from embedpipe.sdg.llm import LLMClient, LLMConfig, LLMFatalError, RequestCache
from embedpipe.sdg.llm_server import EmbeddedServer, ServerError, model_file, recommended_api
from embedpipe.sdg.structure import anchor_records, definition_records, heading_records


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
    schema = cfg["llm"]["schema"]  # validated by the params schema before any work
    try:
        embedder = load_model(mcfg["base_model"], device=mcfg.get("device"), max_seq_length=mcfg.get("max_seq_length"))
    except ModelNotAvailable as e:
        raise click.ClickException(str(e)) from None
    use_bulk_encoder(embedder, mcfg.get("bulk_encoder", "auto"))
    ids = list(corpus)
    row = {pid: n for n, pid in enumerate(ids)}
    corpus_emb = encode_cached(embedder, [passage_text(corpus[i]) for i in ids], mcfg.get("passage_prompt", ""),
                               desc="sdg: passages", kind="passage")

    llm_cfg = cfg["llm"]
    jobs = plan_jobs(corpus, cfg) if llm_cfg.get("enabled", True) else []
    pool = CandidatePool()
    failures: Counter = Counter()
    budget_cut: Counter = Counter(jobs_not_run=0, judge_not_run=0)
    client: LLMClient | None = None
    server: EmbeddedServer | None = None
    server_start_s = 0.0
    generator = ""
    cache = RequestCache(Path(cache_dir) / "requests.sqlite")
    try:
        if jobs:
            generator = llm_cfg["model"]
            client, server, server_start_s = start_llm(llm_cfg, cache, cache_dir, retry_failed)
            client.set_time_budget(float(llm_cfg.get("time_budget_s") or 0))
            compact = server is not None if schema == "auto" else schema == "compact"
            # 1. generation
            pool.candidates, pool.rejected, failures, budget_cut["jobs_not_run"] = generate_pairs(
                client, corpus, jobs, generator, compact)

        generated, structure, budget_cut["judge_not_run"] = supplement_and_gate(
            pool, corpus, cfg, mcfg, embedder, corpus_emb, row, client, server is None, bool(jobs), failures)
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
    candidates = pool.candidates
    write_jsonl(out / "qa.jsonl", candidates)
    write_jsonl(out / "rejected.jsonl", pool.rejected)
    metrics = sdg_metrics(corpus, jobs, generator, client, failures, generated, pool, budget_cut, structure,
                          float(llm_cfg.get("time_budget_s") or 0), server_start_s, started)
    write_json(metrics_path, metrics)
    if not candidates:
        warn("no pair passed the gates: relax sdg.gates or check the LLM output in rejected.jsonl")
    print_summary(metrics, pool.removed, failures)




def supplement_and_gate(pool: CandidatePool, corpus: dict, cfg: dict, mcfg: dict, embedder: Any, corpus_emb: np.ndarray,
                        row: dict[str, int], client: LLMClient | None, remote: bool, has_jobs: bool,
                        failures: Counter) -> tuple[Counter, dict[str, dict], int]:
    """Gates 2-6 over the LLM pairs, with the LLM-free pairs added where they belong and capped to their shares.

    Returns (generated by query type, what each structure generator found, pairs the time budget left unjudged)."""
    llm_cfg, gates = cfg["llm"], cfg["gates"]
    ict = cfg["inverse_cloze"]
    max_share = float(ict.get("max_share", 1.0))

    def ict_cap() -> int | None:
        return sdg.cap_share(pool.llm_pairs(), max_share) if llm_cfg.get("enabled", True) else None

    # 2. junk + context on the LLM pairs
    generated = Counter(c["query_type"] for c in pool.candidates)
    pool.text_gates(corpus, gates)
    # 3. inverse cloze (no LLM), a supplement: only as many as the cap allows (x2: slack for the later gates)
    if ict.get("enabled", True):
        cap = ict_cap()
        if cap is None and has_jobs and max_share < 1:
            warn("no LLM pair passed the text gates: inverse cloze is not capped (it is all there is)")
        ict_recs = inverse_cloze_records(corpus, ict, cfg.get("seed", 0), limit=None if cap is None else 2 * cap)
        generated["inverse_cloze"] += len(ict_recs)
        pool.candidates.extend(ict_recs)
        pool.text_gates(corpus, gates)
    # 3b. heading and anchor pairs (no LLM, from the passages' `structure`), each capped by its max_share below
    structure: dict[str, dict] = {}
    for name, make in (("headings", heading_records), ("anchors", anchor_records),
                       ("definitions", definition_records)):
        scfg = cfg.get(name) or {}
        if not scfg.get("enabled", False):
            continue
        if not any("structure" in r for r in corpus.values()):
            warn(f"sdg.{name}: the passages have no 'structure' field (a corpus from an older chunk stage): "
                 "rerun chunk")
        recs, found = make(corpus, scfg, cfg.get("seed", 0))
        structure[name] = found.as_dict()
        generated[name] += len(recs)
        pool.candidates.extend(recs)
    # 4. dedup + 5. retrieval consistency (base embedder)
    q_emb = encode_cached(embedder, [c["question"] for c in pool.candidates], mcfg.get("query_prompt", ""),
                          desc="sdg: questions", kind="query")
    if gates["dedup"]["enabled"]:
        q_emb = pool.dedup(q_emb, float(gates["dedup"]["threshold"]))
    if gates["retrieval"]["enabled"]:
        pool.retrieval(q_emb, corpus_emb, row, int(gates["retrieval"]["top_k"]))
    # 6. LLM judge (LLM pairs only)
    jcfg, not_judged = gates["judge"], 0
    judge_on = remote if jcfg["enabled"] == "auto" else bool(jcfg["enabled"])
    if judge_on and client is not None:
        not_judged = pool.judge(client, corpus, jcfg, failures)
    cap = ict_cap() if ict.get("enabled", True) else None
    if cap is not None:  # exactly max_share now that every gate has run
        pool.cap_inverse_cloze(cap, ict.get("max_share"))
    for name in structure:
        pool.cap_generator(name, float(cfg[name].get("max_share", 1)))
    return generated, structure, not_judged

def start_llm(llm_cfg: dict, cache: RequestCache, cache_dir: str,
              retry_failed: bool) -> tuple[LLMClient, EmbeddedServer | None, float]:
    """The LLM client, on the configured endpoint or on an embedded llama.cpp server started here."""
    base_url, server, started = llm_cfg.get("base_url") or "", None, time.time()
    if not base_url:
        made_for = recommended_api(llm_cfg["model"])
        if made_for and made_for != llm_cfg.get("api", "chat"):
            warn(f"sdg.llm.model {llm_cfg['model']} is made for api: {made_for}, "
                 f"but sdg.llm.api is {llm_cfg.get('api')}: expect unparseable replies")
        try:
            path = model_file(llm_cfg["model"], llm_cfg.get("models_dir") or "cache/models")
            server = EmbeddedServer(path, alias=llm_cfg["model"], n_ctx=int(llm_cfg.get("n_ctx", 2048)),
                                    n_threads=int(llm_cfg.get("n_threads", 2)), log_path=Path(cache_dir) / "server.log")
            base_url = server.start()
        except ServerError as e:
            raise click.ClickException(str(e)) from None
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
        server_gone=server.exit_reason if server is not None else None,
    )
    return client, server, (time.time() - started) if server is not None else 0.0


def sdg_metrics(corpus: dict, jobs: list, generator: str, client: LLMClient | None, failures: Counter,
                generated: Counter, pool: CandidatePool, budget_cut: Counter, structure: dict, time_budget_s: float,
                server_start_s: float, started: float) -> dict:
    """metrics/sdg.json: what was asked, generated, removed by each gate and accepted, and the accepted mix."""
    candidates = pool.candidates
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
        "removed_by_gate": pool.removed,
        "time_budget_s": time_budget_s,
        "jobs_not_run": budget_cut["jobs_not_run"],
        "judge_not_run": budget_cut["judge_not_run"],
        "inverse_cloze_sentence_removed": sum(bool(c.get("positive_texts")) for c in candidates),
        "accepted": len(candidates),
        "acceptance_rate": round(len(candidates) / total_generated, 4) if total_generated else 0.0,
        "accepted_llm": sum(not is_llm_free(c) for c in candidates),
        "acceptance_rate_llm": round(sum(not is_llm_free(c) for c in candidates) / max(1, len(jobs)), 4),
        "structure": {name: {**found, "accepted": sum(c["generator"] == name for c in candidates)}
                      for name, found in structure.items()},
        "mix_query_type": dict(Counter(c["query_type"] for c in candidates)),
        "mix_reasoning_type": dict(Counter(c["reasoning_type"] for c in candidates)),
        "mix_hop_count": {str(k): v for k, v in sorted(Counter(c["hop_count"] for c in candidates).items())},
        "mix_complexity": {str(k): v for k, v in sorted(Counter(c["question_complexity"] for c in candidates).items())},
        "mean_judge_scores": {k: round(float(np.mean([s[k] for s in scored])), 3) for k in (*sdg.SCORE_KEYS, "overall")}
        if scored else {},
        "server_start_s": round(server_start_s, 2),
        "wall_time_s": round(time.time() - started, 2),
    }
    return metrics


def print_summary(metrics: dict, removed: dict, failures: Counter) -> None:
    cut, not_judged = metrics["jobs_not_run"], metrics["judge_not_run"]
    summary("sdg", {
        "passages": metrics["passages"], "LLM jobs": metrics["llm_jobs"], "requests made": metrics["requests"] or 0,
        **({"LLM jobs cut by time budget": cut} if cut else {}),
        **({"pairs not judged (budget)": not_judged} if not_judged else {}),
        "cache hits": metrics["cache_hits"] or 0, "failures": sum(failures.values()), "generated": metrics["generated"],
        **{f"removed by {g}": n for g, n in removed.items()},
        "accepted": metrics["accepted"], "acceptance rate": metrics["acceptance_rate"],
        "accepted (LLM)": metrics["accepted_llm"],
        **{k: v for name, found in metrics["structure"].items() for k, v in structure_summary(name, found).items()},
        "wall time s": metrics["wall_time_s"],
    })


def structure_summary(name: str, found: dict) -> dict[str, object]:
    """Summary lines for a heading / anchor generator: pairs made and accepted, what was left out and why."""
    def reasons(counts: dict[str, int]) -> str:
        return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"

    out: dict[str, object] = {f"{name}: candidates": found["candidates"], f"{name}: pairs made": found["pairs"],
                              f"{name}: accepted": found["accepted"], f"{name}: filtered": reasons(found["filtered"])}
    if "unresolved_links" in found:
        out[f"{name}: unresolved links"] = reasons(found["unresolved_links"])
    return out


if __name__ == "__main__":
    sys.exit(main())
