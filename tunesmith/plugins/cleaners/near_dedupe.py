"""Near-duplicate dedupe: MinHash signatures and LSH (datasketch) over folded text.

Shingles are character (default) or word n-grams of the folded text (case,
punctuation and whitespace folded). Signatures are computed for a batch of records
at once with numpy, by exactly the scheme of ``datasketch.MinHash`` (affine32: a
MurmurHash3 pre-mix, then ``a*h+b`` mod 2^32, minimum per permutation) with the
shingle hash below as its ``hashfunc``; a test checks they agree bit for bit. The
index is ``datasketch.MinHashLSH``; an LSH candidate counts as a duplicate only when
the estimated Jaccard similarity of the two signatures reaches the threshold.
The first record of a group is kept.
"""

from __future__ import annotations

import zlib
from typing import Any, Iterable, Iterator, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl
from tunesmith.core.data import where
from tunesmith.core.data_clean import Verdict, dedupe_text, fold

_MASK32 = 0xFFFFFFFF
MULT = 0x01000193  # FNV prime: the polynomial base of the shingle hash


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threshold: float = Field(0.9, gt=0.0, le=1.0, description="Jaccard similarity at which two rows are duplicates.")
    ngram: int = Field(5, ge=1, description="Shingle size (characters or words, see unit).")
    unit: Literal["char", "word"] = Field("char", description="Shingle characters or words of the folded text.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations.")
    seed: int = Field(1, description="Seed of the MinHash permutations.")
    batch_size: int = Field(2048, ge=1, description="Records whose signatures are computed together.")
    bands: int | None = Field(
        None, ge=1, description="LSH bands (rows per band = num_perm // bands); default: the fewest bands that "
        "make a pair at the threshold a candidate with probability >= 0.99 (recall first; candidates are verified).",
    )


def lsh_params(threshold: float, num_perm: int, bands: int | None = None) -> tuple[int, int]:
    """(bands, rows): recall-first banding. datasketch's own optimum for 0.9 (5 x 25) makes
    a pair at J=0.9 a candidate only ~31% of the time; verification keeps precision."""
    if bands is not None:
        return bands, max(1, num_perm // bands)
    for r in range(num_perm, 0, -1):
        b = num_perm // r
        if 1 - (1 - threshold ** r) ** b >= 0.99:
            return b, r
    return num_perm, 1


# --------------------------------------------------------------------------- shingle hashing (reference form)
def shingle_hash(shingle: str) -> int:
    """32-bit hash of one character shingle: polynomial over code points (Horner, mod 2^32)."""
    h = 0
    for ch in shingle:
        h = (h * MULT + ord(ch)) & _MASK32
    return h


def word_hash(word: str) -> int:
    return zlib.crc32(word.encode("utf-8", "surrogatepass"))


def word_shingle_hash(words: tuple[str, ...] | list[str]) -> int:
    h = 0
    for w in words:
        h = (h * MULT + word_hash(w)) & _MASK32
    return h


def shingles(text: str, ngram: int, unit: str) -> list:
    """The shingles of folded text (for the reference path and tests)."""
    if unit == "word":
        words = text.split()
        if len(words) <= ngram:
            return [tuple(words)]
        return [tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1)]
    if len(text) <= ngram:
        return [text]
    return [text[i:i + ngram] for i in range(len(text) - ngram + 1)]


# --------------------------------------------------------------------------- vectorised hashing
def _poly_window(vals: np.ndarray, k: int) -> np.ndarray:
    """Hashes of every window of ``k`` values: sum v[i+j] * MULT^(k-1-j) mod 2^32."""
    n = len(vals)
    if n <= k:
        k = n
        out = np.zeros(1, dtype=np.uint64)
        for j in range(k):
            out = (out * MULT + vals[j]) & _MASK32
        return out.astype(np.uint32)
    m = n - k + 1
    acc = np.zeros(m, dtype=np.uint64)
    for j in range(k):
        acc = (acc * MULT + vals[j:j + m]) & _MASK32
    return acc.astype(np.uint32)


def text_shingle_hashes(text: str, ngram: int, unit: str) -> np.ndarray:
    """32-bit shingle hashes of folded text (same values as the reference form)."""
    if unit == "word":
        words = text.split()
        vals = np.fromiter((word_hash(w) for w in words), dtype=np.uint64, count=len(words))
    else:
        vals = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
    if len(vals) == 0:
        vals = np.zeros(1, dtype=np.uint64) if unit == "char" else np.array([0], dtype=np.uint64)
        return np.zeros(1, dtype=np.uint32)  # the empty shingle
    # repeated shingles do not change a minimum: no need to deduplicate them
    return _poly_window(vals, ngram)


