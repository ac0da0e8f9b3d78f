"""Fine-tuning a bi-encoder on the prep stage's output (step 4 of the recipe).

The trainer side of the `finetune` stage: the small-data auto-scaling of the recipe (`plan_training`), the
CPU/GPU environment (bf16, attention dropout, ranks), the time budget and its schedule, the trainer setup
(sentence-transformers' `SentenceTransformerTrainer`), WiSE-FT interpolation with the base model, and the
outputs (metrics, model card). What it trains on comes from `embedpipe.training.data` (prep records -> the
training table and the validation set); the loss from `embedpipe.training.losses` (`finetune.loss`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from embedpipe.training.data import TrainingTable, ValidationSet
from embedpipe.training.losses import DISTILL_LOSSES, make_loss

METRIC = "val_cosine_ndcg@10"  # the evaluator's primary metric (name "val", cosine, nDCG@10)



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
    warmup_steps: int  # of the planned steps; a budget-cut run warms up over its horizon (budget_schedule)
    auto_scaled: bool
    warnings: list[str] = field(default_factory=list)


def warmup_steps(warmup_ratio: float, total_steps: int) -> int:
    """Linear-warmup length: `warmup_ratio` of the steps, rounded up (the planned run's and `budget_schedule`'s)."""
    return math.ceil(warmup_ratio * total_steps)


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
    warmup = warmup_steps(float(cfg["warmup_ratio"]), total)
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
    """bf16 autocast: `auto` = on CUDA cards that support it. On CPUs with AVX-512 BF16 / AMX `true` makes a MiniLM
    step ~1.4x faster (47-55 -> 35 s; ~3x, 16 s, with `attention_dropout: 0`), but `auto` leaves it off there: a
    faster step means more steps in the CPU time budget, and more steps lost on human queries (docs/quality.md)."""
    if setting in (True, "true", "on"):
        return True
    if setting in (False, "false", "off", None):
        return False
    return device == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def set_attention_dropout(model: nn.Module, p: float | None) -> int:
    """`finetune.attention_dropout`: the dropout rate on attention probabilities (None keeps the model's own).

    On CPU it costs more than the rest of a training step: MiniLM, batch 128 x 3 passages of 128 tokens, 47-55 s
    a step with it, 28 s without (bf16: 35 vs 16 s); the hidden-state dropout, which regularises like SimCSE's,
    stays. Changes the Dropout children of attention modules (BERT, MPNet, ... read their `p` at run time);
    returns how many.
    """
    if p is None:
        return 0
    changed = 0
    for module in model.modules():
        if "Attention" in type(module).__name__:
            for child in module.children():
                if isinstance(child, nn.Dropout):
                    child.p, changed = float(p), changed + 1
    return changed


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
    best_ndcg10: float  # best checkpoint (alpha = 1)
    best_step: int  # 0 = the base model was best (no checkpoint beat it)
    final_loss: float | None
    first_loss: float | None
    steps: int
    history: list[dict[str, Any]]
    regression: bool  # the saved model is the base model (alpha = 0): nothing beat it on validation
    alpha: float = 1.0  # weight of the fine-tuned model in the saved one (WiSE-FT); 0 = base, 1 = best checkpoint
    alpha_scores: dict[float, float] = field(default_factory=dict)  # val nDCG@10 per alpha tried
    budget: dict[str, Any] = field(default_factory=dict)  # TimeBudget.report()
    base_state: dict[str, Tensor] | None = field(default=None, repr=False)  # CPU copy of the base weights (WiSE-FT)

    @property
    def saved_ndcg10(self) -> float:
        return self.alpha_scores.get(self.alpha, self.best_ndcg10)

    @property
    def saved_model(self) -> str:
        return "base" if self.alpha == 0 else "finetuned" if self.alpha == 1 else "interpolated"


class TimeBudget:
    """A TrainerCallback that stops training cleanly before `max_minutes` of training-loop time is spent.

    It times every optimizer step and every validation; after each step it stops when one more step plus
    one more validation would not fit, and asks for a validation + checkpoint at that step so the last
    steps still compete for "best checkpoint". Without a budget (0) it only measures.
    `horizon()` predicts where the run will stop, so the learning-rate schedule (`budget_schedule`) decays to
    zero there instead of at a planned step the budget never reaches.
    """

    def __init__(self, max_minutes: float | None, planned_steps: int, clock: Any = time.monotonic) -> None:
        self.max_minutes = max(0.0, float(max_minutes or 0))
        self.budget_s = self.max_minutes * 60.0
        self.planned = planned_steps
        self.clock = clock
        self.step_s: list[float] = []
        self.eval_s: list[float] = []
        self.stopped_at: int | None = None
        self.start = self._step_start = self._step_end = 0.0

    def callback(self) -> Any:
        """The transformers TrainerCallback (built here so this module imports without transformers' trainer)."""
        from transformers import TrainerCallback

        budget = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                budget.start = budget._step_end = budget.clock()

            def on_step_begin(self, args, state, control, **kwargs):
                budget._step_start = budget.clock()

            def on_optimizer_step(self, args, state, control, **kwargs):
                # Timed here, not in on_step_end: the Trainer steps the learning-rate schedule between the
                # two, so the schedule's next `horizon()` already knows this step's time.
                budget._step_end = budget.clock()
                budget.step_s.append(budget._step_end - budget._step_start)

            def on_step_end(self, args, state, control, **kwargs):
                if budget.should_stop(state.global_step, state.max_steps):
                    budget.stopped_at = state.global_step
                    control.should_training_stop = True
                    control.should_evaluate = True
                    control.should_save = True
                return control

            def on_evaluate(self, args, state, control, **kwargs):
                budget.eval_s.append(budget.clock() - budget._step_end)

        return _Callback()

    def _measured_times(self) -> tuple[float, float]:
        """(seconds per step over the last 10 steps, seconds per validation; a step's time before the first one)."""
        recent = self.step_s[-10:]
        step_s = sum(recent) / len(recent)
        return step_s, sum(self.eval_s) / len(self.eval_s) if self.eval_s else step_s

    def should_stop(self, step: int, max_steps: int) -> bool:
        if not self.budget_s or step >= max_steps:
            return False
        step_s, eval_s = self._measured_times()
        elapsed = self.clock() - self.start
        stop = elapsed + step_s + eval_s > self.budget_s
        return _any_rank(stop)

    def horizon(self, eval_steps: int) -> int:
        """Optimizer steps this run will take: the planned ones, or fewer when the step and validation times
        measured so far say the budget ends first (a validation every `eval_steps` steps, and a last one)."""
        if not self.budget_s or not self.step_s:
            return self.planned
        step_s, eval_s = self._measured_times()
        done = len(self.step_s)
        left_s = self.budget_s - (self._step_end - self.start) - eval_s
        more = int(max(0.0, left_s) // (step_s + eval_s / max(1, eval_steps)))
        return max(done, min(self.planned, done + more))

    def report(self, steps_taken: int) -> dict[str, Any]:
        def mean(xs: list[float]) -> float | None:
            return round(sum(xs) / len(xs), 3) if xs else None

        return {
            "max_minutes": self.max_minutes,
            "steps_planned": self.planned,
            "steps_taken": steps_taken,
            "cut_by_budget": self.stopped_at is not None,
            "steps_not_taken": max(0, self.planned - steps_taken),
            "step_time_s_mean": mean(self.step_s),
            "validation_time_s_mean": mean(self.eval_s),
            "training_loop_s": round(self._step_end - self.start, 1) if self.step_s else 0.0,
        }


def budget_schedule(optimizer: torch.optim.Optimizer, warmup_ratio: float, horizon: Callable[[], int]) -> Any:
    """Linear warmup, then linear decay to zero at `horizon()` steps, re-read at every step.

    With a time budget the horizon is where the budget will stop the run (`TimeBudget.horizon`), so a CPU run
    cut from ~50 planned steps to ~10 still warms up briefly and anneals, instead of spending its few steps in a
    warmup sized for 50 and stopping at the peak rate. The first step already moves ((step + 1) / (warmup + 1)).
    """
    from torch.optim.lr_scheduler import LambdaLR

    def factor(step: int) -> float:
        total = max(1, horizon())
        warmup = warmup_steps(warmup_ratio, total)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return LambdaLR(optimizer, factor)


def _any_rank(flag: bool) -> bool:
    """Under torchrun every process must stop at the same step: stop when any of them runs out of time."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# --------------------------------------------------------------------------------------------- WiSE-FT


def interpolate_state(
    base: dict[str, Tensor], tuned: dict[str, Tensor], alpha: float
) -> dict[str, Tensor]:
    """WiSE-FT weights: tuned * alpha + base * (1 - alpha) for floating tensors; others (ids, counters) from tuned."""
    if set(base) != set(tuned):
        raise ValueError(f"state dicts differ: {sorted(set(base) ^ set(tuned))[:5]}")
    out = {}
    for name, t in tuned.items():
        b = base[name].to(t.device)
        out[name] = torch.lerp(b.to(t.dtype), t, float(alpha)) if t.is_floating_point() else t.clone()
    return out


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def choose_alpha(
    model: nn.Module,
    base_state: dict[str, Tensor],
    evaluator: Any,
    alphas: Sequence[float],
    base_score: float,
    tuned_score: float,
) -> tuple[float, dict[float, float]]:
    """Score fine-tuned*alpha + base*(1-alpha) on validation for each alpha, load the best into `model`.

    The candidates are the listed alphas and alpha = 0 (the base model, always: the regression guard); the base
    and alpha = 1 (the best checkpoint) are already scored, every other alpha is one validation. A list with one
    alpha besides 0/1, e.g. [0.3], fixes it: synthetic validation does not see what full fine-tuning forgets
    on human queries (docs/quality.md). Ties go to the larger alpha (closer to the fine-tuned model), so the
    base model is kept only when it is strictly better.
    """
    from embedpipe.core.embed_store import forget_fingerprint

    tuned_state = _cpu_state(model)
    candidates = {float(a) for a in alphas}
    scores: dict[float, float] = {0.0: base_score} | ({1.0: tuned_score} if 1.0 in candidates else {})
    for alpha in sorted(candidates - {0.0, 1.0}):
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"finetune.wise_alphas must lie in [0, 1], got {alpha}")
        model.load_state_dict(interpolate_state(base_state, tuned_state, alpha))
        forget_fingerprint(model)
        scores[alpha] = float(evaluator(model)[METRIC])
    best = max(scores, key=lambda a: (scores[a], a))
    model.load_state_dict(interpolate_state(base_state, tuned_state, best))
    forget_fingerprint(model)
    return best, dict(sorted(scores.items()))


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


def base_validation(model: Any, evaluator: Any, prompts: dict[str, str]) -> float:
    """Validation nDCG@10 of the untrained model, its corpus vectors through the embedding store.

    The base model's vectors of the val sub-corpus are the same in every run (and the same ones prep and eval
    use), so they are encoded once; the model under training changes at every checkpoint and is never stored.
    """
    from embedpipe.core.embed_store import encode_cached, forget_fingerprint

    vectors = encode_cached(model, evaluator.corpus, prompts["passage"], desc="validation corpus", batch_size=64)
    forget_fingerprint(model)  # the weights are about to change in place
    return float(evaluator(model, corpus_embeddings=torch.from_numpy(vectors))[METRIC])


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
    """Evaluate the base model, train with checkpoints + validation every `plan.eval_steps` within the time
    budget (`max_minutes`), load the best checkpoint (then `apply_wise` interpolates it with the base weights)."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from transformers.trainer_utils import set_seed

    set_seed(int(cfg["seed"]))
    dataset = Dataset.from_dict(table.columns)
    passage_columns = [c for c in table.columns if c not in ("anchor", "label")]
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
        weight_decay=float(cfg["weight_decay"]),  # learning-rate schedule: budget_schedule (warmup_ratio)
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
    base_state = _cpu_state(model)
    base = base_validation(model, evaluator, prompts)
    budget = TimeBudget(cfg.get("max_minutes"), plan.total_steps)
    callbacks, live = [budget.callback()], None
    if live_dir is not None and is_main_process():
        callback, live = _dvclive_callback(live_dir)
        live.step = 0
        live.log_metric(f"eval/{METRIC}", base)
        callbacks.append(callback)

    class BudgetTrainer(SentenceTransformerTrainer):
        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if self.lr_scheduler is None:
                self.lr_scheduler = budget_schedule(optimizer or self.optimizer, float(cfg["warmup_ratio"]),
                                                    lambda: budget.horizon(plan.eval_steps))
                self._created_lr_scheduler = True
            return self.lr_scheduler

    trainer = BudgetTrainer(
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
    steps = int(trainer.state.global_step)
    return TrainResult(
        base_ndcg10=base,
        best_ndcg10=best,
        best_step=best_step if best >= base else 0,
        final_loss=losses[-1] if losses else None,
        first_loss=losses[0] if losses else None,
        steps=steps,
        history=history,
        regression=best < base,
        alpha=1.0 if best >= base else 0.0,
        alpha_scores={0.0: base, 1.0: best},
        budget=budget.report(steps),
        base_state=base_state,
    )


def apply_wise(model: Any, result: TrainResult, evaluator: Any, alphas: Sequence[float]) -> TrainResult:
    """After `train`: interpolate the best checkpoint with the base weights, keep the best alpha on validation
    (loaded into `model`), and record it; alpha = 0 (the base model winning) is the regression guard."""
    if not result.steps or result.base_state is None:
        return result
    alpha, scores = choose_alpha(model, result.base_state, evaluator, alphas or [1.0], result.base_ndcg10,
                                 result.best_ndcg10)
    result.alpha, result.alpha_scores, result.regression = alpha, scores, alpha == 0.0
    result.base_state = None  # free the copy
    return result


# --------------------------------------------------------------------------------------------- outputs


def loss_description(cfg: dict[str, Any]) -> str:
    kind = cfg.get("loss", "contrastive")
    contrastive = ("MultipleNegativesRankingLoss (in-batch + hard negatives)" if cfg["in_batch_negatives"]
                   else "softmax over [positive, own hard negatives]")
    if kind == "contrastive":
        return contrastive
    if kind in DISTILL_LOSSES:
        return f"{DISTILL_LOSSES[kind]} on the teacher's scores"
    head, _, tail = kind.partition("+")
    return f"{contrastive} + {cfg.get('distill_weight', 1.0)} x {DISTILL_LOSSES[tail]} on the teacher's scores"


def regression_note(result: TrainResult) -> str:
    if result.regression:
        return (f"REGRESSION: the best fine-tuned checkpoint scores nDCG@10 {result.best_ndcg10:.4f} on validation, "
                f"below the base model's {result.base_ndcg10:.4f} (and no interpolation beat it); the base model was "
                "saved instead.")
    if result.saved_ndcg10 == result.base_ndcg10:
        return "No improvement on validation nDCG@10 over the base model (tie); the fine-tuned model was saved."
    return ""


def run_outputs(
    *, result: TrainResult, table: TrainingTable, val: ValidationSet, plan: Plan, cfg: dict[str, Any],
    seq: int, device: str, profile: str, base_model: str, prompts: dict[str, str], out: Path, wall: float,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(metrics/train.json, model card info, summary rows) of a finished run: one place that says what ran."""
    saved = {"base": "base model (nothing beat it on validation)", "finetuned": "best fine-tuned checkpoint",
             "interpolated": f"best checkpoint x {result.alpha} + base x {1 - result.alpha:g} (WiSE-FT)"}[result.saved_model]
    budget = result.budget
    alpha_scores = {f"{a:g}": round(v, 5) for a, v in result.alpha_scores.items()}
    shown = ["passages_per_query", "temperature", "in_batch_negatives", "cached", "learning_rate", "epochs",
             "warmup_ratio", "weight_decay", "seed", "loss", "max_minutes", "val_max_passages", "wise_alphas", "llm_share",
             "attention_dropout"]  # fmt: skip
    bf16 = use_bf16(device.split(":")[0], cfg.get("bf16", "auto"))
    card = {
        "name": out.name, "path": str(out), "base_model": base_model, "saved": saved, "examples": table.examples,
        "val_queries": len(val.queries), "corpus": val.corpus_total, "val_corpus": len(val.corpus),
        "padded": table.padded, "loss": loss_description(cfg), "temperature": cfg["temperature"],
        "negatives": table.negatives_wanted, "steps": result.steps, "batch": plan.global_batch, "device": device,
        "wall_time_s": wall, "params": {**{k: cfg.get(k) for k in shown}, "max_seq_length": seq},
        "validation": {"base": result.base_ndcg10, "finetuned": result.best_ndcg10, "best_step": result.best_step,
                       "alpha": result.alpha, "alpha_scores": alpha_scores, "saved": result.saved_ndcg10},
        "note": regression_note(result), "query_prompt": prompts["query"], "passage_prompt": prompts["passage"],
    }
    metrics = {
        "examples": table.examples,
        "val_queries": len(val.queries),
        "corpus_passages": val.corpus_total,
        "val_corpus": val.describe(),
        "llm_examples": table.llm_examples,
        "llm_repeats": table.llm_repeats,
        "padded_examples": table.padded,
        "dropped_examples": table.missing_passages + table.no_negatives,
        "steps": result.steps,
        "steps_planned": plan.total_steps,
        "budget": budget,
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
        "loss": cfg.get("loss", "contrastive"),
        "device": device,
        "bf16": bf16,
        "attention_dropout": cfg.get("attention_dropout"),
        "profile": profile,
        "first_loss": result.first_loss,
        "final_loss": result.final_loss,
        "best_step": result.best_step,
        "val_ndcg@10_base": round(result.base_ndcg10, 5),
        "val_ndcg@10_finetuned": round(result.best_ndcg10, 5),
        "wise_alpha": result.alpha,
        "val_ndcg@10_by_alpha": alpha_scores,
        "val_ndcg@10_saved": round(result.saved_ndcg10, 5),
        "val_ndcg@10_delta": round(result.saved_ndcg10 - result.base_ndcg10, 5),
        "regression": result.regression,
        "saved_model": result.saved_model,
        "wall_time_s": round(wall, 1),
    }
    steps = f"{result.steps} of {plan.total_steps} planned"
    if budget.get("cut_by_budget"):
        steps += f" (cut by the {budget['max_minutes']:g}-min budget: {budget['steps_not_taken']} not taken)"
    rows = {
        "examples": table.examples,
        "LLM-written examples": f"{table.llm_examples} ({table.llm_repeats}x each)" if table.llm_repeats > 1
        else table.llm_examples,
        "val questions / passages": f"{len(val.queries)} ({val.llm_questions} LLM"
        + (f", {val.inverse_cloze_left_out} inverse-cloze left out" if val.inverse_cloze_left_out else "")
        + f") / {len(val.corpus)} of {val.corpus_total}",
        "device / processes": f"{device}{' (bf16 autocast)' if bf16 else ''} / {plan.world_size}",
        "batch (auto-scaled)" if plan.auto_scaled else "batch": plan.global_batch,
        "loss": cfg.get("loss", "contrastive"),
        "steps": steps,
        "step time (s)": budget.get("step_time_s_mean"),
        "loss first -> last": f"{result.first_loss:.4f} -> {result.final_loss:.4f}"
        if result.first_loss is not None else "-",
        "val nDCG@10 base": result.base_ndcg10,
        "val nDCG@10 best checkpoint": result.best_ndcg10,
        "best step": result.best_step,
        "val nDCG@10 by alpha": ", ".join(f"{a}: {v:.4f}" for a, v in alpha_scores.items()),
        "saved": f"{out} ({saved}, val nDCG@10 {result.saved_ndcg10:.4f})",
        "wall time (s)": round(wall, 1),
    }
    return metrics, card, rows


# --------------------------------------------------------------------------------------------- model card


def model_card(info: dict[str, Any]) -> str:
    """README.md for models/finetuned: what it is, how it was trained, how well it does, how to load it."""
    q, p = info["query_prompt"], info["passage_prompt"]
    params = "\n".join(f"| `{k}` | `{v}` |" for k, v in info["params"].items())
    val = info["validation"]
    alpha_rows = "".join(f"| interpolated, alpha {a} (WiSE-FT) | {v:.4f} |\n"
                         for a, v in val.get("alpha_scores", {}).items() if a not in ("0", "1"))
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
Loss `{info["loss"]}` with temperature {info["temperature"]}, 1 positive + {info["negatives"]} hard
negatives per query, {info["steps"]} steps, global batch {info["batch"]}, device `{info["device"]}`,
{info["wall_time_s"]:.0f} s.

| param | value |
|---|---|
{params}

## Validation (nDCG@10 of the val questions)
| model | nDCG@10 |
|---|---|
| base ({info["base_model"]}) | {val["base"]:.4f} |
| best fine-tuned checkpoint (step {val["best_step"]}) | {val["finetuned"]:.4f} |
{alpha_rows}| **saved** (fine-tuned x {val["alpha"]:g} + base x {1 - val["alpha"]:g}) | **{val["saved"]:.4f}** |

Validation corpus: {info["val_corpus"]} of {info["corpus"]} passages (the val questions' positives and mined
negatives plus a fixed random sample).

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
