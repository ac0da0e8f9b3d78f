"""Benchmark the embeddings server: ONNX fp32, ONNX int8 and torch backends, against in-process encoding.

    python bench/bench_serve.py [--model all-MiniLM-L6-v2] [--requests 96] [--concurrency 1,8,32]
    python bench/bench_serve.py --compare-variants --beir-dir DIR [--max-passages 1500] [--out bench/results/serve.json]

`--compare-variants`: build every CPU ONNX variant the export stage builds (fp32, fp32_opt, int8, int8_block), check each
plus `torch_bf16` (torch under bfloat16 autocast, the server's `--torch-dtype bfloat16`),
against torch on a real BEIR test set (cosine, metric drift @5+), serve each one that is within tolerance
and the torch backend, and record the fastest within tolerance with its throughput ratio vs the torch server
at concurrency 8 and its HTTP overhead vs in-process.

Each request carries one passage (the serving case) and asks for base64, as the openai client does.
In-process reference at concurrency c: the same passages encoded in batches of c, one batch after
another (what the server's micro-batcher can at best do).
Goals: int8 server >= 2x torch server throughput; HTTP overhead <= 20% vs in-process at c=8.
`--infinity PATH` (with --compare-variants): also serve the same model with Infinity (`infinity-emb`, torch
engine, CPU; PATH = its `infinity_emb` executable, installed in its own venv by bench/setup_infinity.sh) under
the same traffic, check its vectors against ours and report our default's throughput relative to it.
Client and server share this machine's cores, so absolute numbers are lower than on a dedicated host.

    python bench/bench_serve.py --abuse [--requests 96] [--abuse-concurrency 8] [--huge-inputs 512]

Abuse scenario (issue 11, `abuse_scenario`): the same single-passage traffic, once alone and once while one
huge request (512 inputs of 16,000 characters, just under the 8 MB payload limit) is being served; reports the
normal requests' p50/p99 in both. Goal: the huge request raises the others' p99 by <= 2x.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402

from embedpipe.core.encoders import OnnxEncoder, TorchEncoder  # noqa: E402
from embedpipe.core.io import load_beir, load_corpus, passage_text  # noqa: E402
from embedpipe.core.models import encode, load_model, resolve_model  # noqa: E402
from embedpipe.core.processes import ChildServer, free_port  # noqa: E402
from embedpipe.core.retrieval import retrieve  # noqa: E402
from embedpipe.evaluation.metrics import evaluate  # noqa: E402
from embedpipe.serving.endpoint import EmbeddingEndpoint  # noqa: E402
from embedpipe.serving.export import (  # noqa: E402
    build_int8,
    cosine_parity,
    export_onnx,
    metric_drift,
    model_prompts,
    optimize_fp32,
    quantize_int8_blockwise,
)
from embedpipe.serving.server import ServerProcess  # noqa: E402


def load_texts(n: int) -> list[str]:
    path = ROOT / "data" / "chunks" / "corpus.jsonl"
    path = path if path.is_file() else ROOT / "tests" / "data" / "tiny_corpus.jsonl"
    texts = [passage_text(r) for r in load_corpus(path).values()]
    return [texts[i % len(texts)] for i in range(n)]


def drive_server(base_url: str, texts: list[str], concurrency: int) -> tuple[float, list[float]]:
    """Send every text as its own request from `concurrency` workers; (seconds, latencies)."""
    clients = [httpx.Client(timeout=120) for _ in range(concurrency)]
    latencies: list[float] = []

    def worker(k: int) -> None:
        for text in texts[k::concurrency]:
            start = time.perf_counter()
            body = {"input": text, "model": "bench", "encoding_format": "base64"}
            r = clients[k].post(f"{base_url}/embeddings", json=body)
            r.raise_for_status()
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    seconds = time.perf_counter() - start
    for c in clients:
        c.close()
    return seconds, latencies


def drive_workers(encoder, texts: list[str], concurrency: int) -> float:
    """A ProcessEncoder with several model workers, fed without HTTP: `concurrency` texts at a time, split evenly
    over the workers (the batches a perfect server would form); seconds."""
    workers = encoder.workers
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for i in range(0, len(texts), concurrency):
            group = texts[i : i + concurrency]
            size = -(-len(group) // workers)
            list(pool.map(encoder.encode, [group[k : k + size] for k in range(0, len(group), size)]))
    return time.perf_counter() - start


def mode_spec(model: str, folder: Path, flags: list[str]):
    """The torch_bf16 server's model setup under a server mode's flags (--model-workers, --[no-]torch-compile; the
    rest from params.yaml `serve:`, `auto` resolved as the server does): (EncoderSpec, workers)."""
    from embedpipe.core.encoders import EncoderSpec, serving_plan, worker_spec
    from embedpipe.core.params import load_params

    cfg = load_params(str(ROOT / "params.yaml"))["serve"]
    workers = int(flags[flags.index("--model-workers") + 1]) if "--model-workers" in flags else cfg["model_workers"]
    compile_ = True if "--torch-compile" in flags else False if "--no-torch-compile" in flags else cfg["torch_compile"]
    spec = EncoderSpec(backend="torch", folder=str(folder), torch_model=model, bf16=True, device="cpu")
    workers, compile_ = serving_plan(spec, workers, compile_, True)
    return worker_spec(spec, workers, compile_), workers


def drive_in_process(fn, texts: list[str], concurrency: int) -> tuple[float, list[float]]:
    latencies = []
    start = time.perf_counter()
    for i in range(0, len(texts), concurrency):
        t = time.perf_counter()
        fn(texts[i : i + concurrency])
        latencies.extend([time.perf_counter() - t] * len(texts[i : i + concurrency]))
    return time.perf_counter() - start, latencies


@click.command()
@click.option("--model", default="all-MiniLM-L6-v2", show_default=True, help="Model to export and serve.")
@click.option("--requests", "n_requests", default=96, show_default=True, help="Requests per measurement.")
@click.option("--concurrency", default="1,8,32", show_default=True, help="Client concurrency levels.")
@click.option("--backends", default="onnx fp32,onnx int8,torch", show_default=True, help="Which to run.")
@click.option("--abuse", is_flag=True, help="Run only the abuse scenario (one huge request + normal traffic).")
@click.option("--abuse-concurrency", default=8, show_default=True, help="Abuse scenario: normal clients.")
@click.option("--huge-inputs", default=512, show_default=True, help="Abuse scenario: inputs in the huge request.")
@click.option("--huge-chars", default=16_000, show_default=True, help="Abuse scenario: characters per huge input.")
@click.option("--compare-variants", is_flag=True, help="Quality + speed of every ONNX variant on a BEIR set.")
@click.option("--beir-dir", default="data/prep/eval", show_default=True, help="--compare-variants: test set.")
@click.option("--max-passages", default=1500, show_default=True,
              help="--compare-variants: every relevant passage + this many others (0 = all).")
@click.option("--variants", default="fp32,fp32_opt,int8,int8_block,torch_bf16", show_default=True,
              help="--compare-variants: which variants (fp32 always; torch_bf16 = torch under bf16 autocast).")
@click.option("--tolerance", default=0.01, show_default=True, help="Largest metric drift @5+ allowed.")
@click.option("--max-batch-tokens", "batch_tokens", type=int, default=None,
              help="--compare-variants / --abuse: the server's tokens per model call (default: params.yaml serve).")
@click.option("--out", "out_path", default="bench/results/serve.json", show_default=True,
              help="--compare-variants: result JSON.")
@click.option("--infinity", "infinity_bin", default=None, type=click.Path(exists=True, dir_okay=False),
              help="--compare-variants: the `infinity_emb` executable (bench/setup_infinity.sh installs one) to "
                   "serve the same model under the same traffic, side by side.")
@click.option("--also-model-in-server-process", "in_server_too", is_flag=True,
              help="--compare-variants: also serve each variant with the model in the server's own process "
                   "(`serve --no-model-process`), side by side with the default child process.")
@click.option("--server-mode", "server_modes", multiple=True, metavar="NAME=FLAGS",
              help="--compare-variants: also serve each candidate variant with these extra `stages/serve.py` flags, "
                   "side by side (repeatable), e.g. 'workers2=--model-workers 2'. The torch baseline runs as is.")
def main(model: str, n_requests: int, concurrency: str, backends: str, abuse: bool, abuse_concurrency: int,
         huge_inputs: int, huge_chars: int, compare_variants: bool, beir_dir: str, max_passages: int, variants: str,
         tolerance: float, batch_tokens: int | None, out_path: str, infinity_bin: str | None,
         in_server_too: bool, server_modes: tuple[str, ...]) -> None:
    levels = [int(c) for c in concurrency.split(",")]
    st = load_model(model, device="cpu")
    if abuse:
        with tempfile.TemporaryDirectory(prefix="bench-serve-abuse-") as tmp:
            abuse_scenario(st, Path(tmp), load_texts(n_requests), abuse_concurrency, huge_inputs, huge_chars,
                           batch_tokens)
        return
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        if compare_variants:
            compare(model, st, Path(tmp), Path(beir_dir), max_passages, n_requests, levels, tolerance, Path(out_path),
                    [v.strip() for v in variants.split(",")], infinity_bin, batch_tokens, in_server_too,
                    parse_modes(server_modes))
        else:
            run(model, st, Path(tmp), load_texts(n_requests), levels, [b.strip() for b in backends.split(",")])


def beir_subset(folder: Path, max_passages: int) -> tuple[dict, dict, dict]:
    """The test set with every relevant passage and the first max_passages others (file order)."""
    corpus, queries, qrels = load_beir(folder)
    relevant = {pid for rels in qrels.values() for pid in rels}
    others = [pid for pid in corpus if pid not in relevant]
    keep = relevant | set(others[:max_passages] if max_passages else others)
    return {k: v for k, v in corpus.items() if k in keep}, queries, qrels


class InfinityServer(ChildServer):
    """`infinity_emb v2` serving a sentence-transformers folder on CPU (torch engine) on a free loopback port."""

    def __init__(self, executable: str, model_dir: Path, batch_size: int = 32, startup_timeout_s: float = 300.0):
        self.batch_size = batch_size
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        cmd = [executable, "v2", "--model-id", str(model_dir), "--served-model-name", "bench", "--engine", "torch",
               "--device", "cpu", "--batch-size", str(batch_size), "--no-bettertransformer",
               "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        env = dict(os.environ, DO_NOT_TRACK="1", INFINITY_ANONYMOUS_USAGE_STATS="0", HF_HUB_OFFLINE="1")
        env.pop("PYTHONPATH", None)  # its own venv, its own packages
        super().__init__("infinity", cmd, f"{self.base_url}/health", startup_timeout_s=startup_timeout_s, env=env)


def serve_infinity(executable: str, model: str, st, texts: list[str], levels: list[int]) -> dict[str, Any]:
    """Infinity on the same model and traffic: inputs/s per concurrency and cosine parity with torch.

    It gets the model's own folder: Infinity pins sentence-transformers < 4, which cannot read a folder saved
    by this project's sentence-transformers (v5 module paths), so a model without a folder is refused."""
    model_dir = Path(resolve_model(model))
    if not (model_dir / "modules.json").is_file():
        raise click.ClickException(f"--infinity needs --model to be a sentence-transformers folder, got {model}")
    with InfinityServer(executable, model_dir) as server:
        drive_server(server.base_url, texts[:8], 2)  # warm-up
        served = EmbeddingEndpoint(server.base_url, "bench").embed(texts[:32], "passage", progress=False)
        parity = cosine_parity(encode(st, texts[:32]), served)
        speed = {}
        for c in levels:
            seconds, _ = drive_server(server.base_url, texts, c)
            speed[f"server_c{c}"] = round(len(texts) / seconds, 1)
    return {"engine": "torch", "device": "cpu", "batch_size": server.batch_size,
            "cosine_min_vs_torch": parity["cosine_min"], "inputs_per_s": speed}


