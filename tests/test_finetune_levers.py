"""finetune levers without a training run: bounded validation corpus, time budget, WiSE-FT interpolation on the real
MiniLM, teacher labels and the distillation losses against hand computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from finetune_helpers import VAL_QUESTIONS, write_prep

from embedpipe.core.embed_store import read_encode_log
from embedpipe.core.io import load_corpus, read_jsonl
from embedpipe.training.data import build_training_table, oversample_llm_questions, teacher_scored, validation_set
from embedpipe.training.losses import ContrastivePlusDistillation, HardNegativeSoftmaxLoss, check_params, make_loss
from embedpipe.training.trainer import (
    METRIC,
    TimeBudget,
    budget_schedule,
    choose_alpha,
    interpolate_state,
    make_evaluator,
    set_attention_dropout,
    use_bf16,
)

PROMPTS = {"query": "query: ", "passage": "passage: "}


@pytest.fixture(scope="module")
def prep(tmp_path_factory, tiny_corpus_path, minilm):
    return write_prep(tmp_path_factory.mktemp("prep"), tiny_corpus_path, minilm, negatives=2)


def test_validation_set_keeps_positives_and_negatives_and_fills_with_a_fixed_sample(prep):
    corpus = load_corpus(prep / "train_corpus.jsonl")
    records = read_jsonl(prep / "val.jsonl")
    positives = {p["id"] for r in records for p in r["pos_doc"]}
    negatives = {n["id"] for r in records for n in r["neg_doc"]} - positives
    val = validation_set(records, corpus, max_passages=len(positives) + len(negatives) + 3, seed=1)
    assert len(val.queries) == len(VAL_QUESTIONS)
    assert (val.positives, val.negatives, val.sampled) == (len(positives), len(negatives), 3)
    assert positives | negatives <= set(val.corpus) and len(val.corpus) == len(positives) + len(negatives) + 3
    assert val.describe()["corpus_passages"] == len(corpus) == 21
    assert validation_set(records, corpus, len(val.corpus), seed=1).corpus == val.corpus  # fixed sample
    tiny = validation_set(records, corpus, max_passages=2, seed=1)  # the cap never drops what is ranked
    assert set(tiny.corpus) == positives | negatives and tiny.sampled == 0
    assert len(validation_set(records, corpus, 0, seed=1).corpus) == 21  # 0 = whole corpus


def test_base_validation_vectors_come_from_the_store_once(prep, tmp_path, minilm, monkeypatch):
    from embedpipe.training.trainer import base_validation

    monkeypatch.setenv("EMBEDPIPE_EMBED_CACHE", str(tmp_path / "store"))
    val = validation_set(read_jsonl(prep / "val.jsonl"), load_corpus(prep / "train_corpus.jsonl"), 0, seed=1)
    evaluator = make_evaluator(val.queries, val.corpus, val.relevant, PROMPTS)
    first = base_validation(minilm, evaluator, PROMPTS)
    second = base_validation(minilm, evaluator, PROMPTS)
    log = read_encode_log(tmp_path / "store")
    assert [(e["requested"], e["encoded"]) for e in log] == [(21, 21), (21, 0)]
    assert first == pytest.approx(second, abs=1e-6)
    assert first == pytest.approx(evaluator(minilm)["val_cosine_ndcg@10"], abs=1e-4)  # same as encoding directly


def test_time_budget_stops_when_a_step_and_a_validation_no_longer_fit():
    now = [0.0]
    budget = TimeBudget(max_minutes=1.0, planned_steps=100, clock=lambda: now[0])
    budget.start = 0.0
    budget.step_s = [10.0]
    now[0] = 30.0
    assert not budget.should_stop(3, 100)  # 30 + 10 + 10 <= 60
    budget.eval_s = [25.0]
    assert budget.should_stop(3, 100)  # 30 + 10 + 25 > 60
    assert not budget.should_stop(100, 100)  # the last planned step: nothing to cut
    budget.stopped_at = 3
    report = budget.report(3)
    assert report["cut_by_budget"] and (report["steps_planned"], report["steps_taken"], report["steps_not_taken"]) == (100, 3, 97)
    assert not TimeBudget(0, 10).should_stop(1, 10)  # 0 = no budget


def test_schedule_decays_to_zero_where_the_budget_will_stop():
    now = [0.0]
    budget = TimeBudget(max_minutes=2.0, planned_steps=50, clock=lambda: now[0])
    assert budget.horizon(eval_steps=16) == 50  # nothing measured yet: the plan
    budget.step_s, budget._step_end = [10.0], 10.0  # one step of 10 s done at t = 10 s
    # 120 s budget: 110 s left, minus a last validation (timed like a step: 10 s) = 100 s; one step costs
    # 10 s + a sixteenth of a validation -> 9 more steps fit
    assert budget.horizon(eval_steps=16) == 10
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = budget_schedule(optimizer, warmup_ratio=0.05, horizon=lambda: budget.horizon(16))
    factors = [schedule.lr_lambdas[0](step) for step in range(11)]
    assert factors[0] == pytest.approx(0.5)  # warmup 1 step (5 % of 10): the first step already moves
    assert factors[1] == pytest.approx(1.0) and factors[9] == pytest.approx(1 / 9) and factors[10] == 0.0
    assert TimeBudget(0, 30).horizon(10) == 30  # no budget: the plan


def test_budget_callback_times_the_step_before_the_schedule_reads_the_horizon():
    """The Trainer calls on_optimizer_step, then lr_scheduler.step(), then on_step_end: the horizon the
    schedule reads after the first step must already use that step's measured time."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    now = [0.0]
    budget = TimeBudget(max_minutes=2.0, planned_steps=50, clock=lambda: now[0])
    callback, state, control = budget.callback(), TrainerState(), TrainerControl()
    args = TrainingArguments(output_dir="unused", report_to=[])
    state.max_steps = 50
    callback.on_train_begin(args, state, control)
    callback.on_step_begin(args, state, control)
    now[0] = 10.0
    callback.on_optimizer_step(args, state, control)
    assert budget.horizon(eval_steps=16) == 10  # what lr_scheduler.step() sees right after the first step
    state.global_step = 1
    callback.on_step_end(args, state, control)
    assert not control.should_training_stop and budget.step_s == [10.0]


