"""Fine-tuning a bi-encoder on the prep stage's output (step 4 of the recipe).

Everything the `finetune` stage needs besides the command line: turning prep records into a training table
(query, positive, negative_1..k), the two contrastive losses, the small-data auto-scaling of the recipe, the
trainer setup (sentence-transformers 6.x `SentenceTransformerTrainer`) and the model card.

The loss is InfoNCE with temperature 0.02 over 1 positive + (passages_per_query - 1) mined hard negatives:
- `in_batch_negatives: false` (the recipe): softmax over [positive, own negatives] only (`HardNegativeSoftmaxLoss`);
- `in_batch_negatives: true`: every passage in the (global) batch is a negative too (`MultipleNegativesRankingLoss`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embedpipe.io import FormatError, passage_text

METRIC = "val_cosine_ndcg@10"  # the evaluator's primary metric (name "val", cosine, nDCG@10)


# --------------------------------------------------------------------------------------------- data


@dataclass
class TrainingTable:
    """Columns for the trainer (`anchor`, `positive`, `negative_1..k`) and what was dropped or padded on the way."""

    columns: dict[str, list[str]]
    examples: int
    padded: int = 0  # examples with fewer mined negatives than wanted (padded by repetition)
    no_negatives: int = 0  # examples dropped because they had no negative at all
    missing_passages: int = 0  # examples dropped because their positive is not in the corpus
    negatives_wanted: int = 0


def pick_negatives(neg_doc: Sequence[dict[str, Any]], k: int, known: set[str] | dict[str, Any]) -> list[str]:
    """The k top-ranked negatives (highest score first), padded by repeating them in order when fewer exist.

    Returns [] when there is no usable negative (the caller decides what to do with such an example).
    """
    ranked = sorted((n for n in neg_doc if n.get("id") in known), key=lambda n: -float(n.get("score", 0.0)))
    ids = [n["id"] for n in ranked][:k]
    if not ids:
        return []
    return [ids[i % len(ids)] for i in range(k)]


def build_training_table(
    records: Sequence[dict[str, Any]], corpus: dict[str, dict[str, Any]], passages_per_query: int
) -> TrainingTable:
    """Prep records (one per question x positive) -> text columns. Passages are `passage_text(record)`."""
    if passages_per_query < 1:
        raise ValueError(f"passages_per_query must be >= 1, got {passages_per_query}")
    k = passages_per_query - 1
    cols: dict[str, list[str]] = {"anchor": [], "positive": [], **{f"negative_{i + 1}": [] for i in range(k)}}
    table = TrainingTable(columns=cols, examples=0, negatives_wanted=k)
    for n, rec in enumerate(records, 1):
        try:
            question, pos_id = rec["question"], rec["pos_doc"][0]["id"]
            neg_doc = rec.get("neg_doc") or []
        except (KeyError, IndexError, TypeError):
            raise FormatError(f"train record {n}: needs 'question', 'pos_doc': [{{'id': ...}}] and 'neg_doc'") from None
        if pos_id not in corpus:
            table.missing_passages += 1
            continue
        negatives = pick_negatives(neg_doc, k, corpus) if k else []
        if k and not negatives:
            table.no_negatives += 1
            continue
        if k and len({n["id"] for n in neg_doc if n.get("id") in corpus}) < k:
            table.padded += 1
        cols["anchor"].append(question)
        pos_text = rec["pos_doc"][0].get("text")  # set by sdg's positive_texts (inverse cloze without its sentence)
        cols["positive"].append(passage_text({**corpus[pos_id], "text": pos_text} if pos_text else corpus[pos_id]))
        for i, neg_id in enumerate(negatives):
            cols[f"negative_{i + 1}"].append(passage_text(corpus[neg_id]))
        table.examples += 1
    return table


def validation_queries(
    records: Sequence[dict[str, Any]], corpus: dict[str, Any]
) -> tuple[dict[str, str], dict[str, set[str]]]:
    """Unrolled val records -> (queries, relevant docs): grouping by source_id gives every positive of a question."""
    queries: dict[str, str] = {}
    relevant: dict[str, set[str]] = {}
    for rec in records:
        qid = str(rec.get("source_id") or rec["question_id"])
        queries[qid] = rec["question"]
        relevant.setdefault(qid, set()).update(p["id"] for p in rec.get("pos_doc", []) if p["id"] in corpus)
    keep = {q for q, docs in relevant.items() if docs}
    return {q: queries[q] for q in keep}, {q: relevant[q] for q in keep}


# --------------------------------------------------------------------------------------------- losses


class HardNegativeSoftmaxLoss(nn.Module):
    """The recipe's loss: cross-entropy of softmax(cos / T) over [positive, own hard negatives] only.

    No in-batch negatives, so each example's loss is independent of the rest of the batch: gradient
    accumulation over micro-batches is exactly equivalent to a large batch (the "cached" variant here).
    """

    def __init__(self, model: nn.Module, temperature: float = 0.02) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        self.model = model
        self.temperature = temperature

    def forward(self, sentence_features: list[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        from sentence_transformers.base.losses.merged_forward import embed_columns

        embeddings = embed_columns(self.model, sentence_features)
        return self.loss_from_embeddings(embeddings[0], embeddings[1:])

    def loss_from_embeddings(self, queries: Tensor, passages: Sequence[Tensor]) -> Tensor:
        """queries (B, d); passages: [positive (B, d), negative_1 (B, d), ...] -> mean cross-entropy."""
        if len(passages) < 2:
            raise ValueError("the hard-negatives-only loss needs at least one negative (passages_per_query >= 2)")
        q = F.normalize(queries, dim=-1)
        docs = F.normalize(torch.stack(list(passages), dim=1), dim=-1)  # (B, 1 + k, d)
        logits = torch.einsum("bd,bnd->bn", q, docs) / self.temperature
        target = torch.zeros(len(q), dtype=torch.long, device=q.device)  # the positive is column 0
        return F.cross_entropy(logits, target)

    @property
    def citation(self) -> str:
        return ""

    def get_config_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature}


def make_loss(model: Any, cfg: dict[str, Any], world_size: int, mini_batch_size: int) -> nn.Module:
    """The loss named by the params: in-batch negatives (MNRL, optionally GradCache) or the recipe's own-negatives."""
    scale = 1.0 / float(cfg["temperature"])
    if not cfg["in_batch_negatives"]:
        return HardNegativeSoftmaxLoss(model, temperature=float(cfg["temperature"]))
    gather = world_size > 1  # negatives from every device, not only this one's slice of the global batch
    if cfg.get("cached"):
        from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

        return CachedMultipleNegativesRankingLoss(
            model, scale=scale, mini_batch_size=mini_batch_size, gather_across_devices=gather
        )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    return MultipleNegativesRankingLoss(model, scale=scale, gather_across_devices=gather)


