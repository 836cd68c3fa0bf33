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
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence, Tuple, TypeAlias, TypeVar, Union, cast

from llmlab import NOTICE
from llmlab.core.errors import UsageError
from llmlab.core.jsontypes import JSONObject

if TYPE_CHECKING:  # types only: nothing more is imported at run time
    import numpy as np
    import numpy.typing as npt
    from scipy.sparse import csr_matrix  # type: ignore[import-untyped]
    from sklearn.feature_extraction.text import TfidfVectorizer

    from llmlab.backends.base import LM, Vector

Arrays = dict[str, "npt.NDArray[np.generic]"]  # a cache file's arrays by name
TfidfIndex = Tuple["TfidfVectorizer", "csr_matrix"]
Similarities: TypeAlias = "npt.NDArray[np.floating]"  # (queries x pool) cosine similarities
Index = TypeVar("Index")

RETRIEVERS = ("tfidf", "hidden")
DEFAULT = "tfidf"  # measured better than hidden on SST-2 and AG News with smollm2 (prompts/README.md)
TFIDF_ANNOUNCE = 5000  # pool rows from which a TF-IDF index build takes long enough to say so
_MEMO: dict[str, object] = {}  # indexes loaded in this process, by cache key (its kind first)
_log = logging.getLogger("llmlab")  # library code never prints; the CLI shows this log


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


FORMAT = 1  # the cache file layout below; another number is rebuilt


def _save(path: Path, arrays: Arrays, meta: JSONObject) -> None:
    """Arrays and JSON metadata in one .npz (numeric arrays only: it loads with allow_pickle=False),
    written to a temporary file and renamed, so a crash never leaves half an index."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"format": FORMAT, **meta}).encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            # numpy's stub types **arrays as clashing with its allow_pickle keyword
            np.savez(f, meta=np.frombuffer(text, dtype=np.uint8), **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path) -> tuple[Arrays, JSONObject]:
    """(arrays, metadata) of a cache file; never unpickles (an object array is an error)."""
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        arrays = {name: data[name] for name in data.files}
    meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"cache format {meta.get('format') if isinstance(meta, dict) else '?'}, not {FORMAT}")
    return arrays, meta


def _move_aside(path: Path, why: str) -> None:
    """A damaged, foreign or wrong-shape cache file: renamed out of the way (kept for a look), rebuilt."""
    aside = path.with_name(f"{path.name}.bad-{os.getpid()}-{int(time.time())}")
    try:
        os.replace(path, aside)
        where = f"moved to '{aside.name}'"
    except OSError:
        where = "left in place"
    _log.warning(f"the similar-shot index '{path}' is unusable ({why}); {where}, rebuilding it")


def _load_or_build(key: str, build: Callable[[], Index], read: Callable[[Arrays, JSONObject], Index],
                   write: Callable[[Index], tuple[Arrays, JSONObject]], announce: str | None = None) -> Index:
    """The index for `key`: from this process, else from the disk cache, else built and cached.
    read(arrays, meta) -> index checks the file against the pool (ValueError when it doesn't fit);
    write(index) -> (arrays, meta). announce, when given, is logged before a build (long, once)."""
    if key in _MEMO:
        return cast(Index, _MEMO[key])  # the key names its kind (tfidf-, hidden-): built by the same read/build
    path = cache_dir() / f"{key}.npz"
    index: Index | None = None
    if path.is_file():
        try:
            index = read(*_load(path))
        except Exception as exc:  # noqa: BLE001 - whatever lies there, it is never trusted
            _move_aside(path, f"{type(exc).__name__}: {exc}"[:200])
    elif path.exists():  # a folder, a FIFO, a device: never opened
        _move_aside(path, "not a regular file")
    if index is None:
        if announce:
            logging.getLogger("llmlab").log(NOTICE, announce)
        index = build()
        try:
            _save(path, *write(index))
        except OSError:
            pass  # an unwritable cache only costs a rebuild next time
    _MEMO[key] = index
    return index


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(what)


def _shape(value: object) -> tuple[int, int]:
    """A cache file's (rows, columns)."""
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(n, int) for n in value)):
        raise ValueError(f"its shape {value!r} is not (rows, columns)")
    return int(value[0]), int(value[1])


