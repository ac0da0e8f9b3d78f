"""Stage `deploy_check`: serve models/onnx over HTTP and check that the served model scores like the local one.

Starts `stages/serve.py` on a free loopback port, waits until it is ready, sends one request as a smoke
test, runs `stages/eval.py --endpoint` against it (which compares with metrics/eval.json and exits
non-zero on drift), stops the server whatever happens, and exits with eval's exit code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import click

from embedpipe.console import alert, console, summary
from embedpipe.onnx_encoder import ExportNotFound, read_export_config
from embedpipe.params import load_params, section
from embedpipe.server import ServerProcess


def smoke_test(base_url: str, model: str, api_key: str) -> int:
    """One real embeddings request through the openai client; returns the vector's dimension."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    response = client.embeddings.create(model=model, input=["deploy check"])
    return len(response.data[0].embedding)


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="Params file.")
@click.option("--model-dir", default=None, help="Exported folder (default serve.model_dir).")
@click.option("--variant", default=None, help="ONNX variant to serve (overrides deploy.variant).")
@click.option("--out", "out_path", default="metrics/serve_eval.json", show_default=True, help="Served metrics.")
@click.option("--smoke-only", is_flag=True, help="Start, send one request, stop: no evaluation.")
def main(params_path: str, model_dir: str | None, variant: str | None, out_path: str, smoke_only: bool) -> None:
    """Serve the exported model on a free loopback port and evaluate it over HTTP against metrics/eval.json."""
    started = time.time()
    params = load_params(params_path)
    cfg, scfg = section(params, "deploy"), section(params, "serve")
    folder = model_dir or scfg["model_dir"]
    try:
        name = read_export_config(folder)["name"]
    except ExportNotFound as e:
        raise click.ClickException(str(e)) from None
    variant = variant or cfg["variant"]
    args = ["--params", params_path, "--model-dir", folder, "--backend", "onnx", "--variant", variant,
            "--model-name", name]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path.cwd()) + os.pathsep + env.get("PYTHONPATH", "")
    api_key = os.environ.get(scfg["api_key_env"], "") if scfg.get("api_key_env") else ""
    env["OPENAI_API_KEY"] = api_key or "none"  # what eval's openai client sends
    server = ServerProcess(args, env=env, startup_timeout_s=float(cfg["startup_timeout_s"]))
    rc = 0
    try:
        with console.status("starting the server"):
            server.start()
        dimension = smoke_test(server.base_url, name, env["OPENAI_API_KEY"])
        console.print(f"server ready at {server.base_url} ('{name}', {variant}, dimension {dimension})")
        if not smoke_only:
            cmd = [sys.executable, "stages/eval.py", "--endpoint", server.base_url,
                   "--model", name, "--beir-dir", cfg["eval_dir"], "--reference", cfg["reference"],
                   "--out", out_path]
            rc = subprocess.run(cmd, env=env).returncode
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None
    finally:
        stop_rc = server.close()
    summary("deploy_check", {"model": name, "variant": variant, "endpoint": server.base_url,
                             "evaluation": "skipped (--smoke-only)" if smoke_only else ("passed" if rc == 0 else
                                                                                        f"FAILED (exit {rc})"),
                             "server exit code": stop_rc, "wall time s": round(time.time() - started, 1)})
    if rc:
        alert("the served model's metrics drift from metrics/eval.json (see eval's output above)")
    sys.exit(rc)


if __name__ == "__main__":
    sys.exit(main())