def test_wise_interpolation_on_the_real_minilm(minilm):
    base = {k: v.clone() for k, v in minilm.state_dict().items()}
    tuned_model = copy.deepcopy(minilm)
    with torch.no_grad():
        for p in tuned_model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    tuned = tuned_model.state_dict()
    zero, one, half = (interpolate_state(base, tuned, a) for a in (0.0, 1.0, 0.5))
    floats = [k for k, v in base.items() if v.is_floating_point()]
    assert len(floats) > 90
    for k in floats:
        torch.testing.assert_close(zero[k], base[k], rtol=0, atol=0)
        torch.testing.assert_close(one[k], tuned[k], rtol=0, atol=0)
        torch.testing.assert_close(half[k], (base[k] + tuned[k]) / 2, rtol=1e-6, atol=1e-7)
    for k in set(base) - set(floats):  # integer buffers (position ids) are copied, not averaged
        assert torch.equal(half[k], tuned[k])
    tuned_model.load_state_dict(half)  # loadable as is
    with pytest.raises(ValueError, match="state dicts differ"):
        interpolate_state(base, {k: v for k, v in tuned.items() if k != floats[0]}, 0.5)


def test_choose_alpha_keeps_a_fixed_alpha_even_when_validation_prefers_the_fine_tuned_model():
    """wise_alphas [0.3]: the candidates are the base and alpha 0.3 only (alpha 1 is not one unless listed); the
    base still wins when it scores strictly better (the regression guard); [0.3, 1.0] picks by validation."""
    base_state = {"weight": torch.zeros(1, 1)}
    model = torch.nn.Linear(1, 1, bias=False)

    def evaluator(m):  # validation prefers weights close to 1 (the fine-tuned model): score = w
        return {METRIC: float(m.weight.item())}

    for alphas, base_score, want in (([0.3], 0.0, 0.3), ([0.3], 0.5, 0.0), ([0.3, 1.0], 0.0, 1.0)):
        with torch.no_grad():
            model.weight.fill_(1.0)  # the best checkpoint
        alpha, scores = choose_alpha(model, base_state, evaluator, alphas, base_score, tuned_score=1.0)
        assert alpha == want and set(scores) == {0.0, *alphas}
        assert model.weight.item() == pytest.approx(want)  # the chosen weights are loaded