class Signer:
    """MinHash signatures by datasketch's affine32 scheme, many texts at once."""

    def __init__(self, num_perm: int = 128, seed: int = 1) -> None:
        from datasketch import MinHash

        proto = MinHash(num_perm=num_perm, seed=seed, scheme="affine32")
        if proto.scheme != "affine32":  # pragma: no cover - datasketch changed its default
            raise RuntimeError("datasketch affine32 scheme unavailable")
        a, b = proto.permutations
        self.a = np.asarray(a, dtype=np.uint32)[:, None]
        self.b = np.asarray(b, dtype=np.uint32)[:, None]
        self.num_perm = num_perm
        self.seed = seed

    @staticmethod
    def fmix32(h: np.ndarray) -> np.ndarray:
        h = h ^ (h >> np.uint32(16))
        h = h * np.uint32(0x85EBCA6B)
        h = h ^ (h >> np.uint32(13))
        h = h * np.uint32(0xC2B2AE35)
        return h ^ (h >> np.uint32(16))

    def sign_hashes(self, hash_arrays: list[np.ndarray]) -> np.ndarray:
        """(len(hash_arrays), num_perm) uint32 signatures."""
        lengths = np.fromiter((len(h) for h in hash_arrays), dtype=np.int64, count=len(hash_arrays))
        allh = self.fmix32(np.concatenate(hash_arrays).astype(np.uint32))
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        out = np.empty((len(hash_arrays), self.num_perm), dtype=np.uint32)
        # chunk the (num_perm x shingles) product to bound memory
        chunk = 1 << 16
        doc = 0
        n_docs = len(hash_arrays)
        while doc < n_docs:
            end = doc
            total = 0
            while end < n_docs and (total == 0 or total + lengths[end] <= chunk):
                total += lengths[end]
                end += 1
            lo = starts[doc]
            seg = allh[lo:lo + total]
            with np.errstate(over="ignore"):
                phv = seg[None, :] * self.a + self.b
            out[doc:end] = np.minimum.reduceat(phv, starts[doc:end] - lo, axis=1).T
            doc = end
        return out

    def sign(self, texts: list[str], ngram: int, unit: str) -> np.ndarray:
        return self.sign_hashes([text_shingle_hashes(t, ngram, unit) for t in texts])


class _Sig:
    """What MinHashLSH needs of a MinHash: length, hash values, scheme."""

    __slots__ = ("hashvalues", "scheme")

    def __init__(self, hashvalues: np.ndarray) -> None:
        self.hashvalues = hashvalues
        self.scheme = "affine32"

    def __len__(self) -> int:
        return len(self.hashvalues)


class NearDedupe:
    name = "near_dedupe"
    default_order = 40  # in the default chain (normalize, length, exact_dedupe, near_dedupe, pii, quality)
    description = "Drop near-duplicates: MinHash LSH (datasketch) over folded text, threshold and n-gram configurable."
    Options = Options

    def apply(self, records: Iterable[dict], options: Options | None, context: Any) -> Iterator[Verdict]:
        from datasketch import MinHashLSH

        opts = options or Options()
        signer = Signer(opts.num_perm, opts.seed)
        lsh = MinHashLSH(threshold=opts.threshold, num_perm=opts.num_perm,
                         params=lsh_params(opts.threshold, opts.num_perm, opts.bands))
        sigs: list[np.ndarray] = []
        places: list[str] = []
        batch: list[dict] = []

        def flush(batch: list[dict]) -> Iterator[Verdict]:
            mat = signer.sign([fold(dedupe_text(r)) for r in batch], opts.ngram, opts.unit)
            for r, sig in zip(batch, mat):
                s = _Sig(sig)
                best, best_sim = None, 0.0
                for key in lsh.query(s):
                    sim = float(np.count_nonzero(sigs[key] == sig)) / opts.num_perm
                    if sim > best_sim:
                        best, best_sim = key, sim
                if best is not None and best_sim >= opts.threshold:
                    yield Verdict.reject(r, f"near duplicate of {places[best]} (similarity {best_sim:.2f})",
                                         "near_duplicate")
                    continue
                key = len(sigs)
                sigs.append(sig)
                places.append(where(r))
                lsh.insert(key, s, check_duplication=False)
                yield Verdict.keep(r)

        for r in records:
            batch.append(r)
            if len(batch) >= opts.batch_size:
                yield from flush(batch)
                batch = []
        if batch:
            yield from flush(batch)


@hookimpl
def register_cleaners(register):
    register(NearDedupe())
