"""Test helpers for the estimator stage: a tiny local BERT encoder and synthetic routing data."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cascade_routing.data.dataset import RoutingDataset

WORDS = [f"w{i}" for i in range(40)] + ["alpha", "beta", "gamma", "delta", "answer", "yes", "no"]


def make_tiny_encoder(folder: Path, hidden: int = 32, layers: int = 2) -> Path:
    """A randomly initialised BertModel + BertTokenizerFast written to ``folder`` (no download)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [f"task{i}" for i in range(4)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # vocab= (not vocab_file=): recent transformers ignore vocab_file here and every word became [UNK]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=160,
    )
    BertModel(cfg).save_pretrained(folder)
    ids = BertTokenizerFast.from_pretrained(folder)(WORDS[0])["input_ids"]
    assert ids[1] == vocab.index(WORDS[0]), f"tiny tokenizer does not know its own words: {ids}"
    return folder


def make_synthetic_dataset(n: int = 240, m: int = 3, seed: int = 0, confidence: bool = True) -> RoutingDataset:
    """Queries whose words decide which models answer correctly; confidences correlate with quality."""
    rng = np.random.default_rng(seed)
    queries, tasks = [], []
    skill = rng.normal(size=(len(WORDS), m))
    quality = np.zeros((n, m))
    for i in range(n):
        t = int(rng.integers(0, 3))
        words = list(rng.choice(WORDS[:40], size=6))
        queries.append(f"task{t} " + " ".join(words) + f" q{i}")
        tasks.append(f"task{t}")
        score = sum(skill[WORDS.index(w)] for w in words) + np.linspace(-0.5, 1.0, m) + (t - 1)
        quality[i] = (score + rng.normal(scale=0.5, size=m) > 0).astype(float)
    responses = np.empty((n, m), dtype=object)
    for i in range(n):
        for j in range(m):
            responses[i, j] = ("answer yes alpha" if quality[i, j] else "answer no " + str(rng.choice(WORDS[:40])))
    conf = np.log(np.clip(quality * 0.6 + rng.uniform(0, 0.4, size=(n, m)), 1e-6, 1))  # a log-prob
    cost = np.tile(np.linspace(1e-4, 1e-2, m), (n, 1)) * rng.uniform(0.5, 1.5, size=(n, m))
    tokens_in = np.tile(rng.integers(10, 100, size=(n, 1)), (1, m)).astype(float)
    tokens_out = rng.integers(5, 50, size=(n, m)).astype(float)
    features = {"tokens_in": tokens_in, "tokens_out": tokens_out}
    if confidence:
        features["logprob_confidence"] = conf
    return RoutingDataset(
        queries=queries,
        models=[f"model-{j}" for j in range(m)],
        quality=quality,
        cost=cost,
        responses=responses,
        features=features,
        tasks=tasks,
        name=f"synthetic-{n}x{m}",
    )


def train_tiny(tmp_path: Path, n: int = 240, m: int = 3, epochs: int = 4, seed: int = 0, finetune: bool = False,
               confidence: bool = True, dataset: RoutingDataset | None = None, **data_kwargs):
    """Train a tiny estimator on synthetic data (or on ``dataset``); returns (module, datamodule, trainer, dataset)."""
    import lightning as L

    from cascade_routing.training.datamodule import RoutingDataModule
    from cascade_routing.training.module import QualityEstimatorModule

    enc = make_tiny_encoder(tmp_path / "encoder")
    ds = dataset if dataset is not None else make_synthetic_dataset(n, m, seed, confidence=confidence)
    dm = RoutingDataModule.from_dataset(
        ds, encoder_path=str(enc), cache_dir=str(tmp_path / "cache"), batch_size=32, finetune=finetune, **data_kwargs
    )
    L.seed_everything(seed, verbose=False)
    module = QualityEstimatorModule(hidden=32, lr=3e-3, finetune_encoder=finetune, neighbours=0 if finetune else 50)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, dm)
    return module, dm, trainer, ds


def fit_tiny_artifact(tmp: Path, dataset: Path, encoder: Path, callbacks: list | None = None) -> Path:
    """``train.py fit`` (1 epoch, frozen ``encoder``, no logger) on the saved dataset folder ``dataset``,
    run in ``tmp`` so the exported artifact lands at ``tmp/artifacts/tiny.safetensors`` (returned).
    ``callbacks``: the trainer's callbacks setting (None: the shipped ExportArtifact)."""
    import os

    import yaml

    from tests.script_helpers import load_script

    trainer = {"max_epochs": 1, "default_root_dir": str(tmp / "runs" / "tiny"), "logger": False,
               "enable_progress_bar": False, "enable_model_summary": False}
    if callbacks is not None:
        trainer.update(enable_checkpointing=False, callbacks=callbacks)
    config = {
        "compose": ["model/frozen", "trainer/cpu"],
        "data": {"dataset": str(dataset), "encoder_path": str(encoder), "cache_dir": str(tmp / "cache"),
                 "batch_size": 32},
        "model": {"hidden": 32, "lr": 0.005, "neighbours": 20},
        "trainer": trainer,
    }
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(config))
    old = os.getcwd()
    os.chdir(tmp)  # artifacts/ lands here
    try:
        load_script("train.py").main(["fit", "--config", str(tmp / "tiny.yaml")])
    finally:
        os.chdir(old)
    return tmp / "artifacts" / "tiny.safetensors"
