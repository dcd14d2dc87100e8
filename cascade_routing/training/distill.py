"""Distil a small student encoder from the frozen teacher (default all-MiniLM-L6-v2) on CPU.

The student is a plain Hugging Face ``BertModel`` (``L`` layers, width ``H``) that uses the
teacher's tokenizer and vocabulary, so ``data.encoder_path: <student folder>`` works through the
rest of the pipeline unchanged. Objective, on texts ``x`` with teacher embedding ``t(x)`` [384]
(mean-pooled teacher output, from :class:`~cascade_routing.estimators.encoding.EmbeddingCache`):

    s(x) = mean_pool(student(x))                  [H]   (what the estimator heads will see)
    loss = Σ ||P·s(x) + b − t(x)||² / Σ ||t(x) − t̄||²   (relative MSE = 1 − R² of the projection)

``P`` [384, H] is a linear projection used for training only (not saved). MSE rather than cosine
because the heads consume the raw (unnormalised) embedding through linear layers: a linear map of
the student embedding should reproduce the teacher embedding itself, not only its direction;
dividing by the teacher's total variance makes the number read as the unexplained fraction.

Fast convergence on CPU: the student's word, position and token-type embeddings start from the
teacher's projected on the top-``H`` principal directions of the teacher's word embeddings
(truncated SVD), so the bag of words is right from step 0 and training mostly fits context.

Training texts: the TRAIN split's queries (the same split as the data module) and, optionally, a
seeded sample of train-split answers; never val / calibration / test rows. Each text is cut to
``max_length`` tokens by ``truncation`` (:func:`~cascade_routing.estimators.encoding.tokenize`),
for teacher and student alike; default ``"right"`` (the text's start), what the shipped students
were distilled with, although the data module cuts queries ``"left"`` by default (``data.truncation``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from cascade_routing.estimators import encoding

REPORT_FILE = "distillation.json"


@dataclass
class StudentConfig:
    """Shape of the student BertModel (vocabulary, positions, token types come from the teacher)."""

    layers: int = 2
    hidden: int = 128
    heads: int = 4
    intermediate: int | None = None  # None: 4 * hidden

    def __post_init__(self) -> None:
        if self.layers < 1 or self.hidden < 1 or self.heads < 1:
            raise ValueError(f"student needs layers, hidden and heads >= 1, got layers={self.layers}, "
                             f"hidden={self.hidden}, heads={self.heads}")
        if self.intermediate is not None and self.intermediate < 1:
            raise ValueError(f"student intermediate (feed-forward width) must be >= 1 or None (4 x hidden), "
                             f"got {self.intermediate}")
        if self.hidden % self.heads:
            raise ValueError(f"student hidden size {self.hidden} is not divisible by {self.heads} attention heads")


@dataclass
class DistillResult:
    """What :func:`distill_encoder` did; also written as ``distillation.json`` in the student folder."""

    path: str
    teacher: str
    teacher_fingerprint: str
    student: dict
    texts_train: int
    texts_heldout: int
    epochs: int
    seed: int
    # relative MSE on the held-out distillation texts before training / after; None without held-out texts
    heldout_loss_initial: float | None
    heldout_loss_final: float | None
    train_loss_per_epoch: list[float] = field(default_factory=list)
    heldout_loss_per_epoch: list[float | None] = field(default_factory=list)
    seconds: float = 0.0
    sources: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def student_bert_config(teacher_config, student: StudentConfig):
    """A ``BertConfig`` of the student's shape with the teacher's vocabulary, positions and special ids."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=int(teacher_config.vocab_size),
        hidden_size=student.hidden,
        num_hidden_layers=student.layers,
        num_attention_heads=student.heads,
        intermediate_size=student.intermediate or 4 * student.hidden,
        max_position_embeddings=int(teacher_config.max_position_embeddings),
        type_vocab_size=int(getattr(teacher_config, "type_vocab_size", 2)),
        pad_token_id=int(getattr(teacher_config, "pad_token_id", 0) or 0),
        layer_norm_eps=float(getattr(teacher_config, "layer_norm_eps", 1e-12)),
    )


