"""Benchmark the sdg stage against the embedded llama.cpp server (not a test).

1. Pairs per minute and acceptance rate at concurrency 1, 2, 4 on a slice of the corpus (a fresh
   request cache per setting, so every request really goes to the server).
2. `--judge-check`: does the LLM judge separate good from bad pairs? Each generated pair is scored
   against its own passage and against an unrelated passage of another document; we report the
   mean overall score of each and the AUC (0.5 = the judge cannot tell them apart).

    python bench/bench_sdg.py --passages 6 --concurrency 1,2,4 --judge-check
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from embedpipe.core.io import load_corpus, passage_text, read_json, read_jsonl  # noqa: E402


def run_stage(params: dict, corpus: Path, work: Path) -> tuple[dict, float]:
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    started = time.time()
    subprocess.run(
        [sys.executable, str(REPO / "stages/sdg.py"), "--params", str(work / "params.yaml"), "--corpus", str(corpus),
         "--out", str(work / "sdg"), "--metrics", str(work / "sdg.json"), "--cache-dir", str(work / "cache")],
        check=True, cwd=REPO, stderr=subprocess.DEVNULL,
    )
    return read_json(work / "sdg.json"), time.time() - started


def auc(pos: list[float], neg: list[float]) -> float:
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / max(1, len(pos) * len(neg))


@click.command()
@click.option("--corpus", default="data/chunks/corpus.jsonl", show_default=True)
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--passages", default=6, show_default=True, help="Passages in the slice (LLM jobs ~ 1.25x this).")
@click.option("--concurrency", "levels_csv", default="1,2,4", show_default=True, help="Comma-separated levels.")
@click.option("--judge-check", is_flag=True, help="Also measure whether the judge separates good from bad pairs.")
@click.option("--pairs-dir", default=None, help="Judge check only, on the pairs of an existing run (e.g. data/sdg).")
def main(corpus: str, params_path: str, passages: int, levels_csv: str, judge_check: bool,
         pairs_dir: str | None) -> None:
    levels = [int(x) for x in levels_csv.split(",") if x.strip()]
    base = yaml.safe_load((REPO / params_path).read_text())
    params = {"model": base["model"], "sdg": base["sdg"]}
    params["sdg"]["max_passages"] = passages
    params["sdg"]["llm"]["base_url"] = ""
    params["sdg"]["llm"]["models_dir"] = str(REPO / "cache" / "models")
    if pairs_dir:
        return check_judge(params, REPO / corpus, Path(pairs_dir), Path(tempfile.mkdtemp(prefix="bench_judge_")))
    print(f"{'concurrency':>11} {'LLM jobs':>8} {'requests':>8} {'LLM kept':>8} {'accept':>7} {'pairs/min':>9} "
          f"{'p50 s':>6} {'wall s':>7}")
    last_work = None
    for level in levels:
        params["sdg"]["llm"]["concurrency"] = level
        work = Path(tempfile.mkdtemp(prefix=f"bench_sdg_c{level}_"))
        m, wall = run_stage(params, REPO / corpus, work)
        llm_time = max(1e-9, wall - m["server_start_s"])
        print(f"{level:>11} {m['llm_jobs']:>8} {m['requests']:>8} {m['accepted_llm']:>8} "
              f"{m['acceptance_rate_llm']:>7.2f} {60 * m['llm_jobs'] / llm_time:>9.1f} {m['latency_p50_s']:>6} "
              f"{wall:>7.1f}")
        last_work = work
    if judge_check and last_work is not None:
        check_judge(params, REPO / corpus, last_work / "sdg", last_work)


def check_judge(params: dict, corpus_path: Path, pairs_dir: Path, work: Path) -> None:
    """Score every generated pair with its own passage (should be high) and a foreign one (should be low)."""
    from embedpipe.sdg import rules as sdg
    from embedpipe.sdg.llm import LLMClient, LLMConfig, RequestCache
    from embedpipe.sdg.llm_server import EmbeddedServer, model_file

    corpus = load_corpus(corpus_path)
    llm = params["sdg"]["llm"]
    pairs = [r for r in read_jsonl(pairs_dir / "qa.jsonl") + read_jsonl(pairs_dir / "rejected.jsonl")
             if r.get("generator") == llm["model"] and r.get("question")]
    ids = list(corpus)
    own, foreign = [], []
    with EmbeddedServer(model_file(llm["model"], llm["models_dir"]), alias=llm["model"]) as url:
        client = LLMClient(LLMConfig(base_url=url, model=llm["model"], api="completions", grammar=True),
                           RequestCache(work / "judge_check.sqlite"))
        for r in pairs:
            pid = r["segment_ids"][0]
            other = next(i for i in ids[(ids.index(pid) + len(ids) // 2) % len(ids):] + ids
                         if corpus[i].get("doc") != corpus[pid].get("doc"))
            for target, sink in ((pid, own), (other, foreign)):
                req = client.build(prompt=sdg.judge_prompt([passage_text(corpus[target])], r["question"], r["answer"]),
                                   temperature=0.0, max_tokens=24, stop=["\n"], grammar=sdg.JUDGE_GRAMMAR)
                res = client.ask(req, sdg.parse_judge_completion)
                if res.ok:
                    sink.append(res.value["overall"])
    if own and foreign:
        print(f"judge check on {len(pairs)} pairs: mean overall own passage {sum(own) / len(own):.2f}, "
              f"foreign passage {sum(foreign) / len(foreign):.2f}, AUC {auc(own, foreign):.3f} (0.5 = no separation)")


if __name__ == "__main__":
    main()
