"""The embeddings server as a real subprocess, called over loopback HTTP with the openai client and httpx."""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from embedpipe.core.models import encode
from embedpipe.serving.server import ServerProcess
from tests.serve_helpers import API_KEY, API_KEY_ENV, PASSAGE_PROMPT, QUERY_PROMPT, make_session_export

TEXTS = ["How do I reset the grinder?", "Descale the boiler every three months.", "Warranty: two years."]


@pytest.fixture(scope="session")
def exported(tmp_path_factory, tiny_corpus_path):
    return make_session_export(tmp_path_factory.mktemp("export"), tiny_corpus_path)


@pytest.fixture(scope="module")
def server(exported, repo_root):
    from conftest import stage_env

    env = stage_env() | {API_KEY_ENV: API_KEY}
    proc = ServerProcess(["--params", str(exported / "params.yaml"), "--log-level", "info"],
                         cwd=str(repo_root), env=env)
    with proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)


def post(server, body, key: str | None = API_KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        headers["Content-Type"] = "application/json"
        return httpx.post(f"{server.base_url}/embeddings", content=body, headers=headers, timeout=60, **kwargs)
    return httpx.post(f"{server.base_url}/embeddings", json=body, headers=headers, timeout=60, **kwargs)


def batch_stats(server) -> tuple[float, float]:
    """(model calls, inputs) so far, from the Prometheus batch-size histogram."""
    text = httpx.get(f"{server.base_url.removesuffix('/v1')}/metrics", timeout=10).text
    count = float(re.search(r"^embed_batch_size_count (\S+)$", text, re.M).group(1))
    total = float(re.search(r"^embed_batch_size_sum (\S+)$", text, re.M).group(1))
    return count, total


def test_openai_client_float_and_base64_equal_in_process(client, minilm):
    passages = client.embeddings.create(model="test-embed", input=TEXTS)  # the client asks for base64
    floats = client.embeddings.create(model="test-embed", input=TEXTS, encoding_format="float",
                                      extra_body={"input_type": "query"})
    got_p = np.array([d.embedding for d in passages.data], dtype=np.float32)
    got_q = np.array([d.embedding for d in floats.data], dtype=np.float32)
    assert [d.index for d in passages.data] == [0, 1, 2] and passages.model == "test-embed"
    assert passages.usage.prompt_tokens == passages.usage.total_tokens > len(TEXTS)
    np.testing.assert_allclose(got_p, encode(minilm, TEXTS, PASSAGE_PROMPT), atol=2e-5)  # default: passage
    np.testing.assert_allclose(got_q, encode(minilm, TEXTS, QUERY_PROMPT), atol=2e-5)
    assert np.abs(got_p - got_q).max() > 1e-3  # the prompts really differ


def test_raw_base64_is_little_endian_float32_and_dimensions_renormalise(server, minilm):
    body = post(server, {"input": TEXTS[0], "encoding_format": "base64", "dimensions": 64}).json()
    vec = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    full = encode(minilm, TEXTS[:1], PASSAGE_PROMPT)[0][:64]
    assert vec.shape == (64,) and abs(np.linalg.norm(vec) - 1) < 1e-5
    np.testing.assert_allclose(vec, full / np.linalg.norm(full), atol=2e-5)


LONG = "word " * 400
BAD_REQUESTS = [
    ("no key", {"input": "x"}, {"key": None}, 401, "invalid_api_key"),
    ("wrong key", {"input": "x"}, {"key": "nope"}, 401, "invalid_api_key"),
    ("unknown model", {"input": "x", "model": "gpt-4"}, {}, 404, "model_not_found"),
    ("payload too large", {"input": ["y" * 1000] * 60}, {}, 413, "payload_too_large"),
    ("token id outside the vocabulary", {"input": [101, 10**6, 102]}, {}, 400, "invalid_value"),
    ("bad input_type", {"input": "x", "input_type": "document"}, {}, 422, "invalid_value"),
    ("bad encoding", {"input": "x", "encoding_format": "int8"}, {}, 422, "invalid_value"),
    ("missing input", {"model": "test-embed"}, {}, 422, "invalid_value"),
    ("invalid json", '{"input": ', {}, 400, "invalid_json"),
    ("empty list", {"input": []}, {}, 400, "invalid_value"),
    ("empty string", {"input": ["ok", " "]}, {}, 400, "invalid_value"),
    ("too many inputs", {"input": ["x"] * 17}, {}, 400, "too_many_inputs"),
    ("too long, truncate NONE", {"input": LONG, "truncate": "NONE"}, {}, 400, "context_length_exceeded"),
    ("dimensions too large", {"input": "x", "dimensions": 385}, {}, 400, "invalid_value"),
]


@pytest.mark.parametrize("body,opts,status,code", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_openai_error_and_server_keeps_serving(server, body, opts, status, code):
    response = post(server, body, **opts)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code and error["message"]
    assert post(server, {"input": "still serving"}).status_code == 200


def test_unknown_route_and_method_get_error_bodies(server):
    root = server.base_url.removesuffix("/v1")
    assert httpx.get(f"{root}/nope", timeout=10).json()["error"]["code"] == "not_found"
    assert httpx.get(f"{server.base_url}/embeddings", headers={"Authorization": f"Bearer {API_KEY}"},
                     timeout=10).json()["error"]["code"] == "method_not_allowed"


def test_truncate_end_cuts_at_the_token_limit(server):
    body = post(server, {"input": LONG, "truncate": "END"}).json()
    assert len(body["data"][0]["embedding"]) == 384 and body["usage"]["total_tokens"] == 256


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["test-embed"]
    assert httpx.get(f"{server.base_url}/health/live", timeout=10).status_code == 200
    assert httpx.get(f"{server.base_url}/health/ready", timeout=10).status_code == 200
    text = httpx.get(f"{server.base_url.removesuffix('/v1')}/metrics", timeout=10).text
    assert 'embed_requests_total{path="/v1/embeddings",status="200"}' in text
    assert 'embed_errors_total{code="invalid_api_key"}' in text and "embed_request_latency_seconds_count" in text


def test_concurrent_requests_are_batched_and_answered_correctly(server, client, minilm):
    texts = [f"Question number {i}: how long does part {i} last?" for i in range(24)]
    calls_before, inputs_before = batch_stats(server)
    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(lambda t: client.embeddings.create(model="test-embed", input=t), texts))
    calls, inputs = (a - b for a, b in zip(batch_stats(server), (calls_before, inputs_before), strict=True))
    got = np.array([r.data[0].embedding for r in results], dtype=np.float32)
    np.testing.assert_allclose(got, encode(minilm, texts, PASSAGE_PROMPT), atol=2e-5)
    assert inputs == 24 and calls < 24 / 2  # several requests shared each model call


def model_pid(server) -> int:
    """The server's model process, from its start-up line (the last one if it was restarted)."""
    return int(re.findall(r"model process pid (\d+)", server.log_tail(10**6))[-1])


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is `parent`, from /proc (no procps needed)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return pids


def gone(pid: int) -> bool:
    """`pid` has exited: reaped, or a zombie whose threads have all exited (the main thread alone shows "zombie"
    while onnxruntime's threads still exit: a run sent then still meets the dying process)."""
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text() and len(os.listdir(f"/proc/{pid}/task")) <= 1
    except OSError:
        return True


def test_model_process_killed_between_requests_is_restarted(server, client, minilm):
    """serve.model_process (the default): the model runs in a child process. If it dies, the server lives on and
    the next model run starts a new one."""
    pid = model_pid(server)
    os.kill(pid, signal.SIGTERM)  # ignored: the server drains its queue through the child on shutdown
    time.sleep(0.5)
    assert Path(f"/proc/{pid}").exists()
    os.kill(pid, signal.SIGKILL)
    while not gone(pid):
        time.sleep(0.05)
    got = client.embeddings.create(model="test-embed", input=TEXTS)
    assert server.proc.poll() is None and "model process exited" in server.log_tail()
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), encode(minilm, TEXTS, PASSAGE_PROMPT),
                               atol=2e-5)


