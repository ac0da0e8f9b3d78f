"""Client for any OpenAI-compatible `/v1/embeddings` endpoint that refuses to trust what comes back.

A served model can go wrong in ways that do not raise: a batch returned in the wrong order, a vector
missing, NaNs from a broken fp16 conversion, the wrong model behind the URL (other dimension). Each of
those silently ruins retrieval, so every response is checked and any fault is an `EndpointError`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm import tqdm


class EndpointError(RuntimeError):
    """The endpoint failed or returned something unusable; the message says what and where."""


class EmbeddingEndpoint:
    """Embed texts through `POST {base_url}/embeddings` with `input_type` query/passage.

    Retries on 408/409/429/5xx and connection errors are the openai client's (exponential backoff,
    honours Retry-After); `max_retries` bounds them.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        batch_size: int = 32,
        timeout: float = 60.0,
        max_retries: int = 5,
        dimension: int | None = None,
    ) -> None:
        from openai import OpenAI

        self.base_url = base_url.rstrip("/")
        self.model = model
        self.batch_size = max(1, int(batch_size))
        self.dimension = dimension
        # A local server usually needs no key, but the client insists on one.
        self.client = OpenAI(
            base_url=self.base_url, api_key=api_key or "none", timeout=timeout, max_retries=max_retries
        )

    def embed(self, texts: list[str], input_type: str, progress: bool | None = None) -> np.ndarray:
        """Embed all texts in batches; return L2-normalised float32 rows in input order."""
        rows: list[np.ndarray] = []
        batches = range(0, len(texts), self.batch_size)
        for start in tqdm(
            batches, desc=f"embed {input_type}s", unit="batch", disable=None if progress is None else not progress
        ):
            rows.append(self._request(texts[start : start + self.batch_size], input_type, start))
        if not rows:
            return np.zeros((0, self.dimension or 0), dtype=np.float32)
        vectors = np.concatenate(rows)
        self._check_order(texts, vectors, input_type)
        return vectors

    def _request(self, batch: list[str], input_type: str, offset: int = 0) -> np.ndarray:
        import openai

        where = f"{self.base_url}/embeddings ({input_type} inputs {offset}..{offset + len(batch) - 1})"
        try:
            response = self.client.embeddings.create(
                input=batch, model=self.model, extra_body={"input_type": input_type}
            )
        except openai.APIStatusError as e:
            raise EndpointError(f"{where}: HTTP {e.status_code}: {_short(e.message)}") from None
        except openai.APIConnectionError as e:
            raise EndpointError(f"{where}: cannot connect ({_short(str(e.__cause__ or e))})") from None
        except (openai.OpenAIError, ValueError, TypeError) as e:  # malformed JSON / schema, empty data
            raise EndpointError(f"{where}: malformed response ({type(e).__name__}: {_short(str(e))})") from None
        return self._check_batch(response.data or [], len(batch), where)

    def _check_batch(self, data: list[Any], expected: int, where: str) -> np.ndarray:
        """Every input has exactly one vector (by `index`), finite, non-zero, of the expected dimension."""
        if len(data) != expected:
            raise EndpointError(f"{where}: sent {expected} inputs but got {len(data)} vectors back")
        indices = [getattr(item, "index", None) for item in data]
        if sorted(i for i in indices if isinstance(i, int)) != list(range(expected)):
            raise EndpointError(
                f"{where}: response indices {indices[:10]}{'…' if expected > 10 else ''} are not a permutation of "
                f"0..{expected - 1} (vectors missing, duplicated or mislabelled)"
            )
        vectors: list[np.ndarray | None] = [None] * expected
        for item in data:
            vec = np.asarray(item.embedding, dtype=np.float32)
            if vec.ndim != 1 or vec.size == 0:
                raise EndpointError(f"{where}: vector for input {item.index} is not a flat list of numbers")
            if self.dimension is None:
                self.dimension = int(vec.size)  # the first vector sets it when nothing else did
            if vec.size != self.dimension:
                raise EndpointError(
                    f"{where}: vector for input {item.index} has dimension {vec.size}, expected {self.dimension} "
                    "(is the right model behind this URL?)"
                )
            if not np.isfinite(vec).all():
                raise EndpointError(f"{where}: vector for input {item.index} contains NaN or infinite values")
            norm = float(np.linalg.norm(vec))
            if norm == 0.0:
                raise EndpointError(f"{where}: vector for input {item.index} is all zeros")
            vectors[item.index] = vec / norm
        return np.stack(vectors)  # type: ignore[arg-type]

    def _check_order(self, texts: list[str], vectors: np.ndarray, input_type: str) -> None:
        """Re-embed two inputs of the first batch one at a time: a server that shuffles a batch but
        labels it 0..n-1 passes every per-batch check, but cannot pass this one."""
        first = min(len(texts), self.batch_size)
        if first < 2:
            return
        for i in (0, first - 1):
            single = self._request([texts[i]], input_type, i)[0]
            cosine = float(single @ vectors[i])
            if cosine < 0.99:
                raise EndpointError(
                    f"{self.base_url}/embeddings: {input_type} input {i} embedded alone differs from the same input "
                    f"embedded in a batch (cosine {cosine:.3f}): the server returns batch vectors in the wrong order "
                    "or mixes inputs up"
                )


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "…"
