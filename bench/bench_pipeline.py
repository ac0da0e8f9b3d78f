"""The whole pipeline, timed stage by stage, with encodes per passage per model (issue 12's targets).

Runs the real pipeline (`dvc repro -s STAGE`, one stage at a time, in dvc.yaml's order) in a scratch copy
of this repository's tracked files, on `--docs DIR` (copied in as `chunk.docs_dir`) or on the sample
corpus, with a fresh embedding store and LLM cache, and writes bench/results/pipeline.json:
`passages`, per-stage `wall_time_s` (the stage's metrics JSON `wall_time_s` when it has one, else the time
around `dvc repro -s`), `total_wall_time_s`, and `encodes_per_passage` per model (from the embedding
store's encode log: passage texts really encoded / corpus passages). Targets: a 5-15k-passage doc set
through the default pipeline in <= 45 min on 2 cores with <= 2 encodes per passage per model; the sample
corpus in <= 10 min.

    python bench/bench_pipeline.py --docs /work/django-faq/docs                 # the real run (~1 h on 2 cores)
    python bench/bench_pipeline.py --docs tests/data/tiny_docs -S sdg.llm.enabled=false \\
        -S finetune.cpu.max_steps=2 --out /tmp/pipeline-smoke.json               # smoke run
    python bench/bench_pipeline.py --fp32     # the sample corpus as an fp32-only CPU runs it (EMBEDPIPE_BF16=off)
                                              # -> bench/results/pipeline-sample-fp32.json

`--fp32` runs every stage with `EMBEDPIPE_BF16=off`, so each `bf16: auto` takes the fp32 path even on a CPU with
AVX-512 BF16 / AMX: what most users' CPUs run. The result records `bf16` (whether the stages could use native
bfloat16) and `cpu`.

Encodes the log cannot see (they do not go through the store): ONNX variants in export's parity check,
the server's own encodes in deploy_check, and any stage not yet wired to the store (listed under
`encode_log_stages`, so a missing stage shows).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedpipe.core.embed_store import STORE_ENV, read_encode_log  # noqa: E402
from embedpipe.core.models import BF16_SWITCH, cpu_has_bf16  # noqa: E402

TARGET_DOCS_S = 45 * 60  # a 5-15k-passage doc set, default params, 2 cores
TARGET_SAMPLE_S = 10 * 60  # the sample corpus
TARGET_ENCODES = 2.0


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], YAML-parsed value), as `dvc exp run -S` takes them."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise SystemExit(f"-S {text!r}: expected key=value, e.g. -S sdg.llm.enabled=false")
    return key.strip().split("."), yaml.safe_load(value)


def apply_overrides(params: dict[str, Any], overrides: list[str]) -> None:
    for text in overrides:
        path, value = parse_override(text)
        node = params
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                raise SystemExit(f"-S {text}: params.yaml has no section '{part}' there")
            node = node[part]
        if path[-1] not in node:
            print(f"warning: -S {text}: '{'.'.join(path)}' is not in params.yaml; added", file=sys.stderr)
        node[path[-1]] = value


def scratch_copy(dest: Path, docs: Path | None, overrides: list[str]) -> dict[str, Any]:
    """The repository's tracked files (what a fresh clone has) in `dest`, as a git repo; returns the params."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    for rel in filter(None, files.stdout.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "dvc.lock").unlink(missing_ok=True)  # every stage runs
    params = yaml.safe_load((dest / "params.yaml").read_text())
    if docs is not None:
        shutil.copytree(docs, dest / "bench_docs", symlinks=False)
        params["chunk"]["docs_dir"] = "bench_docs"
    apply_overrides(params, overrides)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.email=bench@localhost", "-c", "user.name=bench",
                                                 "commit", "-qm", "bench"]):
        subprocess.run(["git", *args], cwd=dest, check=True, capture_output=True)
    return params