@torch.no_grad()
def init_embeddings_from_teacher(student: nn.Module, teacher: nn.Module) -> float:
    """Copy the teacher's input embeddings projected on their top-H principal directions.

    With E [V, D] the teacher's word embeddings, μ their mean and E − μ ≈ U S Vᵀ (truncated SVD,
    H components): word ← (E − μ)·V_H, position ← (P − p̄)·V_H, token type ← (T − τ̄)·V_H.
    Returns the fraction of the word embeddings' variance kept by the H directions.
    """
    s_emb, t_emb = student.embeddings, teacher.embeddings
    h = s_emb.word_embeddings.weight.shape[1]
    words = t_emb.word_embeddings.weight.float()
    if words.shape[0] != s_emb.word_embeddings.weight.shape[0]:
        raise ValueError(
            f"student vocabulary ({s_emb.word_embeddings.weight.shape[0]}) differs from the teacher's ({words.shape[0]})"
        )
    centered = words - words.mean(0)
    _, sing, vh = torch.linalg.svd(centered, full_matrices=False)
    k = min(h, vh.shape[0])
    basis = vh[:k].T  # [D, k]
    s_emb.word_embeddings.weight.zero_()
    s_emb.word_embeddings.weight[:, :k] = centered @ basis
    for name in ("position_embeddings", "token_type_embeddings"):
        src, dst = getattr(t_emb, name).weight.float(), getattr(s_emb, name).weight
        rows = min(src.shape[0], dst.shape[0])
        dst.zero_()
        dst[:rows, :k] = (src[:rows] - src[:rows].mean(0)) @ basis
    return float((sing[:k] ** 2).sum() / (sing**2).sum())


def weights_digest(model: nn.Module) -> str:
    """sha256 (16 hex) of a model's parameters and buffers, by name."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _length_batches(lengths: Tensor, batch_size: int, gen: torch.Generator) -> list[Tensor]:
    """Positions 0..n-1 in batches of similar length (less padding), batch order shuffled.

    Sort by length plus uniform noise of ±25% (so batches differ between epochs), cut into
    batches, shuffle the batches.
    """
    noisy = lengths.float() * (1 + 0.5 * (torch.rand(lengths.numel(), generator=gen) - 0.5))
    order = torch.argsort(noisy)
    chunks = [order[i : i + batch_size] for i in range(0, order.numel(), batch_size)]
    return [chunks[int(i)] for i in torch.randperm(len(chunks), generator=gen)]


class _Distiller(nn.Module):
    """Student + mean pooling + the training-only projection to the teacher's width."""

    def __init__(self, student: nn.Module, teacher_dim: int) -> None:
        super().__init__()
        self.student = encoding.TextEncoder(student)
        self.proj = nn.Linear(self.student.hidden_size, teacher_dim)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.proj(self.student(ids, mask))