def test_sigterm_stops_cleanly(server):
    assert server.proc.poll() is None
    children = child_pids(server.proc.pid)
    assert children  # the model process (and multiprocessing's resource tracker)
    assert server.stop(timeout_s=20) == 0, server.log_tail()  # graceful: uvicorn finished, exit code 0
    assert "Traceback" not in server.log_tail()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{c}").exists() for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{c}").exists() for c in children)  # nothing outlives the server


def test_process_encoder_equals_its_local_encoder_and_reports_child_errors(exported):
    from embedpipe.core.encoders import EncoderSpec, ExportNotFound
    from embedpipe.serving.model_process import ModelProcessError, ProcessEncoder

    spec = EncoderSpec(backend="onnx", folder=str(exported / "onnx"), variant="fp32", threads=1)
    with ProcessEncoder(spec) as encoder:
        np.testing.assert_allclose(encoder.encode(TEXTS, PASSAGE_PROMPT), encoder.local.encode(TEXTS, PASSAGE_PROMPT),
                                   atol=1e-6)
        assert (encoder.variant, encoder.device, encoder.dimension) == ("fp32", "cpu", 384)
        with pytest.raises(ModelProcessError, match="model run failed in the model process"):
            encoder.encode_ids([[101, 10**7, 102]])  # a token id outside the vocabulary
        pid = encoder.pid
        assert encoder.encode(TEXTS).shape == (3, 384) and encoder.pid == pid  # the same child lives on
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    with pytest.raises(ExportNotFound, match="embedpipe.json not found"):
        ProcessEncoder(EncoderSpec(backend="onnx", folder=str(exported / "missing")))


