"""The SDG gates over candidate pairs, cheapest first: junk -> context -> dedup -> retrieval consistency ->
LLM judge, then the inverse-cloze cap.

`CandidatePool` holds the pairs still in the running; each gate drops some, appends them to `rejected` with
its reason (data/sdg/rejected.jsonl) and counts them in `removed` (metrics/sdg.json `removed_by_gate`). The
text rules themselves are pure functions in `embedpipe.sdg.rules`; this module applies them in order.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedpipe.core.console import progress
from embedpipe.core.io import LLM_FREE_QUERY_TYPES, passage_text
from embedpipe.core.retrieval import search
from embedpipe.sdg import rules as sdg
from embedpipe.sdg.jobs import failure_kind, judge
from embedpipe.sdg.llm import LLMClient


def is_inverse_cloze(pair: dict[str, Any]) -> bool:
    return pair["generator"] == "inverse_cloze"


def is_llm_free(pair: dict[str, Any]) -> bool:
    """Inverse cloze, heading and anchor pairs: no LLM wrote them, so the context gate and the judge skip them."""
    return pair["generator"] in LLM_FREE_QUERY_TYPES


@dataclass
class CandidatePool:
    candidates: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    removed: dict[str, int] = field(default_factory=dict)

    def drop(self, keep: list[bool], gate: str, reasons: list[str] | None = None) -> None:
        """Keep the candidates where `keep` is true; the rest go to `rejected` as '<gate>: <reason>'."""
        self.removed[gate] = self.removed.get(gate, 0) + keep.count(False)
        for n, (c, k) in enumerate(zip(self.candidates, keep, strict=True)):
            if not k:
                slim = {key: v for key, v in c.items() if key not in ("positive_texts", "positive_titles")}
                self.rejected.append({**slim, "reason": f"{gate}: {reasons[n]}" if reasons else gate})
        self.candidates = [c for c, k in zip(self.candidates, keep, strict=True) if k]

    def llm_pairs(self) -> int:
        return sum(not is_llm_free(c) for c in self.candidates)

    def text_gates(self, corpus: dict[str, dict], gates: dict[str, Any]) -> None:
        """junk, then context (LLM questions that point at "this module" instead of naming it); idempotent."""
        def texts(c: dict[str, Any]) -> list[str]:
            return [passage_text(corpus[i]) for i in c["segment_ids"]]

        if gates["junk"]["enabled"]:
            reasons = [sdg.junk_reason(c, texts(c), gates["junk"]) for c in self.candidates]
            self.drop([r is None for r in reasons], "junk", [r or "" for r in reasons])
        ctx_cfg = gates.get("context") or {"enabled": False}
        if ctx_cfg.get("enabled", True):
            grounding = bool(ctx_cfg.get("grounding", True))
            reasons = [None if is_llm_free(c) else sdg.context_reason(c["question"], texts(c), grounding)
                       for c in self.candidates]
            self.drop([r is None for r in reasons], "context", [r or "" for r in reasons])

    def dedup(self, q_emb: np.ndarray, threshold: float) -> np.ndarray:
        """Drop a question whose cosine to an earlier kept one exceeds `threshold`; returns the kept rows."""
        if not self.candidates:
            return q_emb
        mask = sdg.dedup_mask(q_emb, threshold)
        self.drop(mask.tolist(), "dedup")
        return q_emb[mask]

    def retrieval(self, q_emb: np.ndarray, corpus_emb: np.ndarray, row: dict[str, int], k: int) -> None:
        """Retrieval consistency: keep a pair only if the base embedder ranks one of its passages in its top k."""
        if not self.candidates:
            return
        _, top = search(q_emb, corpus_emb, k)
        keep = [any(row[s] in set(t.tolist()) for s in c["segment_ids"])
                for c, t in zip(self.candidates, top, strict=True)]
        self.drop(keep, "retrieval", [f"no positive in base-embedder top-{k}"] * len(self.candidates))

    def judge(self, client: LLMClient, corpus: dict[str, dict], jcfg: dict[str, Any], failures: Counter) -> int:
        """The LLM judge on the LLM pairs (inverse-cloze, heading and anchor pairs have no answer to judge). A pair the time budget
        leaves unjudged is dropped. Returns how many were not judged for the budget."""
        judged = [n for n, c in enumerate(self.candidates) if not is_llm_free(c)]
        if not judged:
            return 0
        keep = [True] * len(self.candidates)
        reasons = [""] * len(self.candidates)
        not_run = 0
        with progress(len(judged), "sdg judge", unit="req") as bar:
            for n, res in client.map(lambda m: judge(client, corpus, self.candidates[m]), judged, progress=bar):
                m = judged[n]
                c = self.candidates[m]
                if res.not_run:
                    not_run += 1
                    keep[m], reasons[m] = False, "not judged: sdg.llm.time_budget_s spent"
                    continue
                if not res.ok:
                    failures["judge:" + failure_kind(res.error)] += 1
                    keep[m], reasons[m] = False, f"judge failed: {res.error}"
                    continue
                c["scores"] = {k: v for k, v in res.value.items() if k != "justification"}
                c["quality_score"] = float(res.value["overall"])
                if res.value.get("justification"):
                    c["judge_justification"] = res.value["justification"]
                if not sdg.judge_passes(res.value, float(jcfg["threshold"]), jcfg.get("floors") or {}):
                    keep[m] = False
                    reasons[m] = "scores " + " ".join(f"{k}={v}" for k, v in c["scores"].items())
        self.drop(keep, "judge", reasons)
        return not_run

    def cap_inverse_cloze(self, cap: int, max_share: Any) -> None:
        """At most `cap` inverse-cloze pairs (exactly `max_share` of the accepted ones); candidates are in
        spread order, so the first ones are kept."""
        seen, keep = 0, []
        for c in self.candidates:
            seen += is_inverse_cloze(c)
            keep.append(not is_inverse_cloze(c) or seen <= cap)
        self.drop(keep, "inverse_cloze_cap", [f"over max_share {max_share} of accepted pairs"] * len(keep))

    def cap_generator(self, generator: str, max_share: float) -> None:
        """At most `max_share` of the accepted pairs from `generator` (a heading or anchor generator), the others
        as they are; candidates are in a seeded spread order, so the first ones are kept. No cap at 1."""
        mine = sum(c["generator"] == generator for c in self.candidates)
        cap = sdg.cap_share(len(self.candidates) - mine, max_share)
        if cap is None or mine <= cap:
            return
        seen, keep = 0, []
        for c in self.candidates:
            seen += c["generator"] == generator
            keep.append(c["generator"] != generator or seen <= cap)
        self.drop(keep, f"{generator}_cap", [f"over max_share {max_share} of accepted pairs"] * len(keep))