def distill_encoder(
    texts: list[str],
    out: str | Path,
    teacher_path: str | None = None,
    student: StudentConfig | None = None,
    epochs: int = 6,
    batch_size: int = 32,
    lr: float = 2e-3,
    max_length: int = 128,
    heldout_fraction: float = 0.05,
    seed: int = 0,
    teacher_embeddings: np.ndarray | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    sources: dict | None = None,
    truncation: str = "right",
) -> DistillResult:
    """Train a student on ``texts`` to match the teacher's mean-pooled embeddings; save it to ``out``.

    Each text is cut to ``max_length`` tokens by ``truncation`` (one of
    :data:`~cascade_routing.estimators.encoding.TRUNCATIONS`, :func:`encoding.tokenize`), for the
    teacher and the student alike (recorded in the report's ``sources``). ``teacher_embeddings``
    [len(texts), D] skips the teacher (else they come from the embedding cache, computing what is
    missing). A seeded ``heldout_fraction`` (in [0, 1)) of the
    texts is kept out of training to report the loss before/after (relative MSE, module docstring;
    None in the report when there are no held-out texts); at least 2 texts must remain to train on.
    ``out`` receives ``save_pretrained`` of the student (safetensors), the teacher's tokenizer
    files and ``distillation.json`` (:class:`DistillResult`). AdamW with linear warm-up (5%) and
    cosine decay; gradient norm clipped at 1; batches of similar length.

    Bad settings (epochs, batch size, learning rate, held-out fraction, truncation, ``max_length`` beyond the
    teacher's tokenizer, ``out`` a file or the teacher's own folder) are a ``ValueError``
    naming them before the teacher pass, the slow part.
    """
    from transformers import BertModel

    t0 = time.perf_counter()
    student = student or StudentConfig()
    texts = [str(t) for t in texts]
    if len(texts) < 2:
        raise ValueError(f"distillation needs at least 2 texts, got {len(texts)}")
    if epochs < 1 or batch_size < 1:  # before the teacher pass, the slow part
        raise ValueError(f"distillation needs epochs >= 1 and batch_size >= 1, got epochs={epochs}, "
                         f"batch_size={batch_size}")
    if not lr > 0:
        raise ValueError(f"distillation needs a learning rate lr > 0, got {lr}")
    n_held = _heldout_count(len(texts), heldout_fraction)
    encoding.check_truncation(truncation)
    teacher_path = encoding.resolve_encoder_path(teacher_path)
    _check_out(out, teacher_path)
    teacher_path, tokenizer, teacher = _load_teacher(teacher_path, max_length)
    target = _teacher_targets(texts, teacher_path, tokenizer, teacher, teacher_embeddings, cache_dir, max_length,
                              progress, truncation)

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = student_bert_config(teacher.config, student)
    model = BertModel(cfg)  # the pooler is unused (mean pooling) but kept so the folder loads without warnings
    kept = init_embeddings_from_teacher(model, teacher)
    del teacher
    net = _Distiller(model, target.shape[1])

    perm = torch.randperm(len(texts), generator=gen)
    held, train = perm[:n_held], perm[n_held:]
    token_ids = encoding.tokenize(texts, tokenizer, max_length, truncation)
    loss = _RelativeLoss(net, token_ids, int(tokenizer.pad_token_id or 0), target, train)

    # the bias of the projection starts at the teacher's mean embedding
    with torch.no_grad():
        net.proj.bias.copy_(target[train].mean(0))
    initial = loss.heldout(held)
    train_curve, held_curve = _train_student(loss, train, held, epochs, batch_size, lr, gen,
                                             f"distil L{student.layers}/H{student.hidden}" if progress else None)

    out = Path(out)
    _save_student(model, tokenizer, out)
    result = DistillResult(
        path=str(out),
        teacher=teacher_path,
        teacher_fingerprint=encoding.encoder_fingerprint(teacher_path),
        student=asdict(student),
        texts_train=int(train.numel()),
        texts_heldout=int(held.numel()),
        epochs=epochs,
        seed=seed,
        heldout_loss_initial=_finite(initial),
        heldout_loss_final=_finite(held_curve[-1]),
        train_loss_per_epoch=train_curve,
        heldout_loss_per_epoch=[_finite(v) for v in held_curve],
        seconds=round(time.perf_counter() - t0, 1),
        sources={**(sources or {}), "embedding_variance_kept_by_init": round(kept, 4), "lr": lr,
                 "batch_size": batch_size, "max_length": max_length, "truncation": truncation,
                 "heldout_fraction": heldout_fraction,
                 "loss": "relative MSE of a linear projection of the student's mean-pooled output to the teacher's"},
    )
    (out / REPORT_FILE).write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
    return result


def _finite(value: float) -> float | None:
    """``value`` rounded to 5 decimals, or None for nan (no held-out texts): JSON has no NaN."""
    return None if math.isnan(value) else round(value, 5)


def _heldout_count(n: int, heldout_fraction: float) -> int:
    """How many of ``n`` texts are held out (at least 1 when the fraction is positive); ``ValueError``
    unless ``heldout_fraction`` is in [0, 1) and leaves at least 2 texts to train on (the loss divides
    by the variance of their teacher embeddings)."""
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    n_held = max(1, int(round(heldout_fraction * n))) if heldout_fraction > 0 else 0
    if n - n_held < 2:
        raise ValueError(f"heldout_fraction {heldout_fraction} of {n} texts holds out {n_held} and leaves "
                         f"{n - n_held} to train on; distillation needs at least 2")
    return n_held


def _check_out(out: str | Path, teacher_path: str) -> None:
    """``ValueError`` when the output folder ``out`` (or a folder above it) is a file, or is the teacher's
    folder (saving there would overwrite the teacher's weights)."""
    out = Path(out)
    for part in (out, *out.parents):  # the first that exists must be a folder
        if part.exists():
            if not part.is_dir():
                raise ValueError(f"output folder {str(out)!r}: {part} is a file, not a folder")
            break
    if out.resolve() == Path(teacher_path).resolve():
        raise ValueError(f"output folder {str(out)!r} is the teacher's folder; saving the student there would "
                         "overwrite the teacher")


