"""Stage `deploy_check`: serve models/onnx over HTTP and check that the served model encodes like the local one.

Starts `stages/serve.py` on a free loopback port, waits until it is ready, sends one request as a smoke
test, then:
- always: compares the served vectors of a fixed sample of the test set (seeded passages + queries) with
  the fine-tuned model's vectors from the embedding store (eval computed them; nothing is re-encoded);
- when the test corpus is small (`deploy.full_eval_max_passages`): also runs `stages/eval.py --endpoint`
  over the whole test set, which compares the served retrieval metrics with metrics/eval.json.
It stops the server whatever happens, writes which checks it ran to metrics/serve_eval.json, and exits
non-zero when a check fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from embedpipe.core.console import alert, console, summary
from embedpipe.core.embed_store import encode_cached, encode_counts
from embedpipe.core.encoders import ExportNotFound, read_export_config
from embedpipe.core.io import FormatError, load_beir, read_json, write_json
from embedpipe.core.models import ModelNotAvailable, load_model
from embedpipe.core.params import load_params, section
from embedpipe.evaluation.user_questions import shipping_verdict
from embedpipe.serving.deploy import sample_test_set, vector_agreement
from embedpipe.serving.endpoint import EmbeddingEndpoint, EndpointError
from embedpipe.serving.server import ServerProcess, serving_description


def smoke_test(base_url: str, model: str, api_key: str) -> int:
    """One real embeddings request through the openai client; returns the vector's dimension."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    response = client.embeddings.create(model=model, input=["deploy check"])
    return len(response.data[0].embedding)


def cosine_bar(cfg: dict[str, Any], variant: str) -> float:
    """The smallest served-vs-stored cosine allowed for this variant (`deploy.sample_cosine_min`)."""
    bars = cfg.get("sample_cosine_min", 0.999)
    if not isinstance(bars, dict):
        return float(bars)
    return float(bars.get(variant, bars.get("default", min(bars.values()))))


def stored_reference(cfg: dict[str, Any], export: dict[str, Any], sample: dict[str, list[str]]) -> tuple[Any, int]:
    """The fine-tuned model's vectors for the sample, through the embedding store: (passages, queries), encoded."""
    try:
        model = load_model(cfg["reference_model"], None, export.get("max_seq_length"))
    except ModelNotAvailable as e:
        raise click.ClickException(f"deploy.reference_model: {e}") from None
    label = model._embedpipe_name
    p = encode_cached(model, sample["passages"], export.get("passage_prompt") or "", desc="deploy_check: reference",
                      kind="passage")
    q = encode_cached(model, sample["queries"], export.get("query_prompt") or "", desc="deploy_check: reference",
                      kind="query")
    return (p, q), encode_counts().get(label, {}).get("encoded", 0)