def stage_metrics(dvc_yaml: dict[str, Any]) -> dict[str, list[str]]:
    """stage -> its metrics files, from dvc.yaml."""
    out: dict[str, list[str]] = {}
    for stage, spec in dvc_yaml["stages"].items():
        out[stage] = [next(iter(m)) if isinstance(m, dict) else m for m in spec.get("metrics", [])]
    return out


def encode_summary(log: list[dict[str, Any]], passages: int, roles: dict[str, str]) -> dict[str, Any]:
    """Encodes per passage per model role (base, finetuned, others by label), with a per-stage breakdown."""
    per_role: dict[str, dict[str, Any]] = {}
    for r in log:
        role = roles.get(r["model"], r["model"])
        entry = per_role.setdefault(role, {"label": r["model"], "fingerprints": set(), "passages_encoded": 0,
                                           "queries_encoded": 0, "other_encoded": 0, "requested": 0, "by_stage": {}})
        entry["fingerprints"].add(r["fingerprint"])
        entry.setdefault("backends", set()).add(r.get("backend") or "torch")
        field = {"passage": "passages_encoded", "query": "queries_encoded"}.get(r.get("kind"), "other_encoded")
        entry[field] += r["encoded"]
        entry["requested"] += r["requested"]
        stage = entry["by_stage"].setdefault(r["stage"], {"passages_encoded": 0, "queries_encoded": 0,
                                                          "other_encoded": 0, "requested": 0})
        stage[field] += r["encoded"]
        stage["requested"] += r["requested"]
    for entry in per_role.values():
        entry["fingerprints"] = sorted(entry["fingerprints"])
        entry["backends"] = sorted(entry.get("backends", ()))
        entry["encodes_per_passage"] = round(entry["passages_encoded"] / passages, 3) if passages else None
    return per_role


def cpu_name() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import cpu_description

    return cpu_description()



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, `--out` resolved: pipeline.json, or pipeline-sample-fp32.json / pipeline-fp32.json with --fp32."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=Path, default=None, help="documents folder (default: params' chunk.docs_dir)")
    ap.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="params.yaml override, repeatable (e.g. -S sdg.llm.enabled=false)")
    ap.add_argument("--fp32", action="store_true",
                    help=f"run every stage with {BF16_SWITCH}=off (the fp32 path an fp32-only CPU takes)")
    ap.add_argument("--out", type=Path, default=None,
                    help="result file (default bench/results/pipeline.json; with --fp32 pipeline-sample-fp32.json, "
                         "or pipeline-fp32.json with --docs)")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy (its path is printed)")
    args = ap.parse_args(argv)
    if args.docs is not None and not args.docs.is_dir():
        raise SystemExit(f"--docs {args.docs}: not a folder")
    if args.out is None:
        name = ("pipeline-fp32.json" if args.docs else "pipeline-sample-fp32.json") if args.fp32 else "pipeline.json"
        args.out = ROOT / "bench" / "results" / name
    return args


def stage_environment(work: Path, store: Path, fp32: bool) -> dict[str, str]:
    """The stages' environment: the scratch copy on PYTHONPATH, its own embedding store, offline; bf16 off with fp32."""
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ, PYTHONPATH=str(work), HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"),
               DVC_NO_ANALYTICS="1", TOKENIZERS_PARALLELISM="false", PATH=bindir + os.pathsep + os.environ["PATH"],
               **{STORE_ENV: str(store)})
    if fp32:
        env[BF16_SWITCH] = "off"
    return env