def test_a_server_that_cannot_start_fails_with_its_log_and_leaves_nothing_behind(repo_root, tmp_path):
    from conftest import stage_env

    server = ServerProcess(["--model-dir", str(tmp_path / "no-export")], cwd=str(repo_root), env=stage_env())
    with pytest.raises(RuntimeError, match="exited with code 1 before it was ready") as failed:
        server.start()
    assert "embedpipe.json not found" in str(failed.value)  # the child's own error, from its log
    assert server.proc.poll() == 1 and server.log_path.exists()
    assert server.close() == 1 and not server.log_path.exists()  # the temporary log goes with it


def test_deploy_check_starts_and_stops_the_server(exported, repo_root):
    from conftest import stage_env

    result = subprocess.run([sys.executable, "stages/deploy_check.py", "--params", str(exported / "params.yaml"),
                             "--smoke-only"], cwd=repo_root, env=stage_env() | {API_KEY_ENV: API_KEY},
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dimension 384" in result.stderr and re.search(r"server exit code\s*│\s*0", result.stderr)


def test_deploy_check_without_export_is_a_clean_error(repo_root, tmp_path):
    from conftest import stage_env

    result = subprocess.run([sys.executable, "stages/deploy_check.py", "--model-dir", str(tmp_path)],
                            cwd=repo_root, env=stage_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "run the export stage first" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_exports_torch_bf16_variant_is_served_from_its_folder(exported, repo_root, minilm):
    """`serve --variant torch_bf16` (what `auto` serves when the export measured it fastest): the export's own torch
    copy, its name and prompts, under bf16 autocast."""
    from conftest import stage_env

    args = ["--params", str(exported / "params.yaml"), "--variant", "torch_bf16"]
    with ServerProcess(args, cwd=str(repo_root), env=stage_env() | {API_KEY_ENV: API_KEY}) as proc:
        client = openai.OpenAI(base_url=proc.base_url, api_key=API_KEY, max_retries=0)
        got = np.array([d.embedding for d in client.embeddings.create(model="test-embed", input=TEXTS).data])
        queries = np.array([d.embedding for d in client.embeddings.create(
            model="test-embed", input=TEXTS, extra_body={"input_type": "query"}).data])
        log = proc.log_tail()
    assert "(torch_bf16 on torch, cpu, 4096 tokens per model call, " in log  # auto
    if shutil.which("c++") or shutil.which("g++"):  # serve.model_workers/torch_compile auto: 2 compiled workers
        assert "2 model processes pid" in log and ", torch.compile)" in log, log
    assert (got * encode(minilm, TEXTS, PASSAGE_PROMPT)).sum(axis=1).min() > 0.999
    assert (queries * encode(minilm, TEXTS, QUERY_PROMPT)).sum(axis=1).min() > 0.999


def test_torch_backend_under_bf16_autocast_serves_vectors_close_to_fp32(exported, repo_root, minilm):
    """`--backend torch --torch-dtype bfloat16` (the fast path on CPUs with AVX-512 BF16/AMX): same API, the
    vectors within bf16 rounding of the fp32 model's, still unit length. `--max-batch-tokens 40` really bounds
    the model calls: a request of 8 inputs of ~16 tokens runs in several calls, not in one. The model runs in the
    server's own process here (`--no-model-process`), the other way to serve."""
    from conftest import stage_env

    args = ["--params", str(exported / "params.yaml"), "--backend", "torch", "--torch-model", "all-MiniLM-L6-v2",
            "--torch-dtype", "bfloat16", "--model-name", "bf16-embed", "--max-batch-tokens", "40", "--no-model-process",
            "--no-torch-compile"]
    texts = TEXTS + [f"Descale boiler number {i} every three months, then rinse it." for i in range(5)]
    with ServerProcess(args, cwd=str(repo_root), env=stage_env() | {API_KEY_ENV: API_KEY}) as proc:
        client = openai.OpenAI(base_url=proc.base_url, api_key=API_KEY, max_retries=0)
        got = np.array([d.embedding for d in client.embeddings.create(model="bf16-embed", input=texts).data])
        calls, inputs = batch_stats(proc)
        assert "model in the server process" in proc.log_tail()
    tokens = minilm.tokenizer([PASSAGE_PROMPT + t for t in texts], return_length=True)["length"]
    assert inputs == len(texts) and calls >= sum(tokens) / 40 > 1  # in model calls of <= 40 tokens each
    reference = encode(minilm, texts, PASSAGE_PROMPT)
    cosine = (got * reference).sum(axis=1)
    assert cosine.min() > 0.999 and np.abs(got - reference).max() > 0  # bf16 really ran, and stayed close
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_two_compiled_model_workers_answer_concurrent_requests_like_one_model(exported, repo_root, minilm):
    """`--model-workers 2 --torch-compile`: two model processes (one core each) run batches at once, each under
    torch.compile; concurrent requests get the fp32 model's vectors, and a killed worker is replaced."""
    from conftest import stage_env

    args = ["--params", str(exported / "params.yaml"), "--backend", "torch", "--torch-model", "all-MiniLM-L6-v2",
            "--model-name", "w2", "--model-workers", "2", "--torch-compile"]
    texts = [f"Descale boiler number {i} every {i % 4 + 2} months, then rinse it twice." for i in range(24)]
    with ServerProcess(args, cwd=str(repo_root), env=stage_env() | {API_KEY_ENV: API_KEY}) as proc:
        client = openai.OpenAI(base_url=proc.base_url, api_key=API_KEY, max_retries=0)
        line = re.search(r"2 model processes pid (\d+), (\d+), 1 threads each, torch.compile", proc.log_tail())
        assert line, proc.log_tail()
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda t: client.embeddings.create(model="w2", input=[t]).data[0].embedding, texts))
        os.kill(int(line.group(2)), signal.SIGKILL)
        time.sleep(0.5)
        with ThreadPoolExecutor(4) as pool:  # whichever worker a run lands on, every request is answered
            again = list(pool.map(lambda t: client.embeddings.create(model="w2", input=[t]).data[0].embedding, texts))
        assert proc.proc.poll() is None
        workers = child_pids(proc.proc.pid)  # both model processes (one of them the replacement) and mp's tracker
        assert len(workers) >= 2
        assert proc.stop(timeout_s=30) == 0, proc.log_tail()  # both scheduler loops stop cleanly on SIGTERM
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)  # no worker outlives the server
    reference = encode(minilm, texts, PASSAGE_PROMPT)
    np.testing.assert_allclose(np.array(got), reference, atol=1e-4)
    np.testing.assert_allclose(np.array(again), reference, atol=1e-4)


