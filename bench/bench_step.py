"""Where one fp32 CPU training step goes: forward vs backward (vs optimizer), side by side.

MiniLM (all-MiniLM-L6-v2), the finetune CPU profile's batch: 128 queries x (1 positive + 2 hard negatives)
passages of exactly 128 tokens, the recipe's loss (HardNegativeSoftmaxLoss, temperature 0.02), AdamW. Four
set-ups, run round-robin (so a load change on a shared machine hits them alike):

  default        the model's own attention dropout (MiniLM: 0.1)
  attn_dropout0  attention_dropout 0 (finetune.attention_dropout: 0)
  frozen3        word/position embeddings + encoder layers 0-2 frozen (requires_grad False), attention dropout 0.1
  frozen3_attn0  both

Each step runs as micro-batches of 32 queries (+ their 96 passages) with gradients accumulated, which gives the same
gradient (the loss of a query does not depend on the others) in ~5 GB RSS instead of the ~12 GB peak of the whole
batch at once (docs/finetune.md), which was OOM-killed on a shared 23 GB machine; forward and backward are the sums
over the micro-batches.
fp32 only: EMBEDPIPE_BF16=off is set and no autocast is used (finetune `bf16: false`). The optimizer has lr 0, so
the weights never change and every set-up times the same model. Tokenisation is done once, outside the timings.
Run: `python bench/bench_step.py [--steps 2] [--out bench/results/step-fp32.json]` (a few minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

os.environ["EMBEDPIPE_BF16"] = "off"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import click  # noqa: E402
import torch  # noqa: E402

from embedpipe.core.models import load_model  # noqa: E402
from embedpipe.training.losses import HardNegativeSoftmaxLoss  # noqa: E402
from embedpipe.training.trainer import set_attention_dropout  # noqa: E402

SETUPS = {
    "default": {"attention_dropout": None, "frozen_layers": 0},
    "attn_dropout0": {"attention_dropout": 0.0, "frozen_layers": 0},
    "frozen3": {"attention_dropout": None, "frozen_layers": 3},
    "frozen3_attn0": {"attention_dropout": 0.0, "frozen_layers": 3},
}


def cpu_name() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import cpu_description

    return cpu_description()



def texts_from_docs(n_queries: int, n_passages: int) -> tuple[list[str], list[str]]:
    """Queries: sentences of the sample docs (natural length); passages: 200-word windows (>= 128 tokens)."""
    words: list[str] = []
    sentences: list[str] = []
    for path in sorted((ROOT / "data" / "sample_docs").rglob("*")):
        if path.is_file():
            text = re.sub(r"<[^>]+>", " ", path.read_text(encoding="utf-8", errors="replace"))
            words += text.split()
            sentences += [s.strip() for s in re.split(r"(?<=[.?!])\s+", " ".join(text.split())) if 6 <= len(s.split()) <= 30]
    passages = [" ".join(words[(i * 97) % (len(words) - 200):][:200]) for i in range(n_passages)]
    return [sentences[(i * 7) % len(sentences)] for i in range(n_queries)], passages


def configure(model, setup: dict) -> list[torch.nn.Parameter]:
    bert = model[0].auto_model
    own = float(bert.config.attention_probs_dropout_prob)  # MiniLM: 0.1
    set_attention_dropout(model, own if setup["attention_dropout"] is None else setup["attention_dropout"])
    for p in model.parameters():
        p.requires_grad_(True)
    if setup["frozen_layers"]:
        for p in bert.embeddings.parameters():
            p.requires_grad_(False)
        for layer in bert.encoder.layer[: setup["frozen_layers"]]:
            for p in layer.parameters():
                p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def rows_of(feat: dict, index: torch.Tensor) -> dict:
    return {k: v[index] if isinstance(v, torch.Tensor) else v for k, v in feat.items()}


def one_step(model, loss_fn, q_feat, p_feat, optimizer, batch: int, micro: int, columns: int) -> dict[str, float]:
    """One optimizer step over `batch` queries, as `batch / micro` micro-batches whose gradients add up (exact: the
    loss of each query is independent of the others); forward and backward times are summed over them."""
    optimizer.zero_grad(set_to_none=True)
    fwd = bwd = fwd_cpu = bwd_cpu = 0.0
    for start in range(0, batch, micro):
        rows = torch.arange(start, min(start + micro, batch))
        n = len(rows)
        passage_rows = torch.cat([rows + c * batch for c in range(columns)])  # column-major: positives, negatives
        t0, c0 = time.perf_counter(), time.process_time()
        q = model(rows_of(q_feat, rows))["sentence_embedding"]
        p = model(rows_of(p_feat, passage_rows))["sentence_embedding"]  # every column in one forward, as the trainer
        loss = loss_fn.loss_from_embeddings(q, list(p.view(columns, n, -1))) * (n / batch)
        t1, c1 = time.perf_counter(), time.process_time()
        loss.backward()
        t2, c2 = time.perf_counter(), time.process_time()
        fwd, bwd, fwd_cpu, bwd_cpu = fwd + t1 - t0, bwd + t2 - t1, fwd_cpu + c1 - c0, bwd_cpu + c2 - c1
    t2, c2 = time.perf_counter(), time.process_time()
    optimizer.step()
    t3, c3 = time.perf_counter(), time.process_time()
    return {"forward_s": fwd, "backward_s": bwd, "optimizer_s": t3 - t2, "step_s": fwd + bwd + t3 - t2,
            "forward_cpu_s": fwd_cpu, "backward_cpu_s": bwd_cpu, "optimizer_cpu_s": c3 - c2,
            "step_cpu_s": fwd_cpu + bwd_cpu + c3 - c2}


@click.command()
@click.option("--steps", default=2, show_default=True, help="Timed steps per set-up (after one warm-up round).")
@click.option("--batch", default=128, show_default=True, help="Queries per step.")
@click.option("--passages-per-query", default=3, show_default=True, help="1 positive + hard negatives.")
@click.option("--seq", default=128, show_default=True, help="Passage length in tokens (and max_seq_length).")
@click.option("--micro-batch", default=32, show_default=True,
              help="Queries per forward/backward (gradients accumulated; the full batch at once was OOM-killed here).")
@click.option("--warmup-batch", default=8, show_default=True, help="Queries in the untimed warm-up step per set-up.")
@click.option("--out", default="bench/results/step-fp32.json", show_default=True)
def main(steps: int, batch: int, passages_per_query: int, seq: int, micro_batch: int, warmup_batch: int,
         out: str) -> None:
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    torch.manual_seed(0)
    model = load_model("all-MiniLM-L6-v2", device="cpu", max_seq_length=seq)
    model.train()
    loss_fn = HardNegativeSoftmaxLoss(model, 0.02)
    queries, passages = texts_from_docs(batch, batch * passages_per_query)
    q_feat, p_feat = model.tokenize(queries), model.tokenize(passages)
    assert p_feat["input_ids"].shape[1] == seq and (p_feat["attention_mask"].sum(1) == seq).all()
    q_tokens = q_feat["attention_mask"].sum(1).float()

    def cut(feat, rows):
        return {k: v[:rows] if isinstance(v, torch.Tensor) else v for k, v in feat.items()}

    optimizers = {}
    for name, setup in SETUPS.items():  # untimed warm-up (allocator, oneDNN primitives), small batch
        params = configure(model, setup)
        optimizers[name] = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0)
        p_small = {k: v.view(passages_per_query, batch, -1)[:, :warmup_batch].reshape(-1, v.shape[-1])
                   if isinstance(v, torch.Tensor) else v for k, v in p_feat.items()}
        one_step(model, loss_fn, cut(q_feat, warmup_batch), p_small, optimizers[name], warmup_batch, warmup_batch,
                 passages_per_query)
    timings: dict[str, list[dict[str, float]]] = {name: [] for name in SETUPS}
    for rep in range(steps):
        for name, setup in SETUPS.items():
            configure(model, setup)
            t = one_step(model, loss_fn, q_feat, p_feat, optimizers[name], batch, micro_batch, passages_per_query)
            timings[name].append(t)
            print(f"step {rep + 1}/{steps} {name:14s} " + "  ".join(f"{k} {v:.2f}" for k, v in t.items()), flush=True)

    def med(rows, key):
        return round(statistics.median(r[key] for r in rows), 3)

    results = {}
    for name, rows in timings.items():
        summary = {k: med(rows, k) for k in rows[0]}
        summary["backward_over_forward"] = round(summary["backward_s"] / summary["forward_s"], 2)
        summary["backward_over_forward_cpu"] = round(summary["backward_cpu_s"] / summary["forward_cpu_s"], 2)
        summary["step_vs_default"] = None
        results[name] = {**SETUPS[name], "trainable_params": sum(p.numel() for p in optimizers[name].param_groups[0]["params"]),
                         "median": summary, "steps": [{k: round(v, 3) for k, v in r.items()} for r in rows]}
    for name in results:
        results[name]["median"]["step_vs_default"] = round(
            results["default"]["median"]["step_s"] / results[name]["median"]["step_s"], 2)
        results[name]["median"]["step_cpu_vs_default"] = round(
            results["default"]["median"]["step_cpu_s"] / results[name]["median"]["step_cpu_s"], 2)
    record = {
        "what": "one fp32 CPU training step of all-MiniLM-L6-v2, forward vs backward vs AdamW step",
        "batch": {"queries": batch, "passages_per_query": passages_per_query, "passage_tokens": seq,
                  "micro_batch_queries": micro_batch,
                  "query_tokens_mean": round(float(q_tokens.mean()), 1), "query_tokens_max": int(q_tokens.max())},
        "bf16": False, "EMBEDPIPE_BF16": os.environ["EMBEDPIPE_BF16"], "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "cpu": cpu_name(), "cores": os.cpu_count(),
        "load_average_at_start": load_at_start, "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "note": "wall seconds (_s) and this process's CPU seconds over both threads (_cpu_s); on a shared machine the "
                "CPU seconds are the steadier comparison, the wall seconds what a step costs under that load",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "steps_timed_per_setup": steps,
        "setups": results,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(record, indent=2) + "\n")
    for name, r in results.items():
        m = r["median"]
        print(f"{name:14s} forward {m['forward_s']:6.2f} s  backward {m['backward_s']:6.2f} s  "
              f"optimizer {m['optimizer_s']:5.2f} s  step {m['step_s']:6.2f} s  ({m['step_vs_default']}x default); "
              f"CPU s: forward {m['forward_cpu_s']:.1f} backward {m['backward_cpu_s']:.1f} "
              f"step {m['step_cpu_s']:.1f} ({m['step_cpu_vs_default']}x)")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
