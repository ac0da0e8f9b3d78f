"""Quality benchmark: does the fine-tuned model beat its base on real human queries?

Runs chunk -> sdg -> prep -> finetune on a documents folder (with the params under test) in a scratch
workspace, for several seeds, then evaluates the base model (once: it does not depend on the seed) and
every fine-tuned model on a human-labeled BEIR folder with `stages/eval.py --beir-dir`. Prints and writes
one table (per-seed metrics, mean gain, worst seed, paired sign-flip p-value over queries, the run's own
validation gain next to the benchmark gain, per-stage wall times) as JSON and Markdown.

    python bench/bench_quality.py --bench ../shared/bench/django-faq-built --seeds 3 -S finetune.cpu.epochs=2

A seed k adds k to sdg.seed, prep.seed and finetune.seed, so seed 0 is exactly the params under test.
The stages run as subprocesses with their path options pointed into the workspace; the repo's data/,
models/ and metrics/ are never touched. Never train on the BEIR folder: only --docs is trained on.
See docs/quality.md.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedpipe.core.io import FormatError, load_beir, read_json, read_jsonl, write_json  # noqa: E402
from embedpipe.core.params import ParamsError, validate  # noqa: E402
from embedpipe.documents.reading import DocumentsError, discover  # noqa: E402
from embedpipe.evaluation.significance import paired_bootstrap_ci, sign_flip_test  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from suite_report import HELD_OUT  # noqa: E402

METRICS = ("ndcg@10", "recall@10", "recall@100", "mrr@10")
SEEDED = ("sdg.seed", "prep.seed", "finetune.seed")
SEED_STAGES = ("sdg", "prep", "finetune", "eval")
DEFAULT_OUT = str(ROOT / "bench" / "results" / "quality.json")
STATE = "bench_quality_state.json"  # marks a workspace this script owns; records finished stages (resume)


class BenchError(click.ClickException):
    """Bad input or a failed stage: one clear message, exit 1."""


# --- params ------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b.c=value` -> ("a.b.c", YAML-parsed value), as `dvc exp run -S` reads it."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise BenchError(f"-S {text!r}: expected KEY=VALUE with a dotted key, e.g. -S finetune.max_steps=20")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise BenchError(f"-S {text!r}: value is not valid YAML ({e})") from None
    return key, value


def set_dotted(params: dict[str, Any], key: str, value: Any) -> None:
    """Set params[a][b][c] = value for key "a.b.c", creating absent sections (params.yaml lists only what users
    tune; the schema has the rest). The result is validated by the schema before anything runs (`check_params`)."""
    node: Any = params
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise BenchError(f"-S {key}: '{where}' is a value, not a section of the params file")
        node = child
    node[parts[-1]] = value


def check_params(params: dict[str, Any]) -> None:
    """Fail before the first stage on an unknown key or a bad value (the same check every stage makes)."""
    try:
        validate(params, "params with -S overrides")
    except ParamsError as e:
        raise BenchError(str(e)) from None


def get_dotted(params: dict[str, Any], key: str) -> Any:
    node: Any = params
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def seeded_params(params: dict[str, Any], offset: int) -> tuple[dict[str, Any], dict[str, int]]:
    """The params of seed `offset`: every SEEDED key moved by `offset` (offset 0 = the params as given)."""
    out = copy.deepcopy(params)
    values = {}
    for key in SEEDED:
        base = get_dotted(out, key)
        value = int(base if base is not None else 0) + offset
        set_dotted(out, key, value)
        values[key] = value
    return out, values


# --- inputs ------------------------------------------------------------------------------------------


def resolve_inputs(bench: str | None, docs: str | None, beir: str | None) -> tuple[Path, Path, str]:
    """Docs and BEIR folders from --bench (DIR/docs, DIR/beir) and/or --docs/--beir; checked, never guessed."""
    if not bench and not (docs and beir):
        raise BenchError("give --bench DIR (holding docs/ and beir/), or both --docs DIR and --beir DIR")
    if bench:
        root = Path(bench)
        if not root.is_dir():
            raise BenchError(f"--bench {root}: folder not found (build it: ../shared/bench/django-faq/build.py OUT)")
    docs_dir = Path(docs) if docs else Path(bench) / "docs"
    beir_dir = Path(beir) if beir else Path(bench) / "beir"
    name = Path(bench).resolve().name if bench else beir_dir.resolve().parent.name
    try:
        files, _ = discover(docs_dir)
    except DocumentsError as e:
        raise BenchError(f"documents folder {docs_dir}: {e}") from None
    if not files:
        raise BenchError(f"documents folder {docs_dir}: no readable document (.txt .md .rst .html .htm .pdf)")
    try:
        _, queries, qrels = load_beir(beir_dir)
    except FormatError as e:
        raise BenchError(f"BEIR folder: {e}") from None
    if not qrels:
        raise BenchError(f"BEIR folder {beir_dir}: qrels/test.tsv judges no query")
    return docs_dir.resolve(), beir_dir.resolve(), name


# --- running stages ----------------------------------------------------------------------------------


def fingerprint(inputs: list[Path]) -> str:
    """Cheap identity of the code and data a step depends on (contents of the code; names, sizes and mtimes of
    the data), so a resumed workspace never reuses a step made by other code or from other documents."""
    h = hashlib.sha256()
    for path in sorted([*ROOT.glob("stages/*.py"), *ROOT.glob("embedpipe/**/*.py")]):
        h.update(str(path.relative_to(ROOT)).encode() + path.read_bytes())
    for folder in inputs:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                st = path.stat()
                h.update(f"{path.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


class Runner:
    """Runs stage subprocesses in the workspace, logs each one, skips those finished in an earlier run."""

    def __init__(self, work: Path, env: dict[str, str], verbose: bool, plan: list[str], inputs: list[Path]) -> None:
        self.work, self.env, self.verbose, self.plan = work, env, verbose, plan
        self.fingerprint = fingerprint(inputs)
        self.state_path = work / STATE
        self.state: dict[str, Any] = read_json(self.state_path) if self.state_path.is_file() else {"done": {}}
        write_json(self.state_path, self.state)  # marks the workspace as ours from the start
        self.times: dict[str, list[float]] = {}
        self.finished = 0
        self.reused_s = 0.0  # wall time of steps reused from an earlier run (counted in the total)

    def run(
        self,
        step: str,
        label: str,
        stage: str,
        args: list[str],
        params_file: Path,
        outputs: Sequence[Path],
        force: bool = False,
    ) -> tuple[float, bool]:
        """Run `python stages/<stage>.py ARGS` -> (wall time, ran now). A step finished by an earlier run of this
        workspace with the same command and params is reused, unless `force` (an upstream step ran again)."""
        blob = json.dumps([stage, args, params_file.read_text(), self.fingerprint])
        key = hashlib.sha256(blob.encode()).hexdigest()[:16]
        done = self.state["done"].get(step)
        if not force and done and done["key"] == key and all(p.exists() for p in outputs):
            self.reused_s += float(done["wall_s"])
            self._progress(label, stage, done["wall_s"], reused=True)
            return float(done["wall_s"]), False
        log = self.work / "logs" / f"{step}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(ROOT / "stages" / f"{stage}.py"), "--params", str(params_file), *args]
        click.echo(f"[{dt.datetime.now():%H:%M:%S}] {label} ... (log: {log})", err=True)
        t0 = time.time()
        with log.open("w", encoding="utf-8") as f:
            f.write("$ " + " ".join(cmd) + "\n\n")
            f.flush()
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=self.env, stdout=None if self.verbose else f, stderr=subprocess.STDOUT
            )  # fmt: skip
            try:
                proc.wait()
            except BaseException:  # Ctrl-C / SIGTERM: stop the stage too, never leave it running alone
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
        wall = round(time.time() - t0, 2)  # as stored for reuse: a rerun must report the very same times
        if proc.returncode != 0:
            tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-25:])
            raise BenchError(
                f"{label} failed (exit {proc.returncode}) after {wall:.0f} s; last lines of {log}:\n{tail}\n"
                f"The workspace {self.work} is kept; rerun with --workdir {self.work} to resume."
            )
        self.state["done"][step] = {"key": key, "wall_s": wall}
        write_json(self.state_path, self.state)
        self._progress(label, stage, wall)
        return wall, True

    def _progress(self, label: str, stage: str, wall: float, reused: bool = False) -> None:
        """One line per step, with an ETA once every remaining kind of stage has been timed."""
        self.times.setdefault(stage, []).append(wall)
        self.finished += 1
        left = self.plan[self.finished :]
        eta = ""
        if left and not reused and all(s in self.times for s in left):
            eta = f", ETA {dt.timedelta(seconds=round(sum(statistics.fmean(self.times[s]) for s in left)))}"
        how = "reused from an earlier run" if reused else f"done in {wall:.0f} s"
        click.echo(
            f"[{dt.datetime.now():%H:%M:%S}] {label}: {how} ({self.finished}/{len(self.plan)} steps{eta})", err=True
        )


# --- analysis ----------------------------------------------------------------------------------------


def pct(new: float, old: float) -> float:
    return (new - old) / old * 100 if old else float("nan")


def read_per_query(path: Path, label: str, metric: str = "ndcg@10") -> dict[str, float]:
    return {row["query_id"]: round(float(row[label][metric]), 6) for row in read_jsonl(path)}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def analyse(base_block: dict[str, float], base_pq: dict[str, float], seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-seed and pooled gains and p-values from per-query nDCG@10."""
    qids = sorted(base_pq)
    base_vec = np.array([base_pq[q] for q in qids])
    ft_matrix = []
    for s in seeds:
        per_query = s["per_query_ndcg@10"]
        ft_vec = np.array([per_query[q] for q in qids])
        ft_matrix.append(ft_vec)
        test = sign_flip_test(ft_vec - base_vec)
        s.update(
            p_value=round(test.p_value, 5),
            queries_better=test.better,
            queries_worse=test.worse,
            queries_tied=test.tied,
        )
    pooled_diffs = np.mean(ft_matrix, axis=0) - base_vec
    pooled = sign_flip_test(pooled_diffs)
    # The mean over seeds of the per-seed relative gains is mean(pooled_diffs) / mean(base): its interval too.
    ci_low, ci_high = (100 * x / base_vec.mean() for x in paired_bootstrap_ci(pooled_diffs))
    gains = [s["gain_pct"] for s in seeds]
    worst = min(seeds, key=lambda s: s["gain_pct"])
    val = [s["val_gain_pct"] for s in seeds if s.get("val_gain_pct") is not None]
    return {
        "base": base_block,
        "mean_gain_pct": round(statistics.fmean(gains), 3),
        "gain_pct_std": round(statistics.stdev(gains), 3) if len(gains) > 1 else 0.0,
        "gain_pct_min": round(min(gains), 3),
        "gain_pct_max": round(max(gains), 3),
        "gain_pct_ci95": [round(ci_low, 3), round(ci_high, 3)],
        "worst_seed": worst["seed"],
        "worst_seed_gain_pct": round(worst["gain_pct"], 3),
        "seeds_below_base": sum(g < 0 for g in gains),
        "mean_finetuned_ndcg@10": round(statistics.fmean(s["finetuned_ndcg@10"] for s in seeds), 5),
        "p_value": round(pooled.p_value, 5),
        "p_value_exact": pooled.exact,
        "test": "paired two-sided sign-flip test on per-query nDCG@10 differences "
        "(fine-tuned averaged over seeds - base); exact up to 16 non-zero differences, else 100,000 random flips",
        "queries_better": pooled.better,
        "queries_worse": pooled.worse,
        "queries_tied": pooled.tied,
        "mean_val_gain_pct": round(statistics.fmean(val), 3) if val else None,
    }