def _load_teacher(teacher_path: str | None, max_length: int | None = None):
    """(resolved path, tokenizer, encoder model) of the teacher; its tokenizer must fit its vocabulary
    (the student shares both), and ``max_length`` (when given) its tokenizer (:func:`encoding.check_max_length`:
    at most its ``model_max_length``, room for content next to the special tokens)."""
    teacher_path = encoding.resolve_encoder_path(teacher_path)
    tokenizer = encoding.load_tokenizer(teacher_path)
    teacher = encoding.load_encoder_model(teacher_path)
    if len(tokenizer) > int(teacher.config.vocab_size):
        raise ValueError(
            f"teacher tokenizer at {teacher_path!r} has {len(tokenizer)} tokens but the teacher's vocabulary has "
            f"{teacher.config.vocab_size}; the student shares both, so they must agree"
        )
    if max_length is not None:
        try:
            encoding.check_max_length(tokenizer, max_length)
        except ValueError as err:
            raise ValueError(f"max_length: {err} (teacher {teacher_path!r})") from None
    return teacher_path, tokenizer, teacher


def _teacher_targets(texts: list[str], teacher_path: str, tokenizer, teacher, teacher_embeddings: np.ndarray | None,
                     cache_dir: str | Path | None, max_length: int, progress: bool,
                     truncation: str = "right") -> Tensor:
    """[len(texts), D] float32 teacher embeddings: the given ones (finite, one row per text), else from
    the embedding cache (computing what is missing with the teacher), each text cut by ``truncation``."""
    if teacher_embeddings is None:
        cache = encoding.EmbeddingCache(cache_dir or encoding.default_cache_dir())
        teacher_enc = encoding.TextEncoder(teacher)
        teacher_embeddings = cache.get_or_compute(
            texts, teacher_path, "transformer", max_length,
            lambda t: encoding.encode_texts(t, tokenizer, teacher_enc, "transformer", max_length,
                                            progress="teacher embeddings" if progress else None,
                                            truncation=truncation),
            truncation,
        )
    target = torch.as_tensor(np.asarray(teacher_embeddings, dtype=np.float32))
    if target.ndim != 2 or target.shape[0] != len(texts):
        raise ValueError(f"teacher_embeddings of shape {tuple(target.shape)} for {len(texts)} texts; "
                         f"expected [{len(texts)}, D]")
    if not torch.isfinite(target).all():
        raise ValueError("teacher_embeddings hold non-finite values (nan or inf)")
    return target


class _RelativeLoss:
    """The distillation loss ``Σ_d (pred − target)² / total variance`` (mean over texts), where the
    total variance is that of the teacher's embeddings of the training texts ``train``."""

    def __init__(self, net: _Distiller, token_ids: list[list[int]], pad_id: int, target: Tensor,
                 train: Tensor) -> None:
        self.net, self.token_ids, self.pad_id, self.target = net, token_ids, pad_id, target
        self.total_var = float(((target[train] - target[train].mean(0)) ** 2).sum(1).mean())
        if not self.total_var > 1e-8 * max(1.0, float((target[train] ** 2).sum(1).mean())):
            raise ValueError(
                f"the teacher's embeddings of the {train.numel()} training texts are (nearly) identical "
                f"(total variance {self.total_var:.3g}); nothing to distil (texts all unknown tokens to its tokenizer?)"
            )

    def batch(self, rows: Tensor) -> Tensor:
        """The differentiable loss of the texts ``rows``."""
        ids, mask = encoding.pad_token_ids([self.token_ids[int(i)] for i in rows], self.pad_id)
        return ((self.net(ids, mask) - self.target[rows]) ** 2).sum(1).mean() / self.total_var

    @torch.no_grad()
    def heldout(self, rows: Tensor) -> float:
        """The loss of the texts ``rows`` in eval mode (nan when there are none)."""
        if rows.numel() == 0:
            return float("nan")
        self.net.eval()
        # sorted by length for tight padding; order does not change the mean
        rows = rows[torch.argsort(torch.tensor([len(self.token_ids[int(i)]) for i in rows]))]
        num = 0.0
        for start in range(0, rows.numel(), 128):
            r = rows[start : start + 128]
            ids, mask = encoding.pad_token_ids([self.token_ids[int(i)] for i in r], self.pad_id)
            num += float(((self.net(ids, mask) - self.target[r]) ** 2).sum())
        return num / rows.numel() / self.total_var


