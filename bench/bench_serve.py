"""Benchmark the embeddings server: ONNX fp32, ONNX int8 and torch backends, against in-process encoding.

    python bench/bench_serve.py [--model all-MiniLM-L6-v2] [--requests 96] [--concurrency 1,8,32]

Each request carries one passage (the serving case) and asks for base64, as the openai client does.
In-process reference at concurrency c: the same passages encoded in batches of c, one batch after
another (what the server's micro-batcher can at best do).
Goals: int8 server >= 2x torch server throughput; HTTP overhead <= 20% vs in-process at c=8.
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

import click
import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedpipe.io import load_corpus, passage_text  # noqa: E402
from embedpipe.models import encode, load_model  # noqa: E402
from embedpipe.onnx_encoder import OnnxEncoder  # noqa: E402
from embedpipe.onnx_export import export_onnx, quantize_int8  # noqa: E402
from embedpipe.server import ServerProcess  # noqa: E402


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
def main(model: str, n_requests: int, concurrency: str, backends: str, abuse: bool, abuse_concurrency: int,
         huge_inputs: int, huge_chars: int) -> None:
    levels = [int(c) for c in concurrency.split(",")]
    texts = load_texts(n_requests)
    st = load_model(model, device="cpu")
    if abuse:
        with tempfile.TemporaryDirectory(prefix="bench-serve-abuse-") as tmp:
            abuse_scenario(st, Path(tmp), texts, abuse_concurrency, huge_inputs, huge_chars)
        return
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        run(model, st, Path(tmp), texts, levels, [b.strip() for b in backends.split(",")])


def run(model: str, st, tmp: Path, texts: list[str], levels: list[int], chosen: list[str]) -> None:
    export_onnx(st, tmp, "bench", "", "")
    quantize_int8(tmp / "model.onnx", tmp / "model_int8.onnx")
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


def abuse_scenario(st, tmp: Path, texts: list[str], concurrency: int, huge_inputs: int, huge_chars: int) -> None:
    """Normal traffic alone, then with one huge request in flight; p99 of the normal requests in both."""
    import threading

    export_onnx(st, tmp, "bench", "", "")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    words = ("pump pressure valve firmware threshold " * (huge_chars // 40 + 1))[:huge_chars]
    huge = {"input": [words] * huge_inputs, "model": "bench", "encoding_format": "base64"}
    result: dict[str, float | int] = {}
    with ServerProcess(["--model-dir", str(tmp), "--variant", "fp32", "--model-name", "bench"], cwd=str(ROOT),
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
                        f"huge request {huge_inputs} x {huge_chars} chars")
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