def served_setup(base_url: str, model: str, api_key: str) -> dict[str, Any] | None:
    """How the server runs the model (runtime, device, model processes, compilation), from its model card
    (GET /v1/models/{model}, `serving`), read with the openai client; None from a server that does not say."""
    from openai import OpenAI

    card = OpenAI(base_url=base_url, api_key=api_key, max_retries=0).models.retrieve(model)
    return (card.model_extra or {}).get("serving")


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="Params file.")
@click.option("--model-dir", default=None, help="Exported folder (default serve.model_dir).")
@click.option("--variant", default=None, help="ONNX variant to serve (overrides deploy.variant).")
@click.option("--out", "out_path", default="metrics/serve_eval.json", show_default=True, help="Served metrics.")
@click.option("--smoke-only", is_flag=True, help="Start, send one request, stop: no evaluation.")
def main(params_path: str, model_dir: str | None, variant: str | None, out_path: str, smoke_only: bool) -> None:
    """Serve the exported model on a free loopback port and check it against the fine-tuned model.

    \b
    Served vectors of a fixed sample of the test set are compared with the fine-tuned model's stored
    vectors (cosine, deploy.sample_cosine_min); on a small test set (<= deploy.full_eval_max_passages)
    the served retrieval metrics are also compared with metrics/eval.json. A model that eval found worse than
    base on your own questions (user_questions in deploy.reference) fails the check before anything starts,
    unless eval.user_questions_allow_regression is true.
    """
    started = time.time()
    params = load_params(params_path)
    cfg, scfg = section(params, "deploy"), section(params, "serve")
    allow = bool((params.get("eval") or {}).get("user_questions_allow_regression", False))
    ship, why = shipping_verdict(cfg.get("reference", "metrics/eval.json"), allow, cfg.get("reference_model"))
    if not ship:
        alert(f"NOT SHIPPED: {why}")
        sys.exit(1)
    console.print(f"your questions: {why}")
    folder = model_dir or scfg["model_dir"]
    try:
        export = read_export_config(folder)
    except ExportNotFound as e:
        raise click.ClickException(str(e)) from None
    name = export["name"]
    variant = variant or cfg["variant"]
    if variant == "auto":  # what the server will pick: the export's fastest variant within tolerance
        variant = export.get("default_variant") or "fp32"
    full_max = int(cfg.get("full_eval_max_passages", 2000))
    sample: dict[str, list[str]] = {}
    reference = None
    encoded = 0
    n_corpus = 0
    if not smoke_only:
        try:
            corpus, queries, _ = load_beir(cfg["eval_dir"])
        except FormatError as e:
            raise click.ClickException(f"deploy.eval_dir: {e}") from None
        n_corpus = len(corpus)
        sample = sample_test_set(corpus, queries, int(cfg.get("sample_passages", 256)),
                                 int(cfg.get("sample_queries", 256)), int(cfg.get("sample_seed", 0)))
        with console.status("fine-tuned vectors for the sample (embedding store)"):
            reference, encoded = stored_reference(cfg, export, sample)

    args = ["--params", params_path, "--model-dir", folder, "--backend", "onnx", "--variant", variant,
            "--model-name", name]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path.cwd()) + os.pathsep + env.get("PYTHONPATH", "")
    api_key = os.environ.get(scfg["api_key_env"], "") if scfg.get("api_key_env") else ""
    env["OPENAI_API_KEY"] = api_key or "none"  # what eval's openai client sends
    server = ServerProcess(args, env=env, startup_timeout_s=float(cfg["startup_timeout_s"]))
    record: dict[str, Any] = {}
    vectors: dict[str, Any] = {}
    serving: dict[str, Any] | None = None
    rc = 0
    try:
        with console.status("starting the server"):
            server.start()
        dimension = smoke_test(server.base_url, name, env["OPENAI_API_KEY"])
        console.print(f"server ready at {server.base_url} ('{name}', {variant}, dimension {dimension})")
        serving = served_setup(server.base_url, name, env["OPENAI_API_KEY"])
        if not smoke_only:
            vectors, rc, record = served_checks(server.base_url, name, env, params_path, cfg, scfg, variant, sample,
                                                reference, encoded, n_corpus <= full_max, out_path)
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None
    finally:
        stop_rc = server.close()

    if smoke_only:
        summary("deploy_check", {"model": name, "variant": variant, "endpoint": server.base_url,
                                 "evaluation": "skipped (--smoke-only)", "server exit code": stop_rc,
                                 "wall time s": round(time.time() - started, 1)})
        sys.exit(0)

    full = n_corpus <= full_max
    why = (f"test corpus has {n_corpus} passages <= deploy.full_eval_max_passages ({full_max}): served retrieval "
           "metrics evaluated over HTTP on the whole test set" if full else
           f"test corpus has {n_corpus} passages > deploy.full_eval_max_passages ({full_max}): served vectors "
           "checked on the sample only, no full evaluation over HTTP")
    passed = bool(vectors.get("passed")) and (not full or (rc == 0 and bool(record.get("passed"))))
    served_as = serving_description(serving) if serving else None
    result = {**record, "check": "sample+full" if full else "sample", "full_eval": full, "full_eval_reason": why,
              "variant": variant, "serving": serving,
              "served_as": served_as, "vector_check": vectors, "passed": passed,
              "wall_time_s": round(time.time() - started, 2)}
    write_json(out_path, result)

    report(result, name, server.base_url, sample, encoded, rc, record, stop_rc, out_path)
    sys.exit(0 if passed else 1)


