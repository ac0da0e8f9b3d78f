"""The finetune losses: the recipe's InfoNCE over [positive, own hard negatives] (`HardNegativeSoftmaxLoss`),
in-batch negatives (`MultipleNegativesRankingLoss`, optionally cached), the teacher's distillation losses
(sentence-transformers' `MarginMSELoss` / `DistillKLDivLoss`) and their sum; `make_loss` picks from
`finetune.loss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


DISTILL_LOSSES = {"margin_mse": "MarginMSELoss", "distill_kl": "DistillKLDivLoss"}
LOSSES = ("contrastive", "margin_mse", "distill_kl", "contrastive+margin_mse", "contrastive+distill_kl")


def check_params(cfg: dict[str, Any]) -> None:
    """Fail before any model is loaded on a loss, alpha or budget the stage cannot use."""
    kind = cfg.get("loss", "contrastive")
    if kind not in LOSSES:
        raise ValueError(f"finetune.loss must be one of {', '.join(LOSSES)}, got {kind!r}")
    if kind != "contrastive" and int(cfg["passages_per_query"]) < 2:
        raise ValueError(f"finetune.loss {kind} needs passages_per_query >= 2 (a positive and >= 1 candidate)")
    alphas = cfg.get("wise_alphas") or [1.0]
    if not isinstance(alphas, list) or any(not isinstance(a, int | float) or not 0 <= a <= 1 for a in alphas):
        raise ValueError(f"finetune.wise_alphas must be a list of numbers in [0, 1], got {alphas!r}")
    if float(cfg.get("max_minutes") or 0) < 0:
        raise ValueError("finetune.max_minutes must be >= 0 (0 = no budget)")
    if not 0 <= float(cfg.get("llm_share") or 0) < 1:
        raise ValueError(f"finetune.llm_share must be in [0, 1), got {cfg.get('llm_share')}")
    p = cfg.get("attention_dropout")
    if p is not None and (isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p < 1):
        raise ValueError(f"finetune.attention_dropout must be a number in [0, 1) or null, got {p!r}")


def needs_teacher(cfg: dict[str, Any]) -> bool:
    """Every loss but plain `contrastive` reads the teacher's scores (a `label` column) from prep's records."""
    return cfg.get("loss", "contrastive") != "contrastive"


def _contrastive_loss(model: Any, cfg: dict[str, Any], world_size: int, mini_batch_size: int) -> nn.Module:
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


def _distill_loss(model: Any, kind: str, cfg: dict[str, Any]) -> nn.Module:
    """sentence-transformers' own distillation losses; labels = teacher scores [positive, candidate_1..k]."""
    from sentence_transformers.sentence_transformer.losses import DistillKLDivLoss, MarginMSELoss

    if kind == "margin_mse":  # MSE between student and teacher margins sim(q, pos) - sim(q, cand_i)
        return MarginMSELoss(model)
    # KL(teacher softmax || student softmax) over [pos, cand_1..k]; one temperature for both sides: the
    # teacher and the student are both cosine models, with scores on the same scale.
    t = float(cfg.get("distill_temperature") or 0.05)
    return DistillKLDivLoss(model, temperature=t)


class ContrastivePlusDistillation(nn.Module):
    """contrastive + weight * distillation, from one forward pass (each column is embedded once)."""

    def __init__(self, model: Any, contrastive: nn.Module, distill: nn.Module, weight: float) -> None:
        super().__init__()
        self.model, self.contrastive, self.distill, self.weight = model, contrastive, distill, float(weight)

    def forward(self, sentence_features: list[dict[str, Tensor]], labels: Tensor) -> Tensor:
        from sentence_transformers.base.losses.merged_forward import embed_columns

        embeddings = embed_columns(self.model, sentence_features)
        return self.loss_from_embeddings(embeddings, labels)

    def loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor) -> Tensor:
        if isinstance(self.contrastive, HardNegativeSoftmaxLoss):
            contrastive = self.contrastive.loss_from_embeddings(embeddings[0], embeddings[1:])
        else:
            contrastive = self.contrastive.compute_loss_from_embeddings(embeddings, labels)
        return contrastive + self.weight * self.distill.compute_loss_from_embeddings(embeddings, labels)

    @property
    def citation(self) -> str:
        return ""

    def get_config_dict(self) -> dict[str, Any]:
        return {"distill": type(self.distill).__name__, "weight": self.weight}


def make_loss(model: Any, cfg: dict[str, Any], world_size: int, mini_batch_size: int) -> nn.Module:
    """The loss named by `finetune.loss`: contrastive (own or in-batch negatives), a teacher distillation loss,
    or their sum `contrastive+<distillation>` weighted by `distill_weight`."""
    kind = cfg.get("loss", "contrastive")
    if kind not in LOSSES:
        raise ValueError(f"finetune.loss must be one of {', '.join(LOSSES)}, got {kind!r}")
    if kind == "contrastive":
        return _contrastive_loss(model, cfg, world_size, mini_batch_size)
    if int(cfg["passages_per_query"]) < 2:
        raise ValueError(f"finetune.loss {kind} needs passages_per_query >= 2 (a positive and >= 1 candidate)")
    if kind in DISTILL_LOSSES:
        return _distill_loss(model, kind, cfg)
    if cfg["in_batch_negatives"] and cfg.get("cached"):
        raise ValueError(f"finetune.loss {kind} cannot be combined with cached (GradCache) in-batch negatives")
    contrastive = _contrastive_loss(model, cfg, world_size, mini_batch_size)
    distill = _distill_loss(model, kind.split("+", 1)[1], cfg)
    return ContrastivePlusDistillation(model, contrastive, distill, float(cfg.get("distill_weight", 1.0)))