# --- output ------------------------------------------------------------------------------------------


def fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def signed(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:+.{digits}f}%"


def markdown(result: dict[str, Any]) -> str:
    """The one table (plus a few lines of summary) a person reads."""
    lines = [
        f"# Quality benchmark: {result['benchmark']}",
        "",
        f"{result['queries']} human queries over {result['passages']} passages; trained on {result['docs_dir']}; "
        f"params overrides: {json.dumps(result['params']) if result['params'] else 'none (params.yaml as is)'}; "
        f"{len(result['seeds'])} seed(s); {result['date']}, commit {result['commit']}.",
        "",
        "| seed | model | nDCG@10 | Recall@10 | Recall@100 | MRR@10 | nDCG@10 gain | p (sign-flip) "
        "| better/worse/tied | val gain | saved |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    b = result["base"]
    lines.append(f"| - | base | {' | '.join(fmt(b[m]) for m in METRICS)} | | | | | |")
    for s in result["per_seed"]:
        f = s["finetuned"]
        lines.append(
            f"| {s['seed']} | fine-tuned | {' | '.join(fmt(f[m]) for m in METRICS)} | {signed(s['gain_pct'])} "
            f"| {fmt(s['p_value'], 3)} | {s['queries_better']}/{s['queries_worse']}/{s['queries_tied']} "
            f"| {signed(s['val_gain_pct'])} | {s['saved_model']} |"
        )
    lines.append(
        f"| **mean** | fine-tuned | {fmt(result['mean_finetuned_ndcg@10'])} | | | | "
        f"**{signed(result['mean_gain_pct'])}** ± {result['gain_pct_std']:.1f} | **{fmt(result['p_value'], 3)}** "
        f"| {result['queries_better']}/{result['queries_worse']}/{result['queries_tied']} "
        f"| {signed(result['mean_val_gain_pct'])} | |"
    )
    lines += [
        "",
        f"- Mean nDCG@10 gain {signed(result['mean_gain_pct'], 2)} (spread ± {result['gain_pct_std']:.2f} points "
        f"across seeds, range {signed(result['gain_pct_min'])} to {signed(result['gain_pct_max'])}); worst seed "
        f"{result['worst_seed']}: {signed(result['worst_seed_gain_pct'], 2)}; "
        f"{result['seeds_below_base']} seed(s) below base; 95% bootstrap interval over queries "
        f"{signed(result['gain_pct_ci95'][0], 2)} to {signed(result['gain_pct_ci95'][1], 2)}.",
        f"- Paired sign-flip test over queries (fine-tuned nDCG@10 averaged over seeds vs base): "
        f"p = {result['p_value']:.4f}{' (exact)' if result['p_value_exact'] else ''}.",
        "- val gain: the run's own validation (synthetic questions) gain in nDCG@10, next to the benchmark gain.",
        "",
        "| stage | " + " | ".join(f"seed {s['seed']}" for s in result["per_seed"]) + " |",
        "|---|" + "---:|" * len(result["per_seed"]),
    ]
    once = result["stage_times_s"]
    for stage in ("chunk", "eval_base"):
        lines.append(f"| {stage} (once) | {fmt(once[stage], 0)} s |" + " |" * (len(result["per_seed"]) - 1))
    for stage in SEED_STAGES:
        lines.append(
            f"| {stage} | " + " | ".join(f"{s['stage_times_s'][stage]:.0f} s" for s in result["per_seed"]) + " |"
        )
    lines += ["", f"Total wall time: {dt.timedelta(seconds=round(result['wall_time_s']))}.", ""]
    return "\n".join(lines)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


# --- main --------------------------------------------------------------------------------------------


def prepare_workdir(workdir: str | None) -> tuple[Path, bool]:
    """(workspace, resumed): a fresh temp folder, an empty/new --workdir, or one of ours to resume."""
    if not workdir:
        return Path(tempfile.mkdtemp(prefix="bench-quality-")), False
    work = Path(workdir).resolve()
    if work.exists() and any(work.iterdir()):
        if not (work / STATE).is_file():
            raise BenchError(f"--workdir {work}: not empty and not a bench_quality workspace; refusing to use it")
        return work, True
    work.mkdir(parents=True, exist_ok=True)
    return work, False


def run_all(
    work: Path,
    env: dict[str, str],
    verbose: bool,
    params: dict[str, Any],
    seeds: list[int],
    docs: Path,
    beir: Path,
    cache: Path,
) -> tuple[list[dict[str, Any]], dict[str, float], dict[str, float], dict[str, float], int | None, float]:
    """chunk and base eval once, then sdg -> prep -> finetune -> eval per seed; returns what the table needs."""
    runner = Runner(work, env, verbose, ["chunk", "eval"] + list(SEED_STAGES) * len(seeds), [docs, beir])
    # chunk and the base eval read the params as given (seed 0): they do not depend on the seed, so a later call
    # with other seeds reuses them
    unseeded = work / "params" / "unseeded.yaml"
    unseeded.parent.mkdir(parents=True, exist_ok=True)
    unseeded.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    params_files, seed_values = [], []
    for k in seeds:
        p, values = seeded_params(params, k)
        path = work / "params" / f"seed{k}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(p, sort_keys=False), encoding="utf-8")
        params_files.append(path)
        seed_values.append(values)

    chunks, base_dir = work / "chunks", work / "eval_base"
    corpus = chunks / "corpus.jsonl"
    chunk_s, chunk_ran = runner.run(
        "chunk", "chunk", "chunk",
        ["--docs-dir", str(docs), "--out", str(chunks), "--metrics", str(work / "metrics" / "chunk.json")],
        unseeded, [corpus],
    )  # fmt: skip
    base_s, _ = runner.run(
        "eval_base", "base model eval", "eval",
        ["--beir-dir", str(beir), "--models-only", "base", "--out-dir", str(base_dir),
         "--metrics", str(base_dir / "eval.json")],
        unseeded, [base_dir / "per_query.jsonl", base_dir / "eval.json"],
    )  # fmt: skip
    base_eval = read_json(base_dir / "eval.json")
    base_block = base_eval["base"]
    base_pq = read_per_query(base_dir / "per_query.jsonl", "base")
    click.echo(f"base model: nDCG@10 {base_block['ndcg@10']:.4f} on {len(base_pq)} queries", err=True)

    per_seed = []
    for i, k in enumerate(seeds):
        d, pf, m = work / f"seed{k}", params_files[i], work / f"seed{k}" / "metrics"
        steps = {
            "sdg": (["--corpus", str(corpus), "--out", str(d / "sdg"), "--metrics", str(m / "sdg.json"),
                     "--cache-dir", str(cache / "llm")], [d / "sdg" / "qa.jsonl", m / "sdg.json"]),
            "prep": (["--corpus", str(corpus), "--qa", str(d / "sdg" / "qa.jsonl"), "--out", str(d / "prep"),
                      "--metrics", str(m / "prep.json")], [d / "prep" / "train.jsonl"]),
            "finetune": (["--prep-dir", str(d / "prep"), "--out", str(d / "model"), "--metrics", str(m / "train.json"),
                          "--live-dir", str(d / "dvclive"), "--checkpoint-dir", str(d / "checkpoints")],
                         [d / "model" / "config.json", m / "train.json"]),
            "eval": (["--beir-dir", str(beir), "--models-only", "finetuned", "--finetuned", str(d / "model"),
                      "--out-dir", str(d / "eval"), "--metrics", str(m / "eval.json")],
                     [d / "eval" / "per_query.jsonl", m / "eval.json"]),
        }  # fmt: skip
        times, force = {}, chunk_ran
        for stage, (args, outputs) in steps.items():
            times[stage], ran = runner.run(
                f"seed{k}-{stage}", f"seed {k} ({i + 1}/{len(seeds)}) {stage}", stage, args, pf, outputs, force
            )
            force = force or ran
        ft = read_json(m / "eval.json")["finetuned"]
        train = read_json(m / "train.json")
        sdg_m = read_json(m / "sdg.json")
        val_base, val_ft = train.get("val_ndcg@10_base"), train.get("val_ndcg@10_finetuned")
        row = {
            "seed": k,
            "seed_values": seed_values[i],
            "base_ndcg@10": base_block["ndcg@10"],
            "finetuned_ndcg@10": ft["ndcg@10"],
            "gain_pct": round(pct(ft["ndcg@10"], base_block["ndcg@10"]), 3),
            "finetuned": {metric: ft[metric] for metric in METRICS},
            "val_ndcg@10_base": val_base,
            "val_ndcg@10_finetuned": val_ft,
            "val_gain_pct": round(pct(val_ft, val_base), 3) if val_base and val_ft is not None else None,
            "saved_model": train.get("saved_model"),
            "train_examples": train.get("examples"),
            "steps": train.get("steps"),
            "steps_planned": train.get("steps_planned"),
            "bf16": bool(train.get("bf16")) or bool((read_json(m / "prep.json").get("teacher") or {}).get("bf16")),
            "sdg_accepted": sdg_m.get("accepted"),
            "sdg_accepted_llm": sdg_m.get("accepted_llm"),
            "stage_times_s": {s: round(t, 1) for s, t in times.items()},
            # what bench/compare_quality.py pairs two configurations on: the inputs (same hash = same LLM
            # questions / training set) and every query's score
            "inputs_sha256": {"qa": file_sha256(d / "sdg" / "qa.jsonl"), "train": file_sha256(d / "prep" / "train.jsonl")},
            "per_query_ndcg@10": read_per_query(d / "eval" / "per_query.jsonl", "finetuned"),
        }
        per_seed.append(row)
        click.echo(
            f"seed {k}: nDCG@10 {base_block['ndcg@10']:.4f} -> {ft['ndcg@10']:.4f} ({signed(row['gain_pct'])}), "
            f"validation {signed(row['val_gain_pct'])}",
            err=True,
        )
    once = {"chunk": chunk_s, "eval_base": base_s}
    return per_seed, base_block, base_pq, once, base_eval.get("passages"), runner.reused_s


# --- the five-domain suite ----------------------------------------------------------------------------


def suite_domains(suite: Path) -> list[tuple[str, Path, Path]]:
    """(name, docs, beir) of every built benchmark under `suite` (a sub-folder with docs/ and beir/), by name."""
    if not suite.is_dir():
        raise BenchError(f"--suite {suite}: folder not found (build one: make bench-suite-data SUITE={suite})")
    found = []
    for sub in sorted(p for p in suite.iterdir() if p.is_dir()):
        if (sub / "docs").is_dir() and (sub / "beir").is_dir():
            docs, beir, name = resolve_inputs(str(sub), None, None)
            found.append((name, docs, beir))
    if not found:
        raise BenchError(f"--suite {suite}: no sub-folder holds docs/ and beir/ (see bench/README or docs/quality.md)")
    return found


def mpnet_zero_shot(work: Path, env: dict[str, str], verbose: bool, params: dict[str, Any], beir: Path,
                    docs: Path) -> dict[str, float]:
    """all-mpnet-base-v2's per-query nDCG@10 on `beir`, zero-shot (fp32; once per domain, reused from the state)."""
    runner = Runner(work, env, verbose, ["eval"], [docs, beir])
    p = copy.deepcopy(params)
    set_dotted(p, "model.base_model", "all-mpnet-base-v2")
    path = work / "params" / "mpnet.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(p, sort_keys=False), encoding="utf-8")
    out = work / "eval_mpnet"
    runner.run("eval_mpnet", "all-mpnet-base-v2 zero-shot eval", "eval",
               ["--beir-dir", str(beir), "--models-only", "base", "--out-dir", str(out),
                "--metrics", str(out / "eval.json")], path, [out / "per_query.jsonl"])  # fmt: skip
    return read_per_query(out / "per_query.jsonl", "base")


def cpu_name() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import cpu_description

    return cpu_description()



def run_suite(
    suite: Path, seeds: list[int], params: dict[str, Any], applied: dict[str, Any], work: Path, cache: Path,
    env: dict[str, str], verbose: bool, held_out: tuple[str, ...], mpnet: bool, out: Path,
) -> dict[str, Any]:
    """Every domain's pipeline, seed by seed (all domains of seed 0 first, so a stopped run still has a complete
    seed), then mpnet zero-shot per domain; writes `out` (.json and .md) after each finished seed."""
    from suite_report import DomainRun, suite_result
    from suite_report import markdown as suite_markdown

    domains = suite_domains(suite)
    runs = {name: DomainRun(name, {}, {}) for name, _, _ in domains}
    bf16 = False
    started = time.time()

    def write(done: list[int]) -> dict[str, Any]:
        result = {
            **suite_result(list(runs.values()), held_out),
            "complete": done == seeds and (not mpnet or all(r.mpnet for r in runs.values())),
            "cpu": cpu_name(), "bf16": bf16, "overrides": applied, "commit": git_commit(),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_time_s": round(time.time() - started, 1), "suite_dir": str(suite),
            "command": " ".join(["python", "bench/bench_quality.py", *sys.argv[1:]]),
            "base_per_query_ndcg@10": {r.name: r.base for r in runs.values()},
            "finetuned_per_query_ndcg@10": {r.name: {str(s): v for s, v in r.finetuned.items()} for r in runs.values()},
        }  # fmt: skip
        write_json(out, result)
        out.with_suffix(".md").write_text(suite_markdown(result), encoding="utf-8")
        return result

    result: dict[str, Any] = {}
    for i, k in enumerate(seeds):
        for j, (name, docs, beir) in enumerate(domains):
            click.echo(f"== suite: seed {k} ({i + 1}/{len(seeds)}), {name} ({j + 1}/{len(domains)})", err=True)
            per_seed, _, base_pq, *_ = run_all(work / name, env, verbose, params, [k], docs, beir, cache)
            row, run = per_seed[0], runs[name]
            run.base = base_pq
            run.finetuned[k] = row["per_query_ndcg@10"]
            run.steps_taken[k], run.steps_planned[k] = row["steps"], row["steps_planned"]
            bf16 = bf16 or row["bf16"]
        result = write(seeds[: i + 1])
        click.echo(f"suite after seed {k}: pooled {result['mean_gain_pct']:+.2f}% (p {result['p_value']:.4f})", err=True)
    if mpnet:
        for name, docs, beir in domains:
            runs[name].mpnet = mpnet_zero_shot(work / name, env, verbose, params, beir, docs)
        result = write(seeds)
    return result


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bench", "bench_dir", default=None, metavar="DIR", help="Built benchmark: DIR/docs and DIR/beir.")
@click.option(
    "--suite", "suite_dir", default=None, metavar="DIR",
    help="Every built benchmark under DIR (one per sub-folder), a model per domain; writes bench/results/suite.json.",
)
@click.option(
    "--held-out", default=",".join(HELD_OUT), show_default=True, metavar="NAMES",
    help="--suite: comma-separated domains reported as the held-out split (confirm there; never tune there).",
)
@click.option("--mpnet/--no-mpnet", default=True, show_default=True,
              help="--suite: also score all-mpnet-base-v2 zero-shot per domain (the bar for a 22M model).")
@click.option("--docs", "docs_dir", default=None, metavar="DIR", help="Documents to train on [default: BENCH/docs].")
@click.option(
    "--beir", "beir_dir", default=None, metavar="DIR", help="Human-labeled BEIR folder [default: BENCH/beir]."
)
@click.option("--seeds", type=click.IntRange(1, 100), default=3, show_default=True, help="Number of seeds.")
@click.option(
    "--first-seed", type=click.IntRange(0), default=0, show_default=True,
    help="Seeds FIRST..FIRST+N-1 (e.g. 3 to replicate a 3-seed result on fresh seeds).",
)  # fmt: skip
@click.option(
    "-S", "--set-param", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Params override, repeatable, e.g. -S finetune.cpu.epochs=2 (dotted key, YAML value).",
)  # fmt: skip
@click.option("--params", "params_path", default=str(ROOT / "params.yaml"), show_default=True, help="Params file.")
@click.option("--workdir", default=None, metavar="DIR", help="Scratch workspace [default: a new temp folder].")
@click.option(
    "--cache",
    "cache_dir",
    default=None,
    metavar="DIR",
    help="Embedding store + LLM request cache shared by all seeds [default: WORKDIR/cache].",
)
@click.option("--keep", is_flag=True, help="Keep the workspace (stage outputs, logs, models) after a successful run.")
@click.option(
    "--out",
    "out_path",
    default=DEFAULT_OUT,
    show_default=True,
    help="Result JSON; the Markdown table goes next to it (.md) [--suite: bench/results/suite.json].",
)
@click.option("--name", default=None, help="Benchmark name in the result [default: the --bench folder's name].")
@click.option("--verbose", is_flag=True, help="Show the stages' own output instead of only logging it.")
def main(
    bench_dir: str | None,
    suite_dir: str | None,
    held_out: str,
    mpnet: bool,
    docs_dir: str | None,
    beir_dir: str | None,
    seeds: int,
    first_seed: int,
    overrides: tuple[str, ...],
    params_path: str,
    workdir: str | None,
    cache_dir: str | None,
    keep: bool,
    out_path: str,
    name: str | None,
    verbose: bool,
) -> None:
    """Fine-tune on real documents for several seeds and compare with the base model on human queries."""
    started = time.time()
    if suite_dir and (bench_dir or docs_dir or beir_dir):
        raise BenchError("--suite runs every benchmark under its folder: give it without --bench/--docs/--beir")
    if not suite_dir:
        docs, beir, bench_name = resolve_inputs(bench_dir, docs_dir, beir_dir)
    try:
        params = yaml.safe_load(Path(params_path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise BenchError(f"--params {params_path}: {e}") from None
    if not isinstance(params, dict):
        raise BenchError(f"--params {params_path}: expected a mapping at the top level")
    applied: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(params, key, value)
        applied[key] = value
    check_params(params)

    seed_list = list(range(first_seed, first_seed + seeds))
    work, resumed = prepare_workdir(workdir)
    cache = Path(cache_dir).resolve() if cache_dir else work / "cache"
    models_dir = get_dotted(params, "sdg.llm.models_dir")
    if models_dir and not Path(models_dir).is_absolute():  # reuse the repo's assembled GGUF, as `make run` does
        set_dotted(params, "sdg.llm.models_dir", str(ROOT / models_dir))
    if get_dotted(params, "eval.user_questions"):  # the repo's example questions are about data/sample_docs; the
        set_dotted(params, "eval.user_questions", "")  # bench's own questions are its BEIR folder
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
        EMBEDPIPE_EMBED_CACHE=str(cache / "embeddings"),
        TOKENIZERS_PARALLELISM="false",
        DVC_NO_ANALYTICS="1",
    )
    env.setdefault("HF_HUB_OFFLINE", "1")
    signal.signal(signal.SIGTERM, _interrupt)  # a killed bench stops its running stage and keeps the workspace
    if suite_dir:
        out = Path(out_path) if out_path != DEFAULT_OUT else ROOT / "bench" / "results" / "suite.json"
        click.echo(f"bench-quality --suite {suite_dir}: seeds {seed_list}; workspace {work}"
                   f"{' (resuming)' if resumed else ''}", err=True)
        try:
            result = run_suite(Path(suite_dir).resolve(), seed_list, params, applied, work, cache, env, verbose,
                               tuple(n.strip() for n in held_out.split(",") if n.strip()), mpnet, out)
        except KeyboardInterrupt:
            raise BenchError(f"interrupted; the workspace {work} is kept: rerun with --workdir {work}") from None
        click.echo(out.with_suffix(".md").read_text(encoding="utf-8"))
        click.echo(f"wrote {out} and {out.with_suffix('.md')}; pooled {result['mean_gain_pct']:+.2f}%", err=True)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        return
    click.echo(
        f"bench-quality: {bench_name}: train on {docs}, evaluate on {beir}; seeds {seed_list[0]}..{seed_list[-1]}; "
        f"workspace {work}{' (resuming)' if resumed else ''}",
        err=True,
    )

    try:
        per_seed, base_block, base_pq, once, corpus_n, reused_s = run_all(
            work, env, verbose, params, seed_list, docs, beir, cache
        )
    except KeyboardInterrupt:
        raise BenchError(f"interrupted; the workspace {work} is kept: rerun with --workdir {work} to resume") from None

    stats = analyse({metric: base_block[metric] for metric in METRICS}, base_pq, per_seed)
    wall = time.time() - started + reused_s  # steps reused from an earlier run count with their original time
    result = {
        "benchmark": name or bench_name,
        "docs_dir": str(docs),
        "beir_dir": str(beir),
        "queries": len(base_pq),
        "passages": corpus_n,
        "seeds": seed_list,
        "params": applied,
        "params_file": str(params_path),
        **stats,
        "base_per_query_ndcg@10": base_pq,
        "per_seed": per_seed,
        "stage_times_s": {
            **{s: round(t, 1) for s, t in once.items()},
            **{s: [r["stage_times_s"][s] for r in per_seed] for s in SEED_STAGES},
        },
        "wall_time_s": round(wall, 1),
        "command": " ".join(["python", "bench/bench_quality.py", *sys.argv[1:]]),
        "commit": git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    out = Path(out_path)
    write_json(out, result)
    table = markdown(result)
    out.with_suffix(".md").write_text(table, encoding="utf-8")
    click.echo(table)
    click.echo(f"wrote {out} and {out.with_suffix('.md')}", err=True)
    if keep:
        click.echo(f"workspace kept: {work}", err=True)
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
