"""One embedded SDG question writer on N passages: accepted LLM questions per minute of LLM time, the
questions themselves, and (--judge) whether the same model, as judge, scores a pair higher against its own
passage than against a passage of another document (AUC; 0.5 = cannot tell). Not a test; run alone.

    python bench/bench_sdg_writers.py --corpus data/chunks/corpus.jsonl --passages 10 --work /tmp/w-gemma
    python bench/bench_sdg_writers.py --corpus data/chunks/corpus.jsonl --passages 10 --work /tmp/w-qwen \
        --model qwen2.5-coder-1.5b --api chat --judge
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import click
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from embedpipe.core.io import load_corpus, read_json, read_jsonl  # noqa: E402


@click.command()
@click.option("--corpus", required=True)
@click.option("--passages", default=10)
@click.option("--model", default="gemma-3-270m")
@click.option("--api", default="completions")
@click.option("--work", required=True)
@click.option("--judge", is_flag=True, help="Also: judge check (own passage vs another document's) with this model.")
@click.option("--judge-pairs", default=6, show_default=True)
def main(corpus: str, passages: int, model: str, api: str, work: str, judge: bool, judge_pairs: int) -> None:
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    sdg = base["sdg"]
    sdg.update(max_passages=passages, multi_hop_fraction=0.0)
    sdg["llm"].update(model=model, api=api, base_url="", time_budget_s=0, models_dir=str(REPO / "cache/models"),
                      max_tokens=64 if api == "completions" else 200, timeout=300)
    sdg["inverse_cloze"]["enabled"] = False
    sdg["gates"]["judge"]["enabled"] = False
    (work / "params.yaml").write_text(yaml.safe_dump({"model": base["model"], "sdg": sdg}))
    import subprocess
    t = time.time()
    subprocess.run([sys.executable, str(REPO / "stages/sdg.py"), "--params", str(work / "params.yaml"), "--corpus", corpus,
                    "--out", str(work / "sdg"), "--metrics", str(work / "sdg.json"), "--cache-dir",
                    str(work / "cache")], check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - t
    m = read_json(work / "sdg.json")
    llm_s = m["latency_mean_s"] * m["requests"] if m.get("latency_mean_s") else float("nan")
    out = {"model": model, "api": api, "jobs": m["llm_jobs"], "requests": m["requests"],
           "latency_p50_s": m["latency_p50_s"], "llm_time_s": round(llm_s, 1), "server_start_s": m["server_start_s"],
           "removed_by_gate": m["removed_by_gate"], "failures": m["failures_by_kind"],
           "accepted_llm": m["accepted_llm"], "accepted_per_llm_minute": round(m["accepted_llm"] / (llm_s / 60), 2),
           "wall_s": round(wall, 1)}
    print(json.dumps(out, indent=1))
    for r in read_jsonl(work / "sdg" / "qa.jsonl"):
        print("  ACCEPTED:", r["question"], "->", r["answer"][:80])
    for r in read_jsonl(work / "sdg" / "rejected.jsonl"):
        print("  REJECTED:", r.get("question", r.get("raw", ""))[:120], "|", r["reason"][:60])
    if judge:
        from embedpipe.sdg.jobs import judge as judge_one
        from embedpipe.sdg.llm import LLMClient, LLMConfig, RequestCache
        from embedpipe.sdg.llm_server import EmbeddedServer, model_file
        pairs = (read_jsonl(work / "sdg" / "qa.jsonl") + [r for r in read_jsonl(work / "sdg" / "rejected.jsonl")
                                                          if r.get("question") and r.get("answer")])[:judge_pairs]
        c = load_corpus(corpus)
        docs = {}
        for pid, rec in c.items():
            docs.setdefault(rec["doc"], []).append(pid)
        rng = random.Random(0)
        srv = EmbeddedServer(model_file(model, REPO / "cache/models"), alias=model, log_path=work / "judge.log")
        url = srv.start()
        try:
            client = LLMClient(LLMConfig(base_url=url, model=model, api=api, grammar=True, timeout=300,
                                         max_tokens=200), RequestCache(work / "judge.sqlite"))
            own, other = [], []
            t = time.time()
            for p in pairs:
                res = judge_one(client, c, p)
                other_doc = rng.choice([d for d in docs if d != c[p["segment_ids"][0]]["doc"]])
                res2 = judge_one(client, c, {**p, "segment_ids": [rng.choice(docs[other_doc])]})
                if res.ok and res2.ok:
                    own.append(res.value["overall"])
                    other.append(res2.value["overall"])
                    print(f"  judge own={res.value['overall']} other={res2.value['overall']} | {p['question'][:70]}")
                else:
                    print("  judge failed:", res.error, res2.error)
            wins = sum((a > b) + 0.5 * (a == b) for a in own for b in other) / max(1, len(own) * len(other))
            print(json.dumps({"judge_pairs": len(own), "mean_own": round(sum(own) / max(1, len(own)), 2),
                              "mean_other": round(sum(other) / max(1, len(other)), 2), "auc": round(wins, 3),
                              "judge_s": round(time.time() - t, 1)}))
        finally:
            srv.stop()


if __name__ == "__main__":
    main()
