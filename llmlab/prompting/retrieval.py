"""Demonstrations chosen per input: the k pool examples nearest to the item (Liu et al. 2021, "What
Makes Good In-Context Examples for GPT-3?").

Two ways to measure "near":
- tfidf: scikit-learn TF-IDF vectors of the input text (words and word pairs), cosine similarity;
  lexical, model-free, fast (a sparse matrix product over the whole pool).
- hidden: the loaded model's own last hidden state, mean-pooled over the text's tokens (padding
  excluded), cosine similarity; the model's view of the text, one forward pass per pool row.

An index is built once per pool and cached on disk under the llmlab cache dir, named by a hash of the
pool's input texts (and, for hidden, the model's name), so a 67k-row pool is indexed only once.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pickle
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from llmlab.core.errors import UsageError

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    from llmlab.backends.base import LM

RETRIEVERS = ("tfidf", "hidden")
DEFAULT = "tfidf"  # measured better than hidden on SST-2 and AG News with smollm2 (prompts/README.md)
_MEMO: dict[str, Any] = {}  # indexes loaded in this process, by cache key


def cache_dir() -> Path:
    from llmlab.backends.models import cache_root

    return cache_root() / "retrieval"


def pool_hash(texts: Sequence[str], extra: str = "") -> str:
    """A content hash of the pool's input texts (order matters: results are pool indexes)."""
    digest = hashlib.sha256(extra.encode("utf-8"))
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()[:24]


def _load_or_build(key: str, build: Any) -> Any:
    """The index for `key`: from this process, else from the disk cache, else built and cached."""
    if key in _MEMO:
        return _MEMO[key]
    path = cache_dir() / f"{key}.pkl"
    index = None
    if path.is_file():
        try:
            with open(path, "rb") as f:
                index = pickle.load(f)
        except Exception:  # a damaged or foreign cache file: rebuild it
            index = None
    if index is None:
        index = build()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=path.name, dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                pickle.dump(index, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)  # atomic: a crash never leaves half an index
        except OSError:
            pass  # an unwritable cache only costs a rebuild next time
    _MEMO[key] = index
    return index


class TfidfRetriever:
    """Cosine similarity of TF-IDF vectors (unigrams and bigrams, sublinear tf)."""

    name = "tfidf"

    def __init__(self, texts: Sequence[str]):
        try:
            importlib.import_module("sklearn")  # scikit-learn is an optional extra
        except ImportError:
            raise UsageError("--shot-selection similar needs scikit-learn: pip install scikit-learn") from None
        self.index = _load_or_build(f"tfidf-{pool_hash(texts)}", lambda: self._fit(texts))

    @staticmethod
    def _fit(texts: Sequence[str]) -> tuple[Any, Any]:
        from sklearn.feature_extraction.text import TfidfVectorizer

        # Rows come out L2-normalized, so a dot product is the cosine similarity.
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
        return vectorizer, vectorizer.fit_transform(list(texts))

    def similarities(self, queries: Sequence[str]) -> Any:
        """(queries x pool) cosine similarities as a dense numpy array."""
        vectorizer, matrix = self.index
        return (vectorizer.transform(list(queries)) @ matrix.T).toarray()


class HiddenRetriever:
    """Cosine similarity of the model's mean-pooled last hidden states."""

    name = "hidden"

    def __init__(self, texts: Sequence[str], lm: LM | None, batch_size: int = 32):
        if lm is None:
            raise UsageError("--shot-selection similar-hidden needs the model's hidden states; "
                             "use similar-tfidf where only the tokenizer is loaded (prompt render)")
        self.lm = lm
        self.batch_size = batch_size
        self.index = _load_or_build(f"hidden-{pool_hash(texts, lm.name)}", lambda: self.embed(texts))

    def embed(self, texts: Sequence[str]) -> Any:
        """(len(texts) x hidden) float32 numpy array of L2-normalized mean-pooled last hidden states."""
        return self.lm.embed(texts, self.batch_size)

    def similarities(self, queries: Sequence[str]) -> Any:
        return self.embed(queries) @ self.index.T


def make_retriever(kind: str, texts: Sequence[str], lm: LM | None = None) -> Any:
    if kind == "tfidf":
        return TfidfRetriever(texts)
    if kind == "hidden":
        return HiddenRetriever(texts, lm)
    raise UsageError(f"unknown retriever '{kind}': choose {', '.join(RETRIEVERS)}")


def nearest(similarities: Any, k: int, exclude: Sequence[set[int]]) -> list[list[int]]:
    """For each query row, the k most similar pool indexes not in its exclude set, least similar
    first: the most similar demonstration ends up right before the query (Liu et al.'s best order).
    Ties break by pool index, so the choice is deterministic."""
    import numpy as np

    chosen = []
    for row, skip in zip(similarities, exclude):
        # A stable sort of -score: most similar first, ties in pool order (deterministic).
        top = np.argsort(-np.asarray(row), kind="stable")[: k + len(skip)].tolist()
        picked = [i for i in top if i not in skip][:k]
        chosen.append(picked[::-1])
    return chosen
