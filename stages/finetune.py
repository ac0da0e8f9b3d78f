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
from typing import Any

import click

from embedpipe.core.console import alert, summary, warn
from embedpipe.core.io import FormatError, load_corpus, read_jsonl, write_json
from embedpipe.core.models import ModelNotAvailable, detect_device, load_model
from embedpipe.core.params import ParamsError, load_params, section
from embedpipe.training.data import build_training_table, oversample_llm_questions, teacher_scored, validation_set
from embedpipe.training.losses import check_params, needs_teacher
from embedpipe.training.trainer import (
    apply_wise,
    effective_params,
    is_main_process,
    make_evaluator,
    plan_training,
    regression_note,
    run_outputs,
    set_attention_dropout,
    train,
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

    Validates nDCG@10 on val.jsonl over a bounded sub-corpus of train_corpus.jsonl (finetune.val_max_passages)
    before training and at every checkpoint, stops within finetune.max_minutes, keeps the best checkpoint,
    interpolates it with the base weights (finetune.wise_alphas) and keeps the best on validation; warns in red
    (or fails, with finetune.fail_on_regression) when the base model is better. Without a GPU the
    `finetune.cpu` overrides apply (shorter sequences, fewer negatives, a time budget).
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

    try:
        check_params(cfg)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    table, val = load_training_data(Path(prep_dir), cfg)
    plan = plan_training(table.examples, cfg, world_size())
    main_proc = is_main_process()
    if main_proc:
        warn_about_data(plan, table)

    try:
        model = load_model(mcfg["base_model"], device=device, max_seq_length=seq)
        set_attention_dropout(model, cfg.get("attention_dropout"))
        evaluator = make_evaluator(val.queries, val.corpus, val.relevant, prompts)
        result = train(
            model, table, evaluator, cfg, plan, device.split(":")[0], prompts, checkpoint_dir,
            live_dir if main_proc else None,
        )
        result = apply_wise(model, result, evaluator, cfg.get("wise_alphas") or [1.0])
    except ModelNotAvailable as e:
        raise click.ClickException(str(e)) from None
    except ValueError as e:  # bad loss / alpha params
        raise click.ClickException(str(e)) from None
    if not main_proc:
        return
    if result.steps == 0:
        raise click.ClickException(
            "no training step ran: no batch could be formed (with in_batch_negatives the duplicate-free sampler "
            "needs batch x passages_per_query distinct passages; lower passages_per_query or the batch)"
        )

    out = save_model(model, prompts, int(mcfg["max_seq_length"]), Path(out_dir), checkpoint_dir)
    metrics, card, rows = run_outputs(
        result=result, table=table, val=val, plan=plan, cfg=cfg, seq=seq, device=device,
        profile="cpu" if device == "cpu" and raw.get("cpu") else "recipe", base_model=mcfg["base_model"],
        prompts=prompts, out=out, wall=time.time() - started,
    )
    write_model_card(out, card)
    metrics["saved_max_seq_length"] = int(model.max_seq_length)
    write_json(metrics_path, metrics)
    summary("finetune", rows)
    if result.budget.get("cut_by_budget"):
        warn(f"time budget: stopped after {result.steps} of {plan.total_steps} planned steps "
             f"(finetune.max_minutes = {result.budget['max_minutes']:g})")
    if note := regression_note(result):
        (alert if result.regression else warn)(note)
    if result.regression and raw.get("fail_on_regression"):
        raise click.ClickException("fine-tuning made validation nDCG@10 worse (finetune.fail_on_regression: true)")


def load_training_data(prep: Path, cfg: dict) -> tuple[Any, Any]:
    """prep's records -> (training table, validation set), or a clear error naming what is missing."""
    teacher_labels = needs_teacher(cfg)
    try:
        corpus = load_corpus(prep / "train_corpus.jsonl")
        train_records, unscored = read_jsonl(prep / "train.jsonl"), 0
        if teacher_labels:  # before oversampling, so llm_share is a share of the examples actually trained on
            train_records, unscored = teacher_scored(train_records)
        train_records, llm_repeats = oversample_llm_questions(train_records, float(cfg.get("llm_share") or 0))
        val_records = read_jsonl(prep / "val.jsonl")
        table = build_training_table(train_records, corpus, int(cfg["passages_per_query"]), teacher_labels)
        table.llm_repeats, table.no_teacher_scores = llm_repeats, table.no_teacher_scores + unscored
        val = validation_set(val_records, corpus, int(cfg.get("val_max_passages") or 0), int(cfg["seed"]),
                             int(cfg.get("val_min_llm_questions") or 0))
    except (FormatError, KeyError, ValueError) as e:
        raise click.ClickException(f"bad prep data in {prep}: {e}") from None
    if teacher_labels and table.examples == 0 and table.no_teacher_scores:
        raise click.ClickException(
            f"finetune.loss {cfg['loss']} needs the teacher's scores in {prep / 'train.jsonl'} "
            "(pos_doc[].teacher_score, neg_doc[].teacher_score): set prep.teacher.enabled: true and rerun prep"
        )
    if table.examples == 0:
        raise click.ClickException(f"no usable training example in {prep / 'train.jsonl'} (run the prep stage)")
    if not val.queries:
        raise click.ClickException(f"no validation question with a positive in the corpus in {prep / 'val.jsonl'}")
    if not cfg["in_batch_negatives"] and int(cfg["passages_per_query"]) < 2:
        raise click.ClickException("in_batch_negatives: false needs passages_per_query >= 2 (1 positive + negatives)")

    return table, val


def warn_about_data(plan: Any, table: Any) -> None:
    """Say what the plan and the training table left out or padded."""
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
        ("no teacher scores (cut by prep.teacher.max_passages)", table.no_teacher_scores),
    ):
        if count:
            warn(f"dropped {count} training examples: {what}")


def save_model(model: Any, prompts: dict[str, str], max_seq_length: int, out: Path, checkpoint_dir: str) -> Path:
    """The fine-tuned model as a sentence-transformers folder, with its prompts, at the pipeline's length."""
    model.prompts = dict(prompts)
    model.default_prompt_name = None
    # Saved at the pipeline's length, not the training one (the CPU profile trains at 128): eval, export and the
    # server encode at model.max_seq_length, and so does a plain `SentenceTransformer(path)` then.
    model.max_seq_length = max_seq_length
    if out.exists():
        shutil.rmtree(out)
    model.save(str(out), create_model_card=False)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
