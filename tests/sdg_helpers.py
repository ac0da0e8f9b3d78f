"""A fake OpenAI-compatible LLM on loopback that answers deterministically and injects faults on cue."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

FAULTS = ("429", "500", "hang", "malformed_body", "truncated_body", "drop", "bad_output")


def answer_for(body: dict[str, Any]) -> str:
    """Deterministic reply text for a request, derived from the passage(s) in the prompt."""
    if "messages" in body:
        text = body["messages"][-1]["content"]
        if "Score this question-answer pair" in text:
            return json.dumps({"relevance": 8, "accuracy": 8, "context_support": 9, "clarity": 8, "overall": 8,
                               "justification": "supported"})
        title = re.findall(r"Passage \d+:\n([^\n]+)", text)[-1]
        return json.dumps({"question": f"What does the section {title} explain?", "answer": f"It covers {title}.",
                           "reasoning_type": "factual", "question_complexity": 3, "hop_summaries": [title]})
    prompt = body["prompt"]
    if prompt.endswith("Scores:"):
        return " relevance=8 accuracy=8 context_support=9 clarity=8"
    title = re.findall(r"Passage(?: \d+)?: ([^\n]+)", prompt)[-1]
    return f" What does the section {title} explain?\nAnswer: It covers {title}."


class FakeLLM:
    """`with FakeLLM(faults=[...]) as url:`; faults are applied to the first requests, in order."""

    def __init__(self, faults: list[str] | None = None, delay: float = 0.0, hang_s: float = 3.0):
        self.faults = list(faults or [])
        self.delay = delay
        self.hang_s = hang_s
        self.lock = threading.Lock()
        self.received = 0  # every HTTP request, faulty or not
        self.served: list[str] = []  # hashes of requests answered successfully
        self.bodies: list[dict[str, Any]] = []  # every parsed request body, in arrival order
        self.server: ThreadingHTTPServer | None = None

    def __enter__(self) -> str:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._send(200, json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]}))

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.received += 1
                    fake.bodies.append(body)
                    fault = fake.faults.pop(0) if fake.faults else None
                if fake.delay:
                    time.sleep(fake.delay)
                if fault == "429":
                    return self._send(429, '{"error": {"message": "slow down"}}', {"Retry-After": "1"})
                if fault == "500":
                    return self._send(500, '{"error": {"message": "boom"}}')
                if fault == "hang":
                    time.sleep(fake.hang_s)
                    return self._send(200, "{}")
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return None
                text = answer_for(body)
                if fault == "bad_output":  # the *model* writes broken output (truncated JSON / no answer)
                    text = text[: len(text) // 2]
                payload = self._payload(body, text)
                if fault == "malformed_body":
                    return self._send(200, "{not json at all")
                if fault == "truncated_body":
                    return self._send(200, payload[: len(payload) // 2])
                with fake.lock:
                    fake.served.append(hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest())
                self._send(200, payload)

            def _payload(self, body: dict, text: str) -> str:
                usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
                if self.path.endswith("/chat/completions"):
                    choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
                    obj = "chat.completion"
                else:
                    choice = {"index": 0, "finish_reason": "stop", "text": text, "logprobs": None}
                    obj = "text_completion"
                return json.dumps({"id": "x", "object": obj, "created": 0, "model": body.get("model", "fake"),
                                   "choices": [choice], "usage": usage})

            def _send(self, code: int, text: str, headers: dict[str, str] | None = None) -> None:
                data = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()


def write_params(path: Path, repo_root: Path, **sdg_overrides: Any) -> Path:
    """params.yaml with the repo's `model` and `sdg` sections, sdg keys overridden (dotted: 'llm.base_url')."""
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    cfg = params["sdg"]
    for dotted, value in sdg_overrides.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})  # params.yaml leaves most sections to the schema
        node[leaf] = value
    path.write_text(yaml.safe_dump({"model": params["model"], "sdg": cfg}))
    return path