def parse_modes(specs: tuple[str, ...]) -> dict[str, list[str]]:
    """'NAME=FLAGS' options -> {NAME: [flag, ...]}."""
    modes = {}
    for spec in specs:
        name, sep, flags = spec.partition("=")
        if not sep or not name.strip() or name.strip() in ("server", "in_process"):
            raise click.BadParameter(f"--server-mode {spec!r}: expected NAME=FLAGS with a new NAME")
        modes[name.strip()] = flags.split()
    return modes


def server_key(variant: str) -> str:
    """The speed table's key of a variant: ONNX variants are 'onnx <variant>', torch ones their own name."""
    return variant if variant.startswith("torch") else f"onnx {variant}"


def compare(model: str, st, tmp: Path, beir_dir: Path, max_passages: int, n_requests: int, levels: list[int],
            tolerance: float, out_path: Path, chosen: list[str], infinity_bin: str | None = None,
            batch_tokens: int | None = None, in_server_too: bool = False,
            extra_modes: dict[str, list[str]] | None = None) -> None:
    """Quality (vs torch, on a real test set) then speed (server and in-process) of each ONNX variant.
    `in_server_too`: also serve each with the model in the server's own process (`--no-model-process`)."""
    console = Console()
    logging.getLogger().setLevel(logging.ERROR)
    corpus, queries, qrels = beir_subset(beir_dir, max_passages)
    pids, qids = list(corpus), list(queries)
    passages, qtexts = [passage_text(r) for r in corpus.values()], [q["text"] for q in queries.values()]
    qp, pp = model_prompts(st)
    export_onnx(st, tmp, "bench", qp, pp)
    hf = st[0].auto_model.config
    build: dict[str, dict] = {"fp32": {}}
    if "fp32_opt" in chosen:
        build["fp32_opt"] = {"fused": optimize_fp32(tmp / "model.onnx", tmp / "model_opt.onnx",
                                                    hf.num_attention_heads, hf.hidden_size)}
    if "int8" in chosen:
        build["int8"] = build_int8(st, tmp, passages, pp)
    if "int8_block" in chosen:
        quantize_int8_blockwise(tmp / "model.onnx", tmp / "model_int8_block.onnx")
        build["int8_block"] = {}

    def quality(fn) -> tuple[np.ndarray, dict[str, float], float]:
        start = time.perf_counter()
        p, q = fn(passages, pp), fn(qtexts, qp)
        seconds = time.perf_counter() - start
        return np.concatenate([p, q]), evaluate(qrels, retrieve(q, p, qids, pids, k=100)), seconds

    console.print(f"quality on {beir_dir}: {len(passages)} passages, {len(qtexts)} queries")
    ref, ref_metrics, torch_s = quality(lambda t, p: encode(st, t, p))
    variants: dict[str, dict] = {}
    encoders = {name: OnnxEncoder(tmp, name).encode for name in build}
    bf16 = TorchEncoder(st, "bench", bf16=True)  # the server's own `--torch-dtype bfloat16` encoder
    if "torch_bf16" in chosen:
        encoders["torch_bf16"] = bf16.encode
    for name, encoder in encoders.items():
        encoder(passages[:8])
        emb, metrics, seconds = quality(encoder)
        drift = metric_drift(ref_metrics, metrics)
        variants[name] = {**cosine_parity(ref, emb), "metric_drift": drift, "passed": drift <= tolerance,
                          "encode_speed_vs_torch": round(torch_s / seconds, 2),
                          **{k: v for k, v in build.get(name, {}).items() if k in ("fused", "fp32_matmuls")}}
        console.print(f"{name}: cosine min {variants[name]['cosine_min']:.5f}, drift {drift:.4f}, "
                      f"{variants[name]['encode_speed_vs_torch']}x torch (in-process, whole test set)")

    texts = [passages[i % len(passages)] for i in range(n_requests)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    speed: dict[str, dict[str, float]] = {}
    runs = {f"onnx {v}": (["--model-dir", str(tmp), "--variant", v], OnnxEncoder(tmp, v).encode)
            for v in variants if variants[v]["passed"] and v in build}
    if variants.get("torch_bf16", {}).get("passed"):
        runs["torch_bf16"] = (["--model-dir", str(tmp), "--backend", "torch", "--torch-model", model,
                               "--torch-dtype", "bfloat16"], bf16.encode)
    runs["torch"] = (["--model-dir", str(tmp), "--backend", "torch", "--torch-model", model,  # the plain torch server
                      "--model-workers", "1", "--no-torch-compile"], lambda t: encode(st, t))
    tokens = ["--max-batch-tokens", str(batch_tokens)] if batch_tokens else []
    modes = {"server": ["--model-process"]}  # the default: the model in a child process, away from the GIL
    if in_server_too:
        modes["server_model_in_server_process"] = ["--no-model-process"]
    for name, (args, in_process) in runs.items():
        in_process(texts[:8])
        for mode, flags in {**modes, **({} if name == "torch" else extra_modes or {})}.items():
            with ServerProcess([*args, *tokens, *flags, "--model-name", "bench"], cwd=str(ROOT), env=env) as server:
                drive_server(server.base_url, texts[:8], 2)  # warm-up
                for c in levels:
                    seconds, _ = drive_server(server.base_url, texts, c)
                    speed.setdefault(name, {})[f"{mode}_c{c}"] = round(len(texts) / seconds, 1)
        for c in levels:
            seconds, _ = drive_in_process(in_process, texts, c)
            speed[name][f"in_process_c{c}"] = round(len(texts) / seconds, 1)
        if name == "torch_bf16":  # each mode's model setup without HTTP, for its HTTP overhead
            from embedpipe.serving.model_process import ProcessEncoder

            for mode, flags in {"server": [], **(extra_modes or {})}.items():
                spec, workers = mode_spec(model, tmp, flags)
                with ProcessEncoder(spec, workers=workers) as encoder:
                    drive_workers(encoder, texts[:16], 8)  # warm-up
                    for c in levels:
                        speed[name][f"in_process_{mode}_c{c}"] = round(len(texts) / drive_workers(encoder, texts, c), 1)
        console.print(f"{name}: {speed[name]} inputs/s")

    infinity = serve_infinity(infinity_bin, model, st, texts, levels) if infinity_bin else None
    if infinity:
        console.print(f"infinity (torch engine): {infinity['inputs_per_s']} inputs/s, "
                      f"cosine min vs torch {infinity['cosine_min_vs_torch']:.5f}")

    c = 8 if 8 in levels else max(levels)
    for v in variants:
        if server_key(v) in speed:
            s = speed[server_key(v)]
            variants[v]["throughput_ratio_vs_torch_c8"] = round(s[f"server_c{c}"] / speed["torch"][f"server_c{c}"], 2)
            # against the fastest way this bench ran the model without HTTP (any setup), not only the same setup
            best_in_process = max(x for k, x in s.items() if k.startswith("in_process") and k.endswith(f"_c{c}"))
            variants[v]["http_overhead_pct"] = round(100 * (1 - s[f"server_c{c}"] / best_in_process), 1)
            if f"in_process_server_c{c}" in s:
                variants[v]["http_overhead_pct_same_setup"] = round(
                    100 * (1 - s[f"server_c{c}"] / s[f"in_process_server_c{c}"]), 1)
            if in_server_too:
                variants[v]["http_overhead_pct_model_in_server_process"] = round(
                    100 * (1 - s[f"server_model_in_server_process_c{c}"] / s[f"in_process_c{c}"]), 1)
            for mode in extra_modes or {}:
                variants[v][f"throughput_ratio_vs_torch_c8_{mode}"] = round(
                    s[f"{mode}_c{c}"] / speed["torch"][f"server_c{c}"], 2)
                if f"in_process_{mode}_c{c}" in s:
                    variants[v][f"http_overhead_pct_{mode}"] = round(
                        100 * (1 - s[f"{mode}_c{c}"] / s[f"in_process_{mode}_c{c}"]), 1)
    passed = [v for v in variants if variants[v]["passed"]]
    best = max(passed, key=lambda v: variants[v]["throughput_ratio_vs_torch_c8"])
    result = {"variant": best, "metric_drift": variants[best]["metric_drift"],
              "throughput_ratio_vs_torch_c8": variants[best]["throughput_ratio_vs_torch_c8"],
              "http_overhead_pct": variants[best]["http_overhead_pct"], "tolerance": tolerance,
              "concurrency": c, "model": model, "test_set": {"beir_dir": str(beir_dir), "passages": len(passages),
                                                              "queries": len(qtexts)},
              "requests_per_cell": n_requests, "max_batch_tokens": batch_tokens, "model_process": True,
              "server_modes": extra_modes or {},
              "command": " ".join(["python", *sys.argv]), "variants": variants,
              "inputs_per_s": speed,
              "machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                          "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}}
    if infinity:
        ours = speed[server_key(best)][f"server_c{c}"]
        infinity["throughput_ratio_ours_vs_infinity_c8"] = round(ours / infinity["inputs_per_s"][f"server_c{c}"], 2)
        infinity["torch_server_vs_infinity_c8"] = round(
            speed["torch"][f"server_c{c}"] / infinity["inputs_per_s"][f"server_c{c}"], 2)
        result["infinity"] = infinity
        console.print(f"ours ({best}) = {infinity['throughput_ratio_ours_vs_infinity_c8']}x Infinity at c={c}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    console.print(f"default = {best}: drift {result['metric_drift']:.4f}, "
                  f"{result['throughput_ratio_vs_torch_c8']}x the torch server at c={c} (goal >= 2x), "
                  f"HTTP overhead {result['http_overhead_pct']}% (goal <= 15%) -> {out_path}")