def test_teacher_labels_follow_the_picked_negatives(tiny_corpus_path):
    corpus = load_corpus(tiny_corpus_path)
    ids = list(corpus)
    records = [
        {"question": "q1", "pos_doc": [{"id": ids[0], "score": 0.9, "teacher_score": 0.8}],
         "neg_doc": [{"id": ids[1], "score": 0.5, "teacher_score": 0.3}, {"id": ids[2], "score": 0.7, "teacher_score": 0.6}]},
        {"question": "q2", "pos_doc": [{"id": ids[3], "score": 0.9, "teacher_score": 0.7}],
         "neg_doc": [{"id": ids[4], "score": 0.5, "teacher_score": 0.1}]},  # padded: its one score repeated
        {"question": "q3", "pos_doc": [{"id": ids[5], "score": 0.9}], "neg_doc": [{"id": ids[6], "score": 0.5}]},
    ]  # fmt: skip
    table = build_training_table(records, corpus, passages_per_query=3, teacher_labels=True)
    assert table.columns["label"] == [[0.8, 0.6, 0.3], [0.7, 0.1, 0.1]]
    assert (table.examples, table.padded, table.no_teacher_scores) == (2, 1, 1)
    assert "label" not in build_training_table(records, corpus, 3).columns


def _cos(a, b):
    return float(torch.dot(a, b))


def test_distillation_losses_equal_hand_computation(minilm):
    torch.manual_seed(0)
    q, pos, n1, n2 = (torch.nn.functional.normalize(torch.randn(2, 6), dim=-1) for _ in range(4))
    labels = torch.tensor([[0.9, 0.5, 0.2], [0.6, 0.7, 0.1]])
    cfg = {"passages_per_query": 3, "temperature": 0.02, "in_batch_negatives": False, "distill_temperature": 0.1}

    mse = make_loss(minilm, {**cfg, "loss": "margin_mse"}, 1, 4).compute_loss_from_embeddings([q, pos, n1, n2], labels)
    expected = 0.0
    for b in range(2):
        s = [_cos(q[b], d[b]) for d in (pos, n1, n2)]
        for i in (1, 2):
            expected += ((s[0] - s[i]) - (labels[b, 0] - labels[b, i]).item()) ** 2 / 4
    assert mse.item() == pytest.approx(expected, rel=1e-5)

    t = 0.1
    kl = make_loss(minilm, {**cfg, "loss": "distill_kl"}, 1, 4).compute_loss_from_embeddings([q, pos, n1, n2], labels)
    expected_kl = 0.0
    for b in range(2):
        s = [_cos(q[b], d[b]) / t for d in (pos, n1, n2)]
        log_p_student = [x - math.log(sum(math.exp(y) for y in s)) for x in s]
        z = [v / t for v in labels[b].tolist()]
        p_teacher = [math.exp(x) / sum(math.exp(y) for y in z) for x in z]
        expected_kl += sum(p * (math.log(p) - lp) for p, lp in zip(p_teacher, log_p_student)) / 2
    assert kl.item() == pytest.approx(expected_kl * t * t, rel=1e-5)

    both = make_loss(minilm, {**cfg, "loss": "contrastive+distill_kl", "distill_weight": 0.5}, 1, 4)
    assert isinstance(both, ContrastivePlusDistillation)
    contrastive = HardNegativeSoftmaxLoss(minilm, 0.02).loss_from_embeddings(q, [pos, n1, n2])
    total = both.loss_from_embeddings([q, pos, n1, n2], labels)
    assert total.item() == pytest.approx(contrastive.item() + 0.5 * expected_kl * t * t, rel=1e-5)


def test_bad_params_fail_before_training():
    base = {"passages_per_query": 3}
    check_params({**base, "loss": "contrastive+margin_mse", "wise_alphas": [0.5, 1.0], "max_minutes": 5})
    with pytest.raises(ValueError, match="finetune.loss must be one of"):
        check_params({**base, "loss": "mse"})
    with pytest.raises(ValueError, match="passages_per_query >= 2"):
        check_params({"passages_per_query": 1, "loss": "margin_mse"})
    with pytest.raises(ValueError, match="wise_alphas"):
        check_params({**base, "wise_alphas": [1.5]})
    with pytest.raises(ValueError, match="max_minutes"):
        check_params({**base, "max_minutes": -1})
    with pytest.raises(ValueError, match="llm_share"):
        check_params({**base, "llm_share": 1.0})
    for bad in (1.0, -0.1, "0", True):
        with pytest.raises(ValueError, match="attention_dropout"):
            check_params({**base, "attention_dropout": bad})