class TfidfRetriever:
    """Cosine similarity of TF-IDF vectors (unigrams and bigrams, sublinear tf)."""

    name = "tfidf"

    def __init__(self, texts: Sequence[str]):
        try:
            importlib.import_module("sklearn")  # scikit-learn is an optional extra
        except ImportError:
            raise UsageError("--shot-selection similar needs scikit-learn: pip install scikit-learn") from None
        self.size = len(texts)
        announce = f"indexing {len(texts)} pool rows for similar shots (tfidf; once, then cached)"
        self.index = _load_or_build(f"tfidf-{pool_hash(texts)}", lambda: self._fit(texts), self._read, self._write,
                                    announce if len(texts) >= TFIDF_ANNOUNCE else None)

    @staticmethod
    def _fit(texts: Sequence[str]) -> TfidfIndex:
        from sklearn.feature_extraction.text import TfidfVectorizer

        # Rows come out L2-normalized, so a dot product is the cosine similarity.
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
        return vectorizer, vectorizer.fit_transform(list(texts))

    @staticmethod
    def _write(index: TfidfIndex) -> tuple[Arrays, JSONObject]:
        vectorizer, matrix = index
        terms = sorted(vectorizer.vocabulary_, key=vectorizer.vocabulary_.get)  # in column order
        return ({"idf": vectorizer.idf_, "data": matrix.data, "indices": matrix.indices, "indptr": matrix.indptr},
                {"kind": "tfidf", "shape": list(matrix.shape), "terms": terms})

    def _read(self, arrays: Arrays, meta: JSONObject) -> TfidfIndex:
        """The vectorizer and matrix rebuilt from plain arrays, each checked against this pool."""
        import numpy as np
        from scipy.sparse import csr_matrix
        from sklearn.feature_extraction.text import TfidfVectorizer

        terms, (rows, cols) = meta.get("terms"), _shape(meta.get("shape"))
        if not isinstance(terms, list):
            raise ValueError("its terms are not a list")
        idf, data, indices, indptr = (arrays[k] for k in ("idf", "data", "indices", "indptr"))
        _check(meta.get("kind") == "tfidf" and rows == self.size, f"{rows} rows for a pool of {self.size}")
        _check(isinstance(terms, list) and all(isinstance(t, str) for t in terms) and len(set(terms)) == cols,
               "its terms do not match its columns")
        _check(idf.shape == (cols,) and indptr.shape == (rows + 1,) and data.shape == indices.shape
               and indptr[0] == 0 and indptr[-1] == len(data) and bool(np.all(np.diff(indptr) >= 0)),
               "its arrays have the wrong shape")
        _check(len(indices) == 0 or (indices.min() >= 0 and indices.max() < cols), "column numbers out of range")
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
        vectorizer.vocabulary_ = {term: i for i, term in enumerate(terms)}
        vectorizer.idf_ = idf.astype(np.float64)
        return vectorizer, csr_matrix((data, indices, indptr), shape=(rows, cols))

    def similarities(self, queries: Sequence[str]) -> Similarities:
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
        self.size, self._first = len(texts), list(texts[:1])
        self.index = _load_or_build(f"hidden-{pool_hash(texts, lm.name)}", lambda: self.embed(texts),
                                    self._read, lambda index: ({"vectors": index}, {"kind": "hidden"}),
                                    f"indexing {len(texts)} pool rows for similar shots (the model's hidden "
                                    "states, one forward pass each; once, then cached)")

    def _read(self, arrays: Arrays, meta: JSONObject) -> Vector:
        import numpy as np

        vectors = arrays["vectors"]
        _check(meta.get("kind") == "hidden" and vectors.ndim == 2 and vectors.shape[0] == self.size
               and vectors.dtype.kind == "f", f"vectors of shape {vectors.shape} for a pool of {self.size}")
        width = self.embed(self._first).shape[1]  # one short forward pass: the model's own width
        _check(vectors.shape[1] == width, f"{vectors.shape[1]} dimensions, the model gives {width}")
        return vectors.astype(np.float32, copy=False)  # written as float32: the same array

    def embed(self, texts: Sequence[str]) -> Vector:
        """(len(texts) x hidden) float32 numpy array of L2-normalized mean-pooled last hidden states."""
        return self.lm.embed(texts, self.batch_size)

    def similarities(self, queries: Sequence[str]) -> Similarities:
        return self.embed(queries) @ self.index.T


Retriever = Union[TfidfRetriever, HiddenRetriever]


def make_retriever(kind: str, texts: Sequence[str], lm: LM | None = None) -> Retriever:
    if kind == "tfidf":
        return TfidfRetriever(texts)
    if kind == "hidden":
        return HiddenRetriever(texts, lm)
    raise UsageError(f"unknown retriever '{kind}': choose {', '.join(RETRIEVERS)}")


def nearest(similarities: Similarities, k: int, exclude: Sequence[set[int]]) -> list[list[int]]:
    """For each query row, the k most similar pool indexes not in its exclude set, least similar
    first: the most similar demonstration ends up right before the query (Liu et al.'s best order).
    Ties break by pool index, so the choice is deterministic."""
    import numpy as np

    chosen = []
    row: Similarities
    for row, skip in zip(similarities, exclude):
        # A stable sort of -score: most similar first, ties in pool order (deterministic).
        top = np.argsort(-np.asarray(row), kind="stable")[: k + len(skip)].tolist()
        picked = [i for i in top if i not in skip][:k]
        chosen.append(picked[::-1])
    return chosen
