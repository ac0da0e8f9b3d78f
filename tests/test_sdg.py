"""sdg stage: fault injection, crash-safe resume, and the pieces the gates are built from."""

from __future__ import annotations

import importlib.util
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from embedpipe.core.io import read_json, read_jsonl
from embedpipe.core.processes import ChildServer, free_port
from embedpipe.sdg import rules as sdg
from embedpipe.sdg.llm import (
    LLMClient,
    LLMConfig,
    LLMFatalError,
    ParseError,
    RequestCache,
    parse_json_object,
    request_key,
)
from tests.conftest import stage_env
from tests.sdg_helpers import FAULTS, FakeLLM, write_params

REPO = Path(__file__).resolve().parents[1]


def load_stage():
    spec = importlib.util.spec_from_file_location("sdg_stage", REPO / "stages" / "sdg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_params(tmp: Path, url: str, api: str = "completions", **extra) -> Path:
    return write_params(
        tmp / "params.yaml", REPO,
        **{"llm.base_url": url, "llm.model": "fake-model", "llm.api": api, "llm.timeout": 1.0,
           "llm.backoff_base": 0.05, "llm.concurrency": 2, "max_passages": 0, "multi_hop_fraction": 0.4, **extra},
    )


def run_stage(params: Path, tmp: Path, cache: Path) -> dict:
    args = ["--params", str(params), "--corpus", str(REPO / "tests/data/tiny_corpus.jsonl"), "--out", str(tmp / "sdg"),
            "--metrics", str(tmp / "sdg.json"), "--cache-dir", str(cache)]
    result = CliRunner().invoke(load_stage().main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return read_json(tmp / "sdg.json")


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_faults_are_retried_nothing_lost_and_rerun_makes_zero_requests(tmp_path, api):
    cache = tmp_path / "cache"
    with FakeLLM(faults=list(FAULTS)) as url:
        params = fake_params(tmp_path, url, api)
        first = run_stage(params, tmp_path, cache)
    assert first["failures_by_kind"] == {}
    assert set(first["retries_by_kind"]) == {"rate_limited", "http_500", "timeout", "unreadable_response",
                                              "connection", "bad_output"}
    qa = read_jsonl(tmp_path / "sdg" / "qa.jsonl")
    rejected = read_jsonl(tmp_path / "sdg" / "rejected.jsonl")
    llm_records = [r for r in qa + rejected if r.get("generator") == "fake-model"]
    assert len(llm_records) == first["llm_jobs"] > 21  # every job produced a pair; multi-hop jobs too
    assert not [r for r in rejected if r["reason"].startswith("llm failure")]
    assert any(r["hop_count"] >= 2 and r["query_type"] == "multi_hop" for r in llm_records)
    judged = [r for r in qa if r["generator"] == "fake-model"]
    assert judged and all(r["scores"]["overall"] >= 7 and r["quality_score"] for r in judged)

    fresh = FakeLLM()
    with fresh as url2:  # a new server: the rerun must not need it at all
        params = fake_params(tmp_path, url2, api)
        second = run_stage(params, tmp_path, cache)
    assert second["requests"] == 0 and fresh.received == 0
    assert second["cache_hits"] == first["llm_jobs"] + len(judged)
    assert read_jsonl(tmp_path / "sdg" / "qa.jsonl") == qa


CRASHING_SERVER = """
import http.server, json, os, signal, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"data": [{"id": "m"}]}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        os.kill(os.getpid(), signal.SIGSEGV)  # what ggml's AMX kernels did to llama.cpp on a Sapphire Rapids CPU
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_a_crashed_embedded_server_stops_the_run_with_its_reason(tmp_path):
    """A server we started that dies is not retried as a network fault: the first failed request names the signal."""
    port = free_port()
    server = ChildServer("llama.cpp server", [sys.executable, "-c", CRASHING_SERVER, str(port)],
                         f"http://127.0.0.1:{port}/v1/models", log_path=tmp_path / "server.log")
    with server:
        client = LLMClient(LLMConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", timeout=5.0, max_retries=6),
                           RequestCache(tmp_path / "requests.sqlite"), server_gone=server.exit_reason)
        started = time.monotonic()
        with pytest.raises(LLMFatalError, match="llama.cpp server was killed by SIGSEGV"):
            client.ask({"model": "m", "prompt": "Q:", "max_tokens": 4})
        assert time.monotonic() - started < 5  # no round of 6 backed-off retries


def test_persistent_bad_output_is_recorded_as_failed_with_raw_text(tmp_path):
    cache = tmp_path / "cache"
    with FakeLLM(faults=["bad_output"] * 3) as url:  # parse_retries=2: three bad replies in a row
        params = fake_params(tmp_path, url, **{"llm.concurrency": 1, "multi_hop_fraction": 0.0})
        metrics = run_stage(params, tmp_path, cache)
    assert metrics["failures_by_kind"] == {"generate:parse": 1}
    failed = [r for r in read_jsonl(tmp_path / "sdg" / "rejected.jsonl") if r["reason"].startswith("llm failure")]
    assert len(failed) == 1 and failed[0]["raw"]  # the raw text is kept for inspection
    with sqlite3.connect(cache / "requests.sqlite") as db:
        assert db.execute("SELECT count(*) FROM requests WHERE status='failed'").fetchone()[0] == 1


def test_kill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    corpus = str(REPO / "tests/data/tiny_corpus.jsonl")

    def cmd(tag: str, params: Path) -> list[str]:
        return [sys.executable, str(REPO / "stages/sdg.py"), "--params", str(params), "--corpus", corpus,
                "--out", str(tmp_path / tag), "--metrics", str(tmp_path / f"{tag}.json"),
                "--cache-dir", str(tmp_path / f"cache_{tag}")]

    full_dir = tmp_path / "full_run"
    full_dir.mkdir()
    with FakeLLM() as url:  # the uninterrupted reference run (in-process: faster)
        full = run_stage(fake_params(full_dir, url, **{"llm.concurrency": 1}), full_dir, full_dir / "cache")
    with FakeLLM(delay=0.1) as url:
        params = fake_params(tmp_path, url, **{"llm.concurrency": 1})
        proc = subprocess.Popen(cmd("killed", params), env=stage_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        db_path = tmp_path / "cache_killed" / "requests.sqlite"
        deadline = time.time() + 90
        while time.time() < deadline and _rows(db_path) < 8:
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)  # the harshest interruption: no cleanup code runs
        proc.wait()
    done_before = _rows(db_path)
    assert done_before >= 8 and not (tmp_path / "killed" / "qa.jsonl").exists()

    fake = FakeLLM()
    with fake as url:
        params = fake_params(tmp_path, url, **{"llm.concurrency": 1})
        subprocess.run(cmd("killed", params), env=stage_env(), check=True, capture_output=True, timeout=120)
    resumed = read_json(tmp_path / "killed.json")
    assert resumed["cache_hits"] == done_before  # every finished request was reused ...
    assert resumed["requests"] == full["requests"] - done_before == fake.received  # ... and none asked twice
    assert read_jsonl(tmp_path / "killed" / "qa.jsonl") == read_jsonl(full_dir / "sdg" / "qa.jsonl")
    assert read_jsonl(tmp_path / "killed" / "rejected.jsonl") == read_jsonl(full_dir / "sdg" / "rejected.jsonl")


def _rows(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=1) as con:
            return con.execute("SELECT count(*) FROM requests").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_key_never_leaks(tmp_path, monkeypatch):
    monkeypatch.setenv("SDG_TEST_KEY", "sk-secret-123")
    with FakeLLM() as url:
        params = fake_params(tmp_path, url, **{"llm.api_key_env": "SDG_TEST_KEY", "max_passages": 3,
                                                "multi_hop_fraction": 0.0})
        run_stage(params, tmp_path, tmp_path / "cache")
    for path in [*tmp_path.rglob("*")]:
        if path.is_file():
            assert b"sk-secret-123" not in path.read_bytes(), path


def test_missing_key_env_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("SDG_NOPE", raising=False)
    params = fake_params(tmp_path, "http://127.0.0.1:9/v1", **{"llm.api_key_env": "SDG_NOPE"})
    args = ["--params", str(params), "--corpus", str(REPO / "tests/data/tiny_corpus.jsonl"),
            "--out", str(tmp_path / "o"), "--metrics", str(tmp_path / "m.json"), "--cache-dir", str(tmp_path / "c")]
    result = CliRunner().invoke(load_stage().main, args)
    assert result.exit_code == 1 and "SDG_NOPE" in result.output and "Traceback" not in result.output


def test_bad_schema_is_a_clear_error_before_any_work(tmp_path):
    params = fake_params(tmp_path, "http://127.0.0.1:9/v1", **{"llm.schema": "tiny"})
    args = ["--params", str(params), "--corpus", str(REPO / "tests/data/tiny_corpus.jsonl"),
            "--out", str(tmp_path / "o"), "--metrics", str(tmp_path / "m.json"), "--cache-dir", str(tmp_path / "c")]
    result = CliRunner().invoke(load_stage().main, args)
    assert result.exit_code == 1 and "'sdg.llm.schema': Input should be 'auto', 'full' or 'compact'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


# --- building blocks ---------------------------------------------------------------------------
def test_parsers():
    assert sdg.parse_completion_qa(" Why is it?\nAnswer: Because.") == {"question": "Why is it?", "answer": "Because."}
    with pytest.raises(ParseError):
        sdg.parse_completion_qa(" Why is it? Because")
    assert sdg.parse_judge_completion(" relevance=9 accuracy=8 context_support=10 clarity=7")["overall"] == 8.5
    with pytest.raises(ParseError):
        sdg.parse_judge_completion(" relevance=9 accuracy=8")
    assert parse_json_object('```json\n{"a": 1}\n```') == {"a": 1}
    with pytest.raises(ParseError):
        parse_json_object('{"question": "Why is the sky')  # truncated
    assert request_key({"a": 1, "b": [1, 2]}) == request_key({"b": [1, 2], "a": 1})
    assert request_key({"prompt": "x"}) != request_key({"prompt": "y"})


def test_judge_needs_overall_and_every_floor():
    floors = {"relevance": 5, "accuracy": 5, "context_support": 5, "clarity": 5}
    good = {"relevance": 8, "accuracy": 8, "context_support": 8, "clarity": 8, "overall": 8}
    assert sdg.judge_passes(good, 7, floors)
    assert not sdg.judge_passes({**good, "context_support": 2, "overall": 7.5}, 7, floors)
    assert not sdg.judge_passes({**good, "overall": 6.5}, 7, floors)


def test_junk_gate():
    cfg = {"min_question_words": 4, "max_question_words": 40, "max_verbatim_words": 6, "require_question_mark": True}
    passage = "The conical steel burrs should be replaced after 450 kg of coffee has been ground."
    ok = {"question": "When should the grinder burrs be replaced?", "answer": "After 450 kg.", "query_type": "contextual"}
    assert sdg.junk_reason(ok, [passage], cfg) is None
    assert sdg.junk_reason({**ok, "question": "Burrs?"}, [passage], cfg) == "question too short"
    assert sdg.junk_reason({**ok, "answer": ok["question"]}, [passage], cfg) == "answer copied as question"
    quote = {**ok, "question": "Is it true that the conical steel burrs should be replaced after 450 kg?"}
    assert sdg.junk_reason(quote, [passage], cfg) == "question quotes the passage"
    ict = {"question": passage, "answer": passage, "query_type": "inverse_cloze"}
    assert sdg.junk_reason(ict, [passage], cfg) is None


def test_dedup_is_greedy_in_order():
    e = np.array([[1, 0], [0.999, 0.0447], [0, 1]], dtype=np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    assert sdg.dedup_mask(e, 0.9).tolist() == [True, False, True]


def test_inverse_cloze_and_neighbours(tiny_corpus_path):
    from embedpipe.core.io import load_corpus

    corpus = load_corpus(tiny_corpus_path)
    rec = next(iter(corpus.values()))
    pairs = sdg.inverse_cloze(rec, 2, 6, 40, keep_probability=0.0, min_rest_words=6)
    assert pairs and all(q in rec["text"] and q not in rest for q, rest in pairs)
    assert pairs == sdg.inverse_cloze(rec, 2, 6, 40, keep_probability=0.0, min_rest_words=6)  # deterministic
    groups = sdg.neighbour_groups(corpus)
    for ids in groups.values():
        positions = [corpus[i]["position"] for i in ids]
        assert positions == sorted(positions) and len({corpus[i]["doc"] for i in ids}) == 1