def served_checks(url: str, name: str, env: dict, params_path: str, cfg: dict, scfg: dict, variant: str, sample: dict,
                  reference: Any, encoded: int, full: bool, out_path: str) -> tuple[dict, int, dict]:
    """Served vs stored vectors on the sample and, on a small test set, eval over HTTP -> (vectors, eval rc, record)."""
    record: dict[str, Any] = {}
    rc = 0
    batch = min(32, int(scfg.get("max_inputs_per_request") or 32))
    vectors = check_vectors(url, name, env["OPENAI_API_KEY"], sample, reference,
                            cosine_bar(cfg, variant), batch)
    vectors["reference_encoded"] = encoded
    if full:
        Path(out_path).unlink(missing_ok=True)  # never read back a stale result
        cmd = [sys.executable, "stages/eval.py", "--params", params_path, "--endpoint", url,
               "--model", name, "--beir-dir", cfg["eval_dir"], "--reference", cfg["reference"],
               "--out", out_path, "--api-key-env", "OPENAI_API_KEY"]
        rc = subprocess.run(cmd, env=env).returncode
        record = read_json(out_path) if Path(out_path).is_file() else {"passed": False,
                                                                          "error": f"eval exited {rc}"}
    return vectors, rc, record


def report(result: dict, name: str, endpoint: str, sample: dict, encoded: int, rc: int, record: dict, stop_rc: int,
           out_path: str) -> None:
    """The deploy_check summary and, when something failed, the one line saying what."""
    vectors, full, why, variant = result["vector_check"], result["full_eval"], result["full_eval_reason"], result["variant"]
    served_as, passed = result["served_as"], result["passed"]
    if "error" in vectors:
        verdict = f"FAILED: {vectors['error']}"
    else:
        verdict = (f"{'passed' if vectors['passed'] else 'FAILED'}: cosine min {vectors['cosine_min']:.5f} "
                   f"(required {vectors['cosine_required']}), mean {vectors['cosine_mean']:.5f}")
    rows = {"model": name, "variant": variant, "endpoint": endpoint, "served as": served_as or "-",
            "checks run": "sample vectors + full served metrics" if full else "sample vectors only",
            "why": why,
            "sample": f"{len(sample['passages'])} passages + {len(sample['queries'])} queries, "
                      f"{encoded} reference vectors encoded (the rest from the embedding store)",
            "sample vectors": verdict}
    if full:
        rows["served metrics (full test set)"] = "passed" if rc == 0 and record.get("passed") else f"FAILED (exit {rc})"
    rows.update({"server exit code": stop_rc, "wall time s": result["wall_time_s"]})
    summary("deploy_check", rows)
    if "error" in vectors:
        alert(f"ENDPOINT FAULT during the vector check: {vectors['error']}")
    elif not vectors.get("passed"):
        alert("the served vectors differ from the fine-tuned model's (see vector_check in " + out_path + ")")
    elif full and not passed:
        alert("the served model's metrics drift from metrics/eval.json (see eval's output above)")


def check_vectors(url: str, name: str, api_key: str, sample: dict[str, list[str]], reference: Any,
                  bar: float, batch_size: int = 32) -> dict[str, Any]:
    """Served vs stored vectors on the sample; an endpoint fault is a failed check, not a crash."""
    client = EmbeddingEndpoint(url, name, api_key, batch_size=batch_size, dimension=int(reference[0].shape[1]))
    base = {"passages": len(sample["passages"]), "queries": len(sample["queries"]), "cosine_required": bar}
    try:
        served = (client.embed(sample["passages"], "passage"), client.embed(sample["queries"], "query"))
    except EndpointError as e:
        return {**base, "passed": False, "error": str(e)}
    agreement = vector_agreement(reference, served)
    return {**base, **agreement, "passed": agreement["cosine_min"] >= bar}


if __name__ == "__main__":
    sys.exit(main())
