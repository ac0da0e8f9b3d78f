"""Shared fixtures. Tests run offline against real components (models, HTTP servers, subprocesses)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture(scope="session", autouse=True)
def embedding_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test and every stage it starts uses a scratch embedding store, never the developer's cache/embeddings.

    Set before any module-scoped fixture runs a stage (session fixtures come first); tests that count
    encodes point EMBEDPIPE_EMBED_CACHE at their own folder.
    """
    from embedpipe.core.embed_store import STORE_ENV

    root = tmp_path_factory.mktemp("embed_store")
    os.environ[STORE_ENV] = str(root)
    return root


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_docs_dir() -> Path:
    """Five small documents (md, txt, html) about a fictional kitchen-appliance range."""
    return REPO_ROOT / "tests" / "data" / "tiny_docs"


@pytest.fixture(scope="session")
def tiny_corpus_path() -> Path:
    """21 passages chunked from tiny_docs (target 48 tokens), in the corpus.jsonl format."""
    return REPO_ROOT / "tests" / "data" / "tiny_corpus.jsonl"


@pytest.fixture(scope="session")
def minilm():
    """The embedded default embedder, loaded once per test session."""
    from embedpipe.core.models import load_model

    return load_model("all-MiniLM-L6-v2", device="cpu")


@pytest.fixture(name="free_port")
def free_port_fixture() -> int:
    from embedpipe.core.processes import free_port

    return free_port()


def stage_env() -> dict[str, str]:
    """Environment for running a stage script as a subprocess from the repo root."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env