def test_serving_plan_auto_gives_torch_on_the_cpu_two_compiled_workers(exported, monkeypatch):
    from embedpipe.core.encoders import EncoderSpec, serving_plan

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    torch_cpu = EncoderSpec(backend="torch", folder=str(exported / "onnx"), device="cpu", torch_model="m")
    onnx = EncoderSpec(backend="onnx", folder=str(exported / "onnx"), variant="fp32")
    bf16_variant = EncoderSpec(backend="onnx", folder=str(exported / "onnx"), variant="torch_bf16", device="cpu")
    compiler = bool(shutil.which("c++") or shutil.which("g++"))
    assert serving_plan(torch_cpu, "auto", "auto", True) == ((2, True) if compiler else (1, False))
    assert serving_plan(bf16_variant, "auto", "auto", True) == ((2, True) if compiler else (1, False))
    assert serving_plan(torch_cpu, "auto", "auto", False) == (1, compiler)  # one model in the server process
    assert serving_plan(torch_cpu, "auto", False, True) == (1, False)  # eager: one worker (c=1 would lose 20 %)
    assert serving_plan(onnx, "auto", "auto", True) == (1, False)  # ONNX: two one-thread workers lose 40 % at c=1
    assert serving_plan(onnx, 3, True, True) == (3, True)  # explicit settings are kept
    for bad in ((0, "auto", True), ("two", "auto", True), (2, "auto", False), ("auto", "yes", True)):
        with pytest.raises(ValueError, match="serve.model_workers|serve.torch_compile"):
            serving_plan(torch_cpu, *bad)


