"""Heading and anchor pairs (embedpipe/sdg/structure.py): what the parser and chunker keep, which anchors resolve
and which are filtered, headings never left in their positive, and the counts in the sdg stage's metrics."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from embedpipe.core.io import passage_text, positive_passage_text, read_json, read_jsonl, write_jsonl
from embedpipe.documents.chunking import chunk_document, merge_duplicate
from embedpipe.documents.reading import read_document
from embedpipe.sdg.structure import (
    anchor_reason,
    anchor_records,
    definition_records,
    heading_reason,
    heading_records,
)
from tests.sdg_helpers import write_params

REPO = Path(__file__).resolve().parents[1]
FILLER = ("The broker keeps every message until a worker acknowledges it, and the result backend stores the "
          "state of each task so that the caller can wait for it or poll it later on.")

DOCS = {
    "guide.md": f"""# Task queue guide

{FILLER}

See [Configuring automatic retries](#retries) for the policy, or [here](#retries). Read [periodic task
schedules](sched.md#periodic-task-schedules) and [the vanished chapter](sched.md#no-such-id), the
[worker reference manual](ref.rst), and [2.1](sched.md).

<a id="retries"></a>
## Configuring automatic retries

Tasks that fail with a transient error are sent again after a delay that grows with each attempt, up to a
maximum count; a task that still fails then is marked failed. Jump back to [automatic retry delays](#retries).

## Examples

{FILLER}

## foo.bar()

{FILLER}
""",
    "sched.md": f"""# Scheduling

Short intro.

## Periodic task schedules

Beat sends tasks at fixed intervals or at the times of a crontab entry; each entry names the task, its
arguments and the schedule. {FILLER} Back to the [task queue guide](guide.md).
""",
    "ref.rst": f"""Worker reference
================

The worker runs tasks, see :ref:`retry settings for workers <retry-settings>`, :func:`worker.start_consumer`
and :doc:`the scheduling guide <sched>`. {FILLER}

.. _retry-settings:

Retry settings for workers
--------------------------

The worker reads its retry limits from the configuration when it starts, and applies them to every task
that does not set its own. {FILLER}

.. function:: worker.start_consumer(queue)

   Starts consuming messages from the queue named by the argument and blocks until the worker stops.
""",
    "monitor.html": f"""<html><head><title>Monitoring guide</title></head><body>
<h1>Monitoring guide</h1>
<p>{FILLER} Watch <a href="#events">worker events as they happen</a>, or read about
<a href="sched.md#periodic-task-schedules">crontab schedules in beat</a> and <a href="https://example.com/x">an
external page</a>.</p>
<section id="events"><h2>Watching worker events live</h2>
<p>The events command prints every task state change that the workers send, as it happens. {FILLER}</p>
</section></body></html>""",
}


def words(text: str) -> int:
    return len(text.split())


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, dict]:
    docs = tmp_path / "docs"
    docs.mkdir()
    out: dict[str, dict] = {}
    for name, text in DOCS.items():
        (docs / name).write_text(text)
        doc = read_document(docs / name, docs, 10**6)
        for rec in chunk_document(doc, words, target_tokens=60, overlap_tokens=10, min_tokens=20):
            out[rec["_id"]] = rec
    return out


def by_title(corpus: dict[str, dict], title: str) -> str:
    return next(pid for pid, r in corpus.items() if r["title"] == title)


def test_parser_and_chunker_keep_links_ids_and_sections(corpus):
    links = {(link["text"], link["target"]) for r in corpus.values() for link in r["structure"]["links"]}
    assert ("Configuring automatic retries", "guide.md#retries") in links  # "#id" resolved against its page
    assert ("periodic task schedules", "sched.md#periodic-task-schedules") in links
    assert ("retry settings for workers", "ref:retry-settings") in links  # Sphinx roles keep their target
    assert ("worker.start_consumer", "obj:worker.start_consumer") in links
    assert ("the scheduling guide", "doc:sched") in links
    assert ("worker events as they happen", "monitor.html#events") in links  # HTML <a href>
    assert not any("example.com" in t for _, t in links)  # external links are not cross-references
    ids = {(r["doc"], e["id"]) for r in corpus.values() for e in r["structure"]["ids"]}
    assert {("guide.md", "retries"), ("guide.md", "configuring-automatic-retries"), ("ref.rst", "retry-settings"),
            ("ref.rst", "obj:worker.start_consumer"), ("monitor.html", "events")} <= ids
    guide = next(r for r in corpus.values() if r["doc"] == "guide.md" and r["position"] == 0)
    assert guide["structure"]["links"][0]["sentence"].startswith("See Configuring automatic retries")
    sched = next(r for r in corpus.values() if r["doc"] == "sched.md")  # the short intro runs into the next section
    assert [s["path"][-1] for s in sched["structure"]["sections"]] == ["Scheduling", "Periodic task schedules"]
    assert "\nPeriodic task schedules:\n" in sched["text"]


def test_anchor_pairs_resolve_filter_and_count_missing_sections(corpus):
    records, stats = anchor_records(corpus, {"min_words": 2, "max_words": 16, "api_names": True})
    pairs = {r["question"]: r for r in records}
    retries = by_title(corpus, "Task queue guide > Configuring automatic retries")
    assert pairs["Configuring automatic retries"]["segment_ids"] == [retries]
    assert pairs["retry settings for workers"]["segment_ids"] == [by_title(corpus, "Worker reference > Retry settings for workers")]
    assert corpus[pairs["worker.start_consumer"]["segment_ids"][0]]["doc"] == "ref.rst"  # :func: -> its signature
    assert corpus[pairs["the scheduling guide"]["segment_ids"][0]]["doc"] == "sched.md"  # :doc: -> the page
    assert corpus[pairs["worker reference manual"]["segment_ids"][0]]["doc"] == "ref.rst"  # page link, other suffix
    assert corpus[pairs["crontab schedules in beat"]["segment_ids"][0]]["doc"] == "sched.md"
    assert {r["generator"] for r in records} == {"anchors"}
    # left out, each counted: "here", a version number, a link inside the section it points to, a missing section
    assert "here" not in pairs and "2.1" not in pairs and "automatic retry delays" not in pairs
    assert stats.filtered["functional anchor"] == 1
    assert stats.filtered["version number"] == 1
    assert stats.filtered["inside its own target"] >= 1
    assert stats.unresolved == {"missing section": 1}  # [the vanished chapter](sched.md#no-such-id)
    assert "the vanished chapter" not in pairs
    # the anchor repeats the target's heading: the heading leaves the positive
    positive = pairs["Configuring automatic retries"]
    assert positive["positive_titles"] == {retries: "Task queue guide"}
    assert stats.as_dict()["pairs"] == len(records)


def test_anchor_text_filters():
    assert anchor_reason("here", 2, 16, True) == "functional anchor"
    assert anchor_reason("this section", 2, 16, True) == "functional anchor"
    assert anchor_reason("See below", 2, 16, True) == "functional anchor"
    assert anchor_reason("3.10.2", 2, 16, True) == "version number"
    assert anchor_reason("§", 2, 16, True) == "punctuation"
    assert anchor_reason("imports", 2, 16, True) == "too few words"
    assert anchor_reason("broker_connection_timeout", 2, 16, True) is None  # a descriptive API name
    assert anchor_reason("broker_connection_timeout", 2, 16, False) == "too few words"
    assert anchor_reason("Session.merge()", 2, 16, True) is None
    assert anchor_reason("task states", 2, 16, True) is None


def test_heading_filters():
    assert heading_reason("Configuring automatic retries", 3, 16) is None
    assert heading_reason("3.2 Dealing with hot journals", 3, 16) is None
    assert heading_reason("When to use this procedure", 3, 16) == "points at its context"
    for generic in ("Example", "Notes", "Parameters", "See also", "Changelog", "foo.bar()", "Version 2.1",
                    "2.0.1", "proj/tasks.py", "Task states"):
        assert heading_reason(generic, 3, 16) is not None, generic


def test_heading_pairs_never_keep_their_heading_in_the_positive(corpus):
    records, stats = heading_records(corpus, {"min_words": 3, "max_words": 16, "max_positives": 3,
                                              "min_positive_words": 12})
    pairs = {r["question"]: r for r in records}
    assert {"Configuring automatic retries", "Periodic task schedules", "Retry settings for workers",
            "Watching worker events live", "Task queue guide"} <= set(pairs)
    assert not {"Examples", "foo.bar()", "Scheduling"} & set(pairs)  # generic, an API name, one word
    assert stats.filtered["generic heading"] == 1 and stats.filtered["API name or one token"] >= 1
    for rec in records:
        heading = rec["heading_path"][-1]
        for pid in rec["segment_ids"]:
            pos = {"id": pid, "text": (rec.get("positive_texts") or {}).get(pid),
                   "title": (rec.get("positive_titles") or {}).get(pid)}
            seen = positive_passage_text(corpus[pid], pos)  # what training shows the model
            assert heading not in (pos["title"] if pos["title"] is not None else corpus[pid]["title"]).split(" > ")
            assert heading + ":" not in seen.split("\n"), (heading, seen)
            assert heading not in seen, (heading, seen)  # the test documents never repeat a heading in prose
    # the section that starts inside the previous passage: its `Heading:` line is cut out of the text
    sched = pairs["Periodic task schedules"]
    pid = sched["segment_ids"][0]
    assert "Periodic task schedules:" in corpus[pid]["text"]
    assert sched["positive_texts"][pid] == corpus[pid]["text"].replace("\nPeriodic task schedules:", "")
    # the positive keeps the page title minus the heading
    retries = pairs["Configuring automatic retries"]
    assert retries["positive_titles"] == {retries["segment_ids"][0]: "Task queue guide"}
    assert passage_text(corpus[retries["segment_ids"][0]]).startswith("Task queue guide > Configuring")


def test_duplicate_passages_keep_their_ids():
    kept = {"doc": "a.md", "position": 3, "structure": {"sections": [{"path": ["A"]}], "ids": [], "links": []}}
    dup = {"doc": "b.md", "position": 0, "structure": {"sections": [{"path": ["A"]}],
                                                      "ids": [{"id": "x", "section": 0, "heading": True}], "links": []}}
    merge_duplicate(kept, dup)
    assert {(e.get("doc"), e["id"]) for e in kept["structure"]["ids"]} == {("b.md", "x"), ("b.md", "")}


def load_stage():
    spec = importlib.util.spec_from_file_location("sdg_stage", REPO / "stages" / "sdg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sdg_stage_counts_heading_and_anchor_pairs(tmp_path, corpus):
    corpus_path = tmp_path / "corpus.jsonl"
    write_jsonl(corpus_path, corpus.values())
    params = write_params(tmp_path / "params.yaml", REPO, **{
        "llm.enabled": False, "inverse_cloze.enabled": False, "headings.enabled": True, "anchors.enabled": True,
        "headings.max_share": 1, "anchors.max_share": 1, "definitions.enabled": True,
    })
    args = ["--params", str(params), "--corpus", str(corpus_path), "--out", str(tmp_path / "sdg"),
            "--metrics", str(tmp_path / "sdg.json"), "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(load_stage().main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = read_json(tmp_path / "sdg.json")
    qa = read_jsonl(tmp_path / "sdg" / "qa.jsonl")
    structure = metrics["structure"]
    assert structure["anchors"]["unresolved_links"] == {"missing section": 1}
    assert structure["anchors"]["filtered"]["functional anchor"] == 1
    for name in ("headings", "anchors"):
        made = [r for r in qa if r["generator"] == name]
        assert structure[name]["pairs"] == metrics["generated_by_type"][name] > 0
        assert structure[name]["accepted"] == len(made) > 0
        assert all(r["query_type"] == name and r["scores"] is None for r in made)
    assert structure["definitions"]["pairs"] == 0  # no glossary in these documents
    assert metrics["accepted_llm"] == 0 and metrics["accepted"] == len(qa)
    assert "anchors: unresolved links" in result.output and "missing section 1" in result.output
    assert "headings: accepted" in result.output


def test_bench_helper_flags_queries_unlike_any_heading(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    from heading_like_queries import classify

    bench = tmp_path / "bench"
    (bench / "docs").mkdir(parents=True)
    (bench / "beir").mkdir()
    (bench / "docs" / "a.md").write_text("# Retrying failed tasks\n\nText.\n\n## Routing tasks to queues\n\nMore text.\n")
    queries = [{"_id": "q1", "text": "How do I retry failed tasks?"},  # one content word (retry) in no heading
               {"_id": "q2", "text": "Why is my worker leaking memory?"}]  # worker, leaking, memory: in none
    (bench / "beir" / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    result = classify(bench)
    assert result["non_heading_like_ids"] == ["q2"] and result["heading_like"] == 1 and result["headings"] == 2


def test_prep_carries_the_positive_without_its_heading_to_training():
    from embedpipe.prep.mining import Mined, unroll

    q = {"id": "qa_1", "question": "Configuring automatic retries", "segment_ids": ["d_a", "d_b"], "hop_count": 1,
         "query_type": "headings", "positive_texts": {"d_a": "body"}, "positive_titles": {"d_a": "Guide", "d_b": ""}}
    mined = Mined([[0.9, 0.8]], [[2]], [[0.5]], 0, 1, 0)
    rows = unroll([q], ["d_a", "d_b", "d_c"], mined)
    assert rows[0]["pos_doc"][0] == {"id": "d_a", "score": 0.9, "text": "body", "title": "Guide"}
    assert rows[1]["pos_doc"][0] == {"id": "d_b", "score": 0.8, "title": ""}
    corpus = {"d_a": {"title": "Guide > Configuring automatic retries", "text": "Configuring automatic retries:\nbody"},
              "d_b": {"title": "Configuring automatic retries", "text": "more"}}
    assert positive_passage_text(corpus["d_a"], rows[0]["pos_doc"][0]) == "Guide\nbody"
    assert positive_passage_text(corpus["d_b"], rows[1]["pos_doc"][0]) == "more"  # an empty title is no title


def test_definition_pairs_come_from_glossaries_without_their_term(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "glossary.md").write_text(
        "# Glossary\n\n<a id=\"term-late-ack\"></a>\nlate acknowledgment\n\nThe task message is acknowledged "
        "after the task has run, so a crashed worker leaves it to be delivered again.\n\nack\n\nShort for "
        "acknowledged, a word that names the message state.\n\nprefetch count\n\nSee also: the worker.\n")
    (docs / "terms.rst").write_text(
        "Terminology\n===========\n\n.. glossary::\n\n   result backend\n      The store where a worker writes "
        "the state and return value of every task it runs.\n")
    (docs / "guide.md").write_text("# Guide\n\nNote: this label line is not a definition and is long enough.\n")
    corpus = {}
    for name in ("glossary.md", "terms.rst", "guide.md"):
        for rec in chunk_document(read_document(docs / name, docs, 10**6), words, 200, 30, 20):
            corpus[rec["_id"]] = rec
    records, stats = definition_records(corpus, {"min_words": 2, "max_words": 8, "min_definition_words": 6})
    pairs = {r["question"]: r for r in records}
    assert set(pairs) == {"late acknowledgment", "result backend"}  # not "ack" (one word), not "Note"
    assert stats.filtered == {"too few words": 1, "definition too short": 1, "admonition label": 1}  # "See also: …"
    for term, rec in pairs.items():
        pid = rec["segment_ids"][0]
        assert term in corpus[pid]["text"] and term not in rec["positive_texts"][pid]
        assert rec["definition"] in rec["positive_texts"][pid] and rec["generator"] == "definitions"


def test_prep_copies_of_the_corpus_leave_the_structure_out():
    from embedpipe.core.io import without_structure

    rec = {"_id": "d_1", "title": "T", "text": "x", "structure": {"sections": []}}
    assert without_structure(rec) == {"_id": "d_1", "title": "T", "text": "x"} and "structure" in rec
    assert without_structure({"_id": "d_2", "text": "y"}) == {"_id": "d_2", "text": "y"}


def test_anchor_sentence_variant_and_an_unknown_label(corpus):
    pid = next(p for p, r in corpus.items() if r["doc"] == "ref.rst" and r["position"] == 0)
    corpus[pid]["structure"]["links"].append({"text": "the lost settings page", "target": "ref:no-such-label",
                                              "section": 0, "sentence": None})
    records, stats = anchor_records(corpus, {"query": "sentence", "max_sentence_words": 40})
    questions = {r["anchor"]["text"]: r["question"] for r in records}
    assert questions["Configuring automatic retries"].startswith("See Configuring automatic retries for the policy")
    assert stats.unresolved == {"missing section": 1, "unknown label": 1}
