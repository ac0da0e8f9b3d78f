"""Human-query nDCG@10 of other WiSE-FT alphas for the seeds of a kept `bench_quality.py` workspace, without retraining.

    python bench/wise_alpha_sweep.py --workdir /work/bq-a03 --beir /work/django-faq/beir --alphas 0.3,0.5,1.0

A seed's saved model is base + a_s * (tuned - base) with a_s its `wise_alpha` (metrics/train.json), so any other
alpha is exact arithmetic on the saved and base weights: base + (alpha / a_s) * (saved - base). Each is written to
a scratch folder and evaluated with `stages/eval.py --beir-dir` (the bench's own evaluation); prints one line per
seed and alpha and writes OUT (JSON). Needs a workspace run with `--keep`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedpipe.core.io import read_json  # noqa: E402
from embedpipe.core.models import resolve_model  # noqa: E402
from embedpipe.training.trainer import interpolate_state  # noqa: E402


@click.command()
@click.option("--workdir", required=True, type=click.Path(exists=True, file_okay=False), help="Kept bench workspace.")
@click.option("--beir", required=True, type=click.Path(exists=True, file_okay=False), help="The bench's BEIR folder.")
@click.option("--alphas", default="0.3,0.5,1.0", show_default=True, help="Comma-separated alphas in (0, 1].")
@click.option("--base-model", default="all-MiniLM-L6-v2", show_default=True, help="The runs' base model.")
@click.option("--out", "out_path", default=None, help="Result JSON [default: WORKDIR/wise_alpha_sweep.json].")
def main(workdir: str, beir: str, alphas: str, base_model: str, out_path: str | None) -> None:
    work = Path(workdir)
    wanted = [float(a) for a in alphas.split(",")]
    base_ndcg = read_json(work / "eval_base" / "eval.json")["base"]["ndcg@10"]
    base = load_file(str(Path(resolve_model(base_model)) / "model.safetensors"))
    result: dict[str, dict[str, float]] = {}
    for seed_dir in sorted(work.glob("seed*")):
        saved_alpha = read_json(seed_dir / "metrics" / "train.json")["wise_alpha"]
        if not 0 < saved_alpha <= 1:
            click.echo(f"{seed_dir.name}: saved alpha {saved_alpha} (the base model): nothing to reweight", err=True)
            continue
        saved = load_file(str(seed_dir / "model" / "model.safetensors"))
        # the packaged base file also holds buffers a saved model leaves out (embeddings.position_ids)
        base_weights = {name: tensor for name, tensor in base.items() if name in saved}
        params = work / "params" / f"{seed_dir.name}.yaml"
        for alpha in wanted:
            with tempfile.TemporaryDirectory(prefix="wise-sweep-") as tmp:
                model_dir = Path(tmp) / "model"
                shutil.copytree(seed_dir / "model", model_dir)
                # torch.lerp(base, saved, r) = base + r * (saved - base); r > 1 extrapolates towards the tuned model
                save_file(interpolate_state(base_weights, saved, alpha / saved_alpha), str(model_dir / "model.safetensors"),
                          metadata={"format": "pt"})
                subprocess.run([sys.executable, "stages/eval.py", "--params", str(params), "--beir-dir", beir,
                                "--models-only", "finetuned", "--finetuned", str(model_dir), "--out-dir",
                                str(Path(tmp) / "eval"), "--metrics", str(Path(tmp) / "eval.json")],
                               cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
                ndcg = read_json(Path(tmp) / "eval.json")["finetuned"]["ndcg@10"]
            result.setdefault(seed_dir.name, {})[f"{alpha:g}"] = ndcg
            click.echo(f"{seed_dir.name} alpha {alpha:g}: nDCG@10 {ndcg:.4f} ({100 * (ndcg / base_ndcg - 1):+.1f}%)")
    out = Path(out_path) if out_path else work / "wise_alpha_sweep.json"
    out.write_text(json.dumps({"base_ndcg@10": base_ndcg, "ndcg@10": result}, indent=1) + "\n", encoding="utf-8")
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