def test_a_failing_torch_compile_falls_back_to_the_eager_model(minilm, monkeypatch, caplog):
    import torch

    from embedpipe.core.encoders import TorchEncoder

    def broken(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    encoder = TorchEncoder(minilm, "m", compile=True)
    assert encoder.compiled is False and "torch.compile failed (RuntimeError: no C++ compiler)" in caplog.text
    np.testing.assert_allclose(encoder.encode(TEXTS), encode(minilm, TEXTS), atol=1e-5)


def test_max_batch_tokens_auto_follows_the_runtime():
    from embedpipe.serving.server import batch_tokens_for

    assert batch_tokens_for("auto", "torch_bf16", "cpu") == 4096  # measured: +30 % served inputs/s on AMX
    assert batch_tokens_for("auto", "fp32", "cpu") == 512 and batch_tokens_for("auto", "int8_block", "cpu") == 512
    assert batch_tokens_for("auto", "fp16", "cuda") == 16384 and batch_tokens_for("auto", "torch_bf16", "cuda:0") == 16384
    assert batch_tokens_for(1024, "torch_bf16", "cpu") == 1024  # a number is kept as given
    for bad in (0, -5, "lots", True):
        with pytest.raises(ValueError, match="serve.max_batch_tokens"):
            batch_tokens_for(bad, "fp32", "cpu")