def test_attention_dropout_off_leaves_the_hidden_dropout_and_really_stops_at_run_time(minilm):
    """finetune.attention_dropout 0: only the six attention-probability dropouts change; with the hidden dropouts
    also at 0, a train-mode forward then equals the eval-mode one (before, the attention dropout made them differ)."""
    model = copy.deepcopy(minilm)
    before = {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert set_attention_dropout(model, None) == 0
    assert set_attention_dropout(model, 0.0) == 6
    after = {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    changed = {n for n in before if after[n] != before[n]}
    assert len(changed) == 6 and all(n.endswith("attention.self.dropout") for n in changed)
    assert all(p == 0.1 for n, p in after.items() if n not in changed)  # hidden dropout kept

    features = model.tokenize(["How do I reset my password?", "Passwords are hashed with PBKDF2 by default."])

    def forward(m, train: bool) -> torch.Tensor:
        m.train(train)
        torch.manual_seed(0)
        with torch.no_grad():
            return m(dict(features))["sentence_embedding"]

    hidden_off = copy.deepcopy(minilm)
    for n, m in hidden_off.named_modules():
        if isinstance(m, torch.nn.Dropout) and not n.endswith("attention.self.dropout"):
            m.p = 0.0
    assert not torch.allclose(forward(hidden_off, True), forward(hidden_off, False), atol=1e-6)
    set_attention_dropout(hidden_off, 0.0)
    torch.testing.assert_close(forward(hidden_off, True), forward(hidden_off, False), rtol=1e-5, atol=1e-6)


def test_bf16_autocast_is_forced_on_cpu_only_by_request():
    assert use_bf16("cpu", True) and not use_bf16("cpu", "auto") and not use_bf16("cpu", False)
    assert not use_bf16("mps", "auto")


def test_validation_prefers_llm_questions_when_there_are_enough(prep):
    corpus = load_corpus(prep / "train_corpus.jsonl")
    records = read_jsonl(prep / "val.jsonl")
    for r in records[:2]:
        r["query_type"] = "inverse_cloze"
    n = len({r["source_id"] for r in records})
    val = validation_set(records, corpus, 0, seed=1, min_llm_questions=3)
    assert len(val.queries) == n - 2 and (val.llm_questions, val.inverse_cloze_left_out) == (n - 2, 2)
    assert not {r["source_id"] for r in records[:2]} & set(val.queries)
    too_few = validation_set(records, corpus, 0, seed=1, min_llm_questions=n)  # only n-2 LLM questions: keep all
    assert len(too_few.queries) == n and too_few.inverse_cloze_left_out == 0
    off = validation_set(records, corpus, 0, seed=1, min_llm_questions=0)
    assert len(off.queries) == n and off.describe()["llm_questions"] == n - 2


def test_llm_questions_are_repeated_up_to_their_share(prep, tiny_corpus_path):
    """2 LLM + 8 inverse-cloze records at share 0.5: each LLM record 4x (8 of 16); the table counts them."""
    llm = [{"question": f"What does setting {i} control?", "query_type": "contextual"} for i in range(2)]
    ict = [{"question": f"A sentence number {i} taken from its passage.", "query_type": "inverse_cloze"}
           for i in range(8)]
    records, repeats = oversample_llm_questions(llm + ict, 0.5)
    assert repeats == 4 and len(records) == 16
    assert sum(r["query_type"] != "inverse_cloze" for r in records) == 8 and records[:10] == llm + ict
    assert oversample_llm_questions(llm + ict, 0.0) == (llm + ict, 1)
    assert oversample_llm_questions(llm + ict, 0.2) == (llm + ict, 1)  # already 20 %
    assert oversample_llm_questions(ict, 0.5) == (ict, 1)  # nothing to repeat
    # with a distillation loss, only teacher-labelled records count (prep's teacher cap leaves the rest unlabelled)
    labelled = [{**r, "pos_doc": [{"id": "p", "teacher_score": 0.5}]} for r in llm + ict[:4]]
    kept, unscored = teacher_scored(labelled + [{**r, "pos_doc": [{"id": "p"}]} for r in ict[4:]])
    assert kept == labelled and unscored == 4
    corpus = load_corpus(prep / "train_corpus.jsonl")
    train = read_jsonl(prep / "train.jsonl")
    for r in train[1:]:
        r["query_type"] = "inverse_cloze"
    records, repeats = oversample_llm_questions(train, 0.5)
    table = build_training_table(records, corpus, 3)
    assert repeats == len(train) - 1 and table.llm_examples == repeats and table.examples == 2 * repeats