def run(model: str, st, tmp: Path, texts: list[str], levels: list[int], chosen: list[str]) -> None:
    export_onnx(st, tmp, "bench", "", "")
    build_int8(st, tmp, texts, "")  # as the export stage builds it
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    runs = {
        "onnx fp32": (["--model-dir", str(tmp), "--variant", "fp32"], OnnxEncoder(tmp, "fp32").encode),
        "onnx int8": (["--model-dir", str(tmp), "--variant", "int8"], OnnxEncoder(tmp, "int8").encode),
        "torch": (["--model-dir", str(tmp), "--backend", "torch", "--torch-model", model],
                  lambda t: encode(st, t)),
    }
    rows: list[tuple] = []
    throughput: dict[tuple[str, str, int], float] = {}
    for name, (args, in_process) in runs.items():
        if name not in chosen:
            continue
        in_process(texts[:8])  # warm-up
        for c in levels:
            seconds, lat = drive_in_process(in_process, texts, c)
            throughput[(name, "in-process", c)] = len(texts) / seconds
            rows.append((name, "in-process", c, len(texts) / seconds, lat))
        with ServerProcess([*args, "--model-name", "bench"], cwd=str(ROOT), env=env) as server:
            drive_server(server.base_url, texts[:8], 2)  # warm-up
            for c in levels:
                seconds, lat = drive_server(server.base_url, texts, c)
                throughput[(name, "server", c)] = len(texts) / seconds
                rows.append((name, "server", c, len(texts) / seconds, lat))

    table = Table(title=f"bench_serve: {model}, {len(texts)} single-passage requests, {os.cpu_count()} CPUs")
    for col in ("backend", "mode", "concurrency", "inputs/s", "p50 ms", "p99 ms", "vs in-process"):
        table.add_column(col, justify="right" if col not in ("backend", "mode") else "left")
    for name, mode, c, tput, lat in rows:
        ratio = tput / throughput[(name, "in-process", c)]
        table.add_row(name, mode, str(c), f"{tput:.1f}", f"{np.percentile(lat, 50) * 1000:.1f}",
                      f"{np.percentile(lat, 99) * 1000:.1f}", f"{ratio:.2f}")
    console = Console()
    console.print(table)
    c_mid = 8 if 8 in levels else levels[-1]
    c_top = max(levels)
    if ("torch", "server", c_top) in throughput and ("onnx int8", "server", c_top) in throughput:
        speedup = throughput[("onnx int8", "server", c_top)] / throughput[("torch", "server", c_top)]
        console.print(f"int8 server / torch server throughput at c={c_top}: {speedup:.2f}x (goal >= 2x: "
                      f"{'met' if speedup >= 2 else 'NOT met'})")
    for name in [n for n in chosen if (n, "server", c_mid) in throughput]:
        overhead = 1 - throughput[(name, "server", c_mid)] / throughput[(name, "in-process", c_mid)]
        console.print(f"HTTP overhead, {name} at c={c_mid}: {overhead * 100:.0f}% (goal <= 20%: "
                      f"{'met' if overhead <= 0.20 else 'NOT met'})")


