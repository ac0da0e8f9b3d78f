"""Stage `finetune`: contrastive fine-tuning of the base embedder on prep's hard-negative training set.

Inputs: data/prep/train.jsonl, data/prep/val.jsonl, data/prep/train_corpus.jsonl. Outputs: models/finetuned/
(a sentence-transformers folder with the shared prompts and a model card), metrics/train.json, dvclive curves.

Scale-out: set finetune.nproc_per_node / finetune.nnodes (the stage re-launches itself under torchrun), or run it
yourself: `torchrun --nproc_per_node 8 stages/finetune.py` / `accelerate launch --num_processes 8 stages/finetune.py`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

from embedpipe.console import alert, summary, warn
from embedpipe.io import FormatError, load_corpus, passage_text, read_jsonl, write_json
from embedpipe.models import ModelNotAvailable, detect_device, load_model
from embedpipe.params import ParamsError, load_params, section
from embedpipe.training import (
    build_training_table,
    effective_params,
    is_main_process,
    make_evaluator,
    plan_training,
    train,
    validation_queries,
    world_size,
    write_model_card,
)


def _relaunch_distributed(cfg: dict) -> int | None:
    """Re-run this command under torchrun when the params ask for several processes and we are not launched yet."""
    nproc, nnodes = int(cfg.get("nproc_per_node") or 1), int(cfg.get("nnodes") or 1)
    if nproc * nnodes <= 1 or "LOCAL_RANK" in os.environ:
        return None
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}"]
    if nnodes > 1:
        cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={cfg['rdzv_endpoint']}", f"--node_rank={cfg['node_rank']}"]
    else:
        cmd += ["--standalone"]
    cmd += [str(Path(__file__).resolve()), *sys.argv[1:]]
    click.echo(f"launching {nproc * nnodes} processes: {' '.join(cmd)}", err=True)
    return subprocess.call(cmd)


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="Params file.")
@click.option("--prep-dir", default="data/prep", show_default=True, help="Folder with train/val/train_corpus.jsonl.")
@click.option("--out", "out_dir", default="models/finetuned", show_default=True, help="Output model folder.")
@click.option("--metrics", "metrics_path", default="metrics/train.json", show_default=True)
@click.option("--live-dir", default="dvclive/finetune", show_default=True, help="dvclive folder (training curves).")
@click.option(
    "--checkpoint-dir", default="cache/finetune", show_default=True, help="Scratch folder for checkpoints (removed)."
)
@click.option("--device", default=None, help="cpu | cuda | mps (overrides model.device; default auto).")
@click.option("--max-steps", type=int, default=None, help="Stop after this many optimizer steps (quick trials).")
def main(
    params_path: str,
    prep_dir: str,
    out_dir: str,
    metrics_path: str,
    live_dir: str,
    checkpoint_dir: str,
    device: str | None,
    max_steps: int | None,
) -> None:
    """Fine-tune model.base_model on prep's (question, positive, hard negatives) with a contrastive loss.

    Validates nDCG@10 on val.jsonl over train_corpus.jsonl before training and at every checkpoint, keeps the
    best checkpoint, and warns in red (or fails, with finetune.fail_on_regression) when it is worse than the
    base model. Without a GPU the `finetune.cpu` overrides apply (shorter sequences, fewer negatives).
    """
    started = time.time()
    try:
        params = load_params(params_path)
        mcfg, raw = section(params, "model"), section(params, "finetune")
    except ParamsError as e:
        raise click.ClickException(str(e)) from None
    if (code := _relaunch_distributed(raw)) is not None:
        sys.exit(code)

    device = detect_device(device or mcfg.get("device"))
    if world_size() > 1 and device == "cuda":
        import torch

        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    cfg = effective_params(raw, device.split(":")[0])
    if max_steps:
        cfg["max_steps"] = max_steps
    prompts = {"query": mcfg.get("query_prompt") or "", "passage": mcfg.get("passage_prompt") or ""}
    seq = int(cfg.get("max_seq_length") or mcfg["max_seq_length"])

    prep = Path(prep_dir)
    try:
        corpus = load_corpus(prep / "train_corpus.jsonl")
        train_records = read_jsonl(prep / "train.jsonl")
        val_records = read_jsonl(prep / "val.jsonl")
        table = build_training_table(train_records, corpus, int(cfg["passages_per_query"]))
        queries, relevant = validation_queries(val_records, corpus)
    except (FormatError, KeyError, ValueError) as e:
        raise click.ClickException(f"bad prep data in {prep}: {e}") from None
    if table.examples == 0:
        raise click.ClickException(f"no usable training example in {prep / 'train.jsonl'} (run the prep stage)")
    if not queries:
        raise click.ClickException(f"no validation question with a positive in the corpus in {prep / 'val.jsonl'}")
    if not cfg["in_batch_negatives"] and int(cfg["passages_per_query"]) < 2:
        raise click.ClickException("in_batch_negatives: false needs passages_per_query >= 2 (1 positive + negatives)")

    plan = plan_training(table.examples, cfg, world_size())
    main_proc = is_main_process()
    if main_proc:
        for message in plan.warnings:
            warn(message)
        if table.padded:
            warn(
                f"{table.padded}/{table.examples} examples had fewer than {table.negatives_wanted} hard negatives "
                "and were padded by repeating them (mine more in prep, or lower passages_per_query)"
            )
        for what, count in (
            ("positive not in train_corpus", table.missing_passages),
            ("no negative", table.no_negatives),
        ):
            if count:
                warn(f"dropped {count} training examples: {what}")

    try:
        model = load_model(mcfg["base_model"], device=device, max_seq_length=seq)
    except ModelNotAvailable as e:
        raise click.ClickException(str(e)) from None
    evaluator = make_evaluator(queries, {i: passage_text(r) for i, r in corpus.items()}, relevant, prompts)
    result = train(
        model,
        table,
        evaluator,
        cfg,
        plan,
        device.split(":")[0],
        prompts,
        checkpoint_dir,
        live_dir if main_proc else None,
    )
    if not main_proc:
        return
    if result.steps == 0:
        raise click.ClickException(
            "no training step ran: no batch could be formed (with in_batch_negatives the duplicate-free sampler "
            "needs batch x passages_per_query distinct passages; lower passages_per_query or the batch)"
        )

    note = ""
    saved = "best fine-tuned checkpoint"
    if result.regression:
        note = (
            f"REGRESSION: the best fine-tuned checkpoint scores nDCG@10 {result.best_ndcg10:.4f} on validation, "
            f"below the base model's {result.base_ndcg10:.4f}; the base model was saved instead."
        )
        model = load_model(mcfg["base_model"], device=device, max_seq_length=seq)
        saved = "base model (no checkpoint beat it)"
    elif result.best_ndcg10 == result.base_ndcg10:
        note = "No improvement on validation nDCG@10 over the base model (tie); the fine-tuned checkpoint was saved."
    model.prompts = dict(prompts)
    model.default_prompt_name = None
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    model.save(str(out), create_model_card=False)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    wall = time.time() - started

    shown = ["passages_per_query", "temperature", "in_batch_negatives", "cached", "learning_rate", "epochs",
             "warmup_ratio", "weight_decay", "seed"]  # fmt: skip
    write_model_card(
        out,
        {
            "name": out.name,
            "path": str(out),
            "base_model": mcfg["base_model"],
            "saved": saved,
            "examples": table.examples,
            "val_queries": len(queries),
            "corpus": len(corpus),
            "padded": table.padded,
            "loss": "MultipleNegativesRankingLoss (in-batch + hard negatives)"
            if cfg["in_batch_negatives"]
            else "softmax over [positive, own hard negatives]",
            "temperature": cfg["temperature"],
            "negatives": table.negatives_wanted,
            "steps": result.steps,
            "batch": plan.global_batch,
            "device": device,
            "wall_time_s": wall,
            "params": {**{k: cfg[k] for k in shown}, "max_seq_length": seq},
            "validation": {"base": result.base_ndcg10, "finetuned": result.best_ndcg10, "best_step": result.best_step},
            "note": note,
            "query_prompt": prompts["query"],
            "passage_prompt": prompts["passage"],
        },
    )
    metrics = {
        "examples": table.examples,
        "val_queries": len(queries),
        "corpus_passages": len(corpus),
        "padded_examples": table.padded,
        "dropped_examples": table.missing_passages + table.no_negatives,
        "steps": result.steps,
        "epochs": cfg["epochs"],
        "batch_size": plan.global_batch,
        "per_device_batch": plan.per_device_batch,
        "grad_accum": plan.grad_accum,
        "processes": plan.world_size,
        "auto_scaled": plan.auto_scaled,
        "eval_every_steps": plan.eval_steps,
        "passages_per_query": int(cfg["passages_per_query"]),
        "max_seq_length": seq,
        "in_batch_negatives": bool(cfg["in_batch_negatives"]),
        "device": device,
        "profile": "cpu" if device == "cpu" and raw.get("cpu") else "recipe",
        "first_loss": result.first_loss,
        "final_loss": result.final_loss,
        "best_step": result.best_step,
        "val_ndcg@10_base": round(result.base_ndcg10, 5),
        "val_ndcg@10_finetuned": round(result.best_ndcg10, 5),
        "val_ndcg@10_delta": round(result.best_ndcg10 - result.base_ndcg10, 5),
        "regression": result.regression,
        "saved_model": "base" if result.regression else "finetuned",
        "wall_time_s": round(wall, 1),
    }
    write_json(metrics_path, metrics)
    summary(
        "finetune",
        {
            "examples": table.examples,
            "val questions": len(queries),
            "device / processes": f"{device} / {plan.world_size}",
            "batch (auto-scaled)" if plan.auto_scaled else "batch": plan.global_batch,
            "steps": result.steps,
            "loss first -> last": f"{result.first_loss:.4f} -> {result.final_loss:.4f}"
            if result.first_loss is not None
            else "-",
            "val nDCG@10 base": result.base_ndcg10,
            "val nDCG@10 fine-tuned (best)": result.best_ndcg10,
            "best step": result.best_step,
            "saved": f"{out} ({saved})",
            "wall time (s)": round(wall, 1),
        },
    )
    if note:
        (alert if result.regression else warn)(note)
    if result.regression and raw.get("fail_on_regression"):
        raise click.ClickException("fine-tuning made validation nDCG@10 worse (finetune.fail_on_regression: true)")


if __name__ == "__main__":
    sys.exit(main())