# --------------------------------------------------------------------------------------------- scaling


@dataclass
class Plan:
    """Batch and schedule actually used, after the small-data auto-scaling; printed and saved in metrics."""

    examples: int
    world_size: int
    global_batch: int
    per_device_batch: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    eval_steps: int
    warmup_steps: int
    auto_scaled: bool
    warnings: list[str] = field(default_factory=list)


def plan_training(n: int, cfg: dict[str, Any], world_size: int = 1) -> Plan:
    """The recipe's auto-scaling: under `small_data_threshold` examples, batch = max(16, min(64, n // 8));
    at least `min_checkpoints` evaluations/checkpoints per run, so validation frequency scales with run length."""
    if n < 1:
        raise ValueError("no training examples")
    auto = n < int(cfg["small_data_threshold"])
    batch = max(16, min(64, n // 8)) if auto else int(cfg["global_batch_size"])
    batch = max(world_size, min(batch, n))
    per_device = max(1, batch // world_size)
    accum = 1
    micro = int(cfg.get("mini_batch_size") or per_device)
    if cfg.get("cached") and not cfg["in_batch_negatives"] and micro < per_device:
        accum = math.ceil(per_device / micro)  # exact for the own-negatives loss (per-example independent)
        per_device = math.ceil(per_device / accum)
    global_batch = per_device * accum * world_size
    steps_per_epoch = math.ceil(n / global_batch)
    total = steps_per_epoch * int(cfg["epochs"])
    if cfg.get("max_steps"):
        total = min(total, int(cfg["max_steps"]))
    total = max(1, total)
    eval_steps = max(1, min(int(cfg["eval_steps"]), total // int(cfg["min_checkpoints"])))
    warmup = math.ceil(float(cfg["warmup_ratio"]) * total)
    plan = Plan(n, world_size, global_batch, per_device, accum, steps_per_epoch, total, eval_steps, warmup, auto)
    if total < 50:
        plan.warnings.append(
            f"only {total} optimizer steps: too few for a reliable fine-tune; add documents/questions or epochs"
        )
    return plan


# --------------------------------------------------------------------------------------------- environment


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def use_bf16(device: str, setting: Any) -> bool:
    """bf16 on CUDA when the card supports it (`auto`), never on CPU/MPS unless forced."""
    if setting in (True, "true", "on"):
        return True
    if setting in (False, "false", "off", None):
        return False
    return device == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def effective_params(cfg: dict[str, Any], device: str) -> dict[str, Any]:
    """The GPU profile is the section itself; on CPU the `cpu:` overrides are applied on top of it."""
    merged = {k: v for k, v in cfg.items() if k != "cpu"}
    if device == "cpu":
        merged.update(cfg.get("cpu") or {})
    return merged


# --------------------------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    base_ndcg10: float
    best_ndcg10: float
    best_step: int  # 0 = the base model was best (no checkpoint beat it)
    final_loss: float | None
    first_loss: float | None
    steps: int
    history: list[dict[str, Any]]
    regression: bool


def make_evaluator(queries: dict[str, str], corpus_texts: dict[str, str], relevant: dict[str, set[str]], prompts):
    """nDCG@10 (and friends) of the val questions over the training corpus, with the shared prompts."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    return InformationRetrievalEvaluator(
        queries=queries,
        corpus=corpus_texts,
        relevant_docs=relevant,
        name="val",
        ndcg_at_k=[10],
        mrr_at_k=[10],
        accuracy_at_k=[1, 5, 10],
        precision_recall_at_k=[10],
        map_at_k=[100],
        main_score_function="cosine",
        query_prompt=prompts["query"] or None,
        corpus_prompt=prompts["passage"] or None,
        write_csv=False,
        batch_size=64,
    )


def _dvclive_callback(live_dir: str | Path):
    """transformers' DVCLiveCallback, with dvclive's step set to the trainer's global step (so curves share an x axis)."""
    from dvclive import Live
    from transformers.integrations import DVCLiveCallback

    class StepAligned(DVCLiveCallback):
        def on_log(self, args, state, control, model=None, logs=None, **kwargs):
            if self.live is not None:
                self.live.step = state.global_step
            super().on_log(args, state, control, model=model, logs=logs, **kwargs)

    live = Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)
    return StepAligned(live=live), live


def train(
    model: Any,
    table: TrainingTable,
    evaluator: Any,
    cfg: dict[str, Any],
    plan: Plan,
    device: str,
    prompts: dict[str, str],
    checkpoint_dir: str | Path,
    live_dir: str | Path | None,
) -> TrainResult:
    """Evaluate the base model, train with checkpoints + validation every `plan.eval_steps`, load the best one."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from transformers.trainer_utils import set_seed

    set_seed(int(cfg["seed"]))
    dataset = Dataset.from_dict(table.columns)
    passage_columns = [c for c in table.columns if c != "anchor"]
    column_prompts = {"anchor": prompts["query"], **{c: prompts["passage"] for c in passage_columns}}
    column_prompts = {c: p for c, p in column_prompts.items() if p}
    loss = make_loss(model, cfg, plan.world_size, int(cfg.get("mini_batch_size") or plan.per_device_batch))
    distributed = plan.world_size > 1
    args = SentenceTransformerTrainingArguments(
        output_dir=str(checkpoint_dir),
        num_train_epochs=float(cfg["epochs"]),
        max_steps=plan.total_steps,
        per_device_train_batch_size=plan.per_device_batch,
        per_device_eval_batch_size=plan.per_device_batch,
        gradient_accumulation_steps=plan.grad_accum,
        learning_rate=float(cfg["learning_rate"]),
        warmup_steps=plan.warmup_steps,
        weight_decay=float(cfg["weight_decay"]),
        lr_scheduler_type="linear",
        bf16=use_bf16(device, cfg.get("bf16", "auto")),
        use_cpu=device == "cpu",
        seed=int(cfg["seed"]),
        data_seed=int(cfg["seed"]),
        full_determinism=device == "cpu",
        batch_sampler=BatchSamplers.NO_DUPLICATES if cfg["in_batch_negatives"] else BatchSamplers.BATCH_SAMPLER,
        prompts=column_prompts or None,
        eval_strategy="steps",
        eval_steps=plan.eval_steps,
        save_strategy="steps",
        save_steps=plan.eval_steps,
        save_total_limit=2,
        save_only_model=True,
        load_best_model_at_end=True,
        metric_for_best_model=f"eval_{METRIC}",
        greater_is_better=True,
        logging_steps=1 if plan.total_steps <= 200 else 10,
        logging_first_step=True,
        report_to="none",
        ddp_backend=("gloo" if device == "cpu" else "nccl") if distributed else None,
        dataloader_drop_last=distributed,
    )
    base = float(evaluator(model)[f"{METRIC}"])
    callbacks, live = [], None
    if live_dir is not None and is_main_process():
        callback, live = _dvclive_callback(live_dir)
        live.step = 0
        live.log_metric(f"eval/{METRIC}", base)
        callbacks.append(callback)
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=dataset, loss=loss, evaluator=evaluator, callbacks=callbacks
    )
    trainer.train()
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [(int(h["step"]), float(h[f"eval_{METRIC}"])) for h in history if f"eval_{METRIC}" in h]
    best_step, best = max(evals, key=lambda e: (e[1], -e[0])) if evals else (0, base)
    if trainer.state.best_model_checkpoint:
        best_step = int(str(trainer.state.best_model_checkpoint).rsplit("-", 1)[-1])
        best = float(trainer.state.best_metric)
    return TrainResult(
        base_ndcg10=base,
        best_ndcg10=best,
        best_step=best_step if best >= base else 0,
        final_loss=losses[-1] if losses else None,
        first_loss=losses[0] if losses else None,
        steps=int(trainer.state.global_step),
        history=history,
        regression=best < base,
    )


# --------------------------------------------------------------------------------------------- model card


def model_card(info: dict[str, Any]) -> str:
    """README.md for models/finetuned: what it is, how it was trained, how well it does, how to load it."""
    q, p = info["query_prompt"], info["passage_prompt"]
    params = "\n".join(f"| `{k}` | `{v}` |" for k, v in info["params"].items())
    val = info["validation"]
    return f"""---
library_name: sentence-transformers
pipeline_tag: sentence-similarity
base_model: {info["base_model"]}
tags: [sentence-transformers, embeddings, retrieval, embedpipe]
---

# {info["name"]}

A text-embedding model fine-tuned from **{info["base_model"]}** on synthetic question/passage pairs generated from
your own documents with hard negatives (the embedpipe `finetune` stage, following NVIDIA's embedding
fine-tuning recipe). Saved model: **{info["saved"]}**.

## Data
| | count |
|---|---|
| training examples (question x positive) | {info["examples"]} |
| validation questions | {info["val_queries"]} |
| corpus passages seen in training/validation | {info["corpus"]} |
| examples padded by repeating negatives | {info["padded"]} |

## Training
Contrastive loss `{info["loss"]}` with temperature {info["temperature"]}, 1 positive + {info["negatives"]} hard
negatives per query, {info["steps"]} steps, global batch {info["batch"]}, device `{info["device"]}`,
{info["wall_time_s"]:.0f} s.

| param | value |
|---|---|
{params}

## Validation (nDCG@10 over the training corpus)
| model | nDCG@10 |
|---|---|
| base ({info["base_model"]}) | {val["base"]:.4f} |
| best fine-tuned checkpoint (step {val["best_step"]}) | {val["finetuned"]:.4f} |

{info.get("note", "")}

## Usage
```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{info["path"]}")
q = model.encode(["how do I descale the kettle?"], prompt_name="query", normalize_embeddings=True)
d = model.encode(["Descale every 8 weeks ..."], prompt_name="passage", normalize_embeddings=True)
print(q @ d.T)
```
Prompts saved with the model: query `{q!r}`, passage `{p!r}` (embedpipe stages add them automatically).
"""


def write_model_card(folder: str | Path, info: dict[str, Any]) -> None:
    Path(folder, "README.md").write_text(model_card(info), encoding="utf-8")