def main() -> None:
    args = parse_args()
    if args.fp32:
        os.environ[BF16_SWITCH] = "off"  # the result's `bf16` then says what the stages saw

    work = args.workdir or Path(tempfile.mkdtemp(prefix="embedpipe-bench-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise SystemExit(f"--workdir {work}: not empty (the benchmark needs a fresh copy)")
    params = scratch_copy(work, args.docs.resolve() if args.docs else None, args.overrides)
    dvc_yaml = yaml.safe_load((work / "dvc.yaml").read_text())
    metrics_of = stage_metrics(dvc_yaml)
    store = work / "cache" / "embeddings"
    env = stage_environment(work, store, args.fp32)
    dvc = shutil.which("dvc", path=env["PATH"]) or "dvc"
    print(f"bench_pipeline: scratch copy in {work}", file=sys.stderr, flush=True)

    stages: dict[str, dict[str, Any]] = {}
    failed = None
    started = time.time()
    for stage in dvc_yaml["stages"]:
        print(f"== {stage} ({dt.datetime.now():%H:%M:%S})", file=sys.stderr, flush=True)
        t0 = time.time()
        rc = subprocess.run([dvc, "repro", "-s", stage], cwd=work, env=env).returncode
        timed = time.time() - t0
        entry: dict[str, Any] = {"timed_s": round(timed, 2), "wall_time_s": round(timed, 2), "source": "timed"}
        for rel in metrics_of.get(stage, []):
            path = work / rel
            data = json.loads(path.read_text()) if path.is_file() else {}
            if isinstance(data, dict) and isinstance(data.get("wall_time_s"), int | float):
                entry.update(wall_time_s=round(float(data["wall_time_s"]), 2), source=rel)
        stages[stage] = entry
        print(f"== {stage}: {timed:.1f} s", file=sys.stderr, flush=True)
        if rc != 0:
            failed = stage
            break
    total = time.time() - started

    corpus = work / "data" / "chunks" / "corpus.jsonl"
    passages = sum(1 for line in corpus.open(encoding="utf-8") if line.strip()) if corpus.is_file() else 0
    roles = {str(params["model"]["base_model"]): "base", "models/finetuned": "finetuned",
             str(params.get("export", {}).get("input", "models/finetuned")): "finetuned"}
    log = read_encode_log(store)
    models = encode_summary(log, passages, roles)
    worst = max((m["encodes_per_passage"] or 0 for m in models.values()), default=0.0)
    target_s = TARGET_DOCS_S if args.docs is not None else TARGET_SAMPLE_S
    result = {
        "bench": "pipeline",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "gpu": bool(shutil.which("nvidia-smi"))},
        "cpu": cpu_name(),
        "bf16": cpu_has_bf16(),  # False with --fp32: every `bf16: auto` took the fp32 path
        "fp32_mode": args.fp32,
        "docs": str(args.docs) if args.docs else str(params["chunk"]["docs_dir"]),
        "overrides": args.overrides,
        "passages": passages,
        "stages": stages,
        "total_wall_time_s": round(total, 2),
        "encodes_per_passage": {role: m["encodes_per_passage"] for role, m in models.items()},
        "encodes": models,
        "encode_log_stages": sorted({r["stage"] for r in log}),
        # Stages that ran without a line in the log: fine for chunk/report; an encoding stage listed here
        # encodes outside the store, and its encodes are missing from encodes_per_passage.
        "stages_not_in_encode_log": [s for s in stages if s not in {r["stage"] for r in log}],
        "targets": {"total_wall_time_s_max": target_s, "encodes_per_passage_max": TARGET_ENCODES},
        "within_targets": failed is None and total <= target_s and worst <= TARGET_ENCODES,
        "failed_stage": failed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\npipeline on {result['docs']}: {passages} passages, {total / 60:.1f} min"
          f" (target {target_s / 60:.0f} min){'' if failed is None else f', FAILED at {failed}'}")
    for stage, entry in stages.items():
        print(f"  {stage:<13} {entry['wall_time_s']:>8.1f} s  ({entry['source']})")
    for role, m in models.items():
        print(f"  encodes per passage, {role}: {m['encodes_per_passage']} "
              f"({m['passages_encoded']} passage + {m['queries_encoded']} query texts encoded)")
    print(f"written to {args.out}")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    elif args.keep:
        print(f"scratch copy kept in {work}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