def abuse_scenario(st, tmp: Path, texts: list[str], concurrency: int, huge_inputs: int, huge_chars: int,
                   batch_tokens: int | None = None) -> None:
    """Normal traffic alone, then with one huge request in flight; p99 of the normal requests in both."""
    import threading

    export_onnx(st, tmp, "bench", "", "")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    words = ("pump pressure valve firmware threshold " * (huge_chars // 40 + 1))[:huge_chars]
    huge = {"input": [words] * huge_inputs, "model": "bench", "encoding_format": "base64"}
    result: dict[str, float | int] = {}
    tokens = ["--max-batch-tokens", str(batch_tokens)] if batch_tokens else []
    with ServerProcess(["--model-dir", str(tmp), "--variant", "fp32", "--model-name", "bench", *tokens], cwd=str(ROOT),
                       env=env) as server:
        drive_server(server.base_url, texts[:8], 2)  # warm-up
        _, alone = drive_server(server.base_url, texts, concurrency)

        def send_huge() -> None:
            start = time.perf_counter()
            r = httpx.post(f"{server.base_url}/embeddings", json=huge, timeout=3600)
            result.update(status=r.status_code, seconds=time.perf_counter() - start)

        thread = threading.Thread(target=send_huge)
        thread.start()
        time.sleep(1.0)  # the huge body is uploaded, parsed and tokenised
        seconds, loaded = drive_server(server.base_url, texts, concurrency)
        overlapped = thread.is_alive()
        thread.join()
    table = Table(title=f"bench_serve --abuse: {len(texts)} single-passage requests at concurrency {concurrency}, "
                        f"huge request {huge_inputs} x {huge_chars} chars, max_batch_tokens {batch_tokens or 'default'}")
    for col in ("normal traffic", "p50 ms", "p99 ms", "max ms"):
        table.add_column(col, justify="left" if col == "normal traffic" else "right")
    for name, lat in (("alone", alone), ("with the huge request", loaded)):
        table.add_row(name, *(f"{v * 1000:.1f}" for v in (np.percentile(lat, 50), np.percentile(lat, 99), max(lat))))
    console = Console()
    console.print(table)
    ratio = np.percentile(loaded, 99) / np.percentile(alone, 99)
    console.print(f"huge request: status {result.get('status')}, {result.get('seconds', 0):.1f} s; "
                  f"{'still running when' if overlapped else 'finished before'} the normal traffic ended "
                  f"({seconds:.1f} s){'' if overlapped else ' (use more --requests to overlap it fully)'}")
    console.print(f"p99 with / without the huge request: {ratio:.2f}x (goal <= 2x: {'met' if ratio <= 2 else 'NOT met'})")


if __name__ == "__main__":
    main()