def _train_student(loss: _RelativeLoss, train: Tensor, held: Tensor, epochs: int, batch_size: int, lr: float,
                   gen: torch.Generator, progress: str | None) -> tuple[list[float], list[float]]:
    """AdamW (weight decay 0.01) at learning rate ``lr · min(1, (s + 1)/w) · ½(1 + cos(π s/S))`` at step
    ``s`` of ``S`` (linear warm-up over ``w = max(1, ⌊S/20⌋)`` steps, 5%, times a cosine decay), gradient norm
    clipped at 1, batches of similar length drawn from ``gen``; returns the mean training loss and the
    held-out loss per epoch (``progress``: the bar's label, None: no bar)."""
    net = loss.net
    train_lengths = torch.tensor([len(loss.token_ids[int(i)]) for i in train])
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(train.numel() / batch_size)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=progress, unit="step")
    train_curve, held_curve = [], []
    for _epoch in range(epochs):
        net.train()
        running, count = 0.0, 0
        for part in _length_batches(train_lengths, batch_size, gen):
            rows = train[part]
            value = loss.batch(rows)
            opt.zero_grad(set_to_none=True)
            value.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            running += float(value.detach()) * rows.numel()
            count += rows.numel()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running / count:.3f}")
        train_curve.append(round(running / max(1, count), 5))
        held_curve.append(round(loss.heldout(held), 5))
    if bar is not None:
        bar.close()
    return train_curve, held_curve


def _save_student(model, tokenizer, out: Path) -> None:
    """``save_pretrained`` of the student (safetensors) and the teacher's tokenizer into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    # encoder_fingerprint (the embedding-cache key) hashes config.json's bytes but only the *sizes*
    # of weight files, so a re-distilled student of the same shape must differ in its config
    model.config.distillation_id = weights_digest(model)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def train_split_texts(
    dataset: str,
    split: dict[str, float] | None = None,
    split_seed: int = 0,
    answers: int = 0,
    seed: int = 0,
) -> tuple[list[str], dict]:
    """The distillation texts of a dataset: its TRAIN split's queries plus ``answers`` train answers.

    The split is the data module's (:class:`RoutingDataModule` with the same ``split`` /
    ``split_seed``), so no val / calibration / test text is used. Answers: a seeded sample of the
    distinct non-empty train-split responses not already among the texts (all of them if fewer).
    ``ValueError`` when ``answers`` is negative or ``split`` has no ``"train"`` part.
    """
    from cascade_routing.training.datamodule import DEFAULT_SPLIT, load_routing_dataset

    if answers < 0:
        raise ValueError(f"answers (train-split answers added to the texts) must be >= 0, got {answers}")
    if split is not None and "train" not in split:
        raise ValueError(f"split {dict(split)} has no 'train' part; distillation uses the train split's texts")
    ds = load_routing_dataset(dataset)
    parts = ds.split(dict(split or DEFAULT_SPLIT), seed=split_seed)
    train = parts["train"]
    texts = list(dict.fromkeys(str(q) for q in train.queries))
    n_queries = len(texts)
    n_answers = 0
    if answers and train.responses is not None:
        seen = set(texts)
        pool = sorted({str(r) for r in train.responses.reshape(-1) if r is not None and str(r).strip()} - seen)
        rng = np.random.default_rng(seed)
        pick = rng.permutation(len(pool))[: answers]
        texts += [pool[i] for i in sorted(pick)]
        n_answers = len(pick)
    info = {"dataset": dataset, "split": dict(split or DEFAULT_SPLIT), "split_seed": split_seed,
            "train_queries": n_queries, "train_answers": n_answers}
    return texts, info


def distill_for_dataset(
    dataset: str,
    out: str | Path,
    teacher_path: str | None = None,
    student: StudentConfig | None = None,
    split: dict[str, float] | None = None,
    split_seed: int = 0,
    answers: int = 3000,
    **kwargs,
) -> DistillResult:
    """:func:`train_split_texts` then :func:`distill_encoder` (teacher embeddings cached on disk); ``kwargs``
    are :func:`distill_encoder`'s (``seed`` also draws the answers)."""
    texts, info = train_split_texts(dataset, split, split_seed, answers, kwargs.get("seed", 0))
    return distill_encoder(texts, out, teacher_path, student, sources=info, **kwargs)
