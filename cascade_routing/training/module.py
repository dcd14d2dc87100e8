"""LightningModule: training logic of the :class:`QualityNetwork` (the network itself is plain torch).

Each training row is expanded over ran-masks: all 2^M subsets when 2^M <= ``max_enumerated_masks``,
otherwise the empty mask (ex-ante), ``singleton_masks`` masks with one model run (uniform model) and
``masks_per_query`` random masks (size uniform in 0..M). Training draws them from torch's global
generator (seeded by ``seed_everything``); validation and test draw batch ``b``'s from a private CPU
generator seeded with ``EVAL_MASK_SEED + b``, so ``val/mean_loss`` (the checkpoint and early-stopping
monitor) is a function of the weights and the data alone, whatever the global seed.

Loss per (row, mask), averaged over models:

- mean: binary cross-entropy ``-(y log p + (1-y) log(1-p))`` with ``p = σ(logit)`` for 0/1 quality,
  squared error ``(p - y)²`` for graded quality;
- variance head (weight ``variance_weight``): Gaussian NLL of the residual
  ``r = p(all) - p(ran)`` (both detached): ``½ (logvar + r² / exp(logvar))``.

Metrics (torchmetrics, per model, per split val/test, ex-ante and post-hoc separately): AUROC,
Brier score (``MeanSquaredError`` on probabilities) and expected calibration error. Ex-ante uses
the empty mask; post-hoc uses the split's fixed ``eval_ran`` masks and scores only run models.

Logged (CSV and wandb alike): ``train/{loss,mean_loss,var_loss}_step`` every ``log_every_n_steps`` and
``..._epoch`` (the epoch's mean); per validation epoch ``val/loss``, ``val/mean_loss``,
``val/{exante,posthoc}/{auroc,brier,ece}/<model>`` and their ``..._mean`` over models (``test/...``
likewise); the hyperparameters, with those ``setup`` derives from the data (:meth:`on_train_start`).
"""

from __future__ import annotations

import itertools
import os
import warnings

import lightning as L
import torch
import torchmetrics
from torch import Tensor, nn

from cascade_routing.estimators.features import CONFIDENCE_ENCODINGS, CONFIDENCE_FEATURE, TEXT_STATISTICS, compose_features
from cascade_routing.estimators.masks import all_masks, random_ran_masks
from cascade_routing.estimators.network import NetworkConfig, QualityNetwork
from cascade_routing.training.checkpoint_file import check_training_checkpoint, refuse_artifact

KINDS = ("exante", "posthoc")
SPLITS = ("val", "test")
EVAL_MASK_SEED = 0  # validation/test batch b draws its sampled ran-masks with seed EVAL_MASK_SEED + b
# hyperparameters setup fills in from the data (a config never sets them; logged once training starts)
DERIVED_HPARAMS = ("network_config", "models", "binary", "encoder_init_path", "trained_on")


class QualityEstimatorModule(L.LightningModule):
    """Trains a :class:`QualityNetwork`.

    The network is built in ``__init__`` when its shape is known (``network_config``, ``models``:
    what ``load_from_checkpoint`` passes back from the checkpoint's hyperparameters); otherwise
    ``setup`` derives it from the datamodule and records it in ``hparams``, so every checkpoint
    carries what rebuilds the network and ``QualityEstimatorModule.load_from_checkpoint(ckpt)`` works.

    Args:
        hidden: width H of the heads.
        dropout: dropout inside the heads.
        lr: AdamW learning rate of the heads.
        weight_decay: AdamW weight decay.
        masks_per_query: random ran-masks per training row (large M).
        singleton_masks: masks with exactly one model run (uniform model) per training row (large M),
            on top of the random ones: the state every cascade and cascade routing decides from after
            its first model, which random sizes reach in only 1 of M + 1 masks.
        max_enumerated_masks: enumerate all subsets when 2^M is at most this.
        variance_weight: weight of the variance-head loss.
        finetune_encoder: train the query encoder too (GPU path; needs ``data.finetune: true``).
        encoder_lr: learning rate of the encoder when fine-tuning.
        neighbours: k of the neighbour prior over the training split's queries (0: off; needs a frozen
            encoder, since the memory holds fixed embeddings); capped at N_train − 1, and the
            network config records the k used (0, no prior, when the train split has one query).
            See ``neighbours.py``.
        text_statistics: feed the query text statistics (``features.text_statistics``).
        query_embedding_input: also feed the query embedding itself to the query MLP (always on when
            fine-tuning the encoder, whose only path to the heads it is). Off by default: with neighbours and statistics on, feeding it lowered test AUROC on both
            benchmark datasets (README, "Learned estimators").
        confidence_encoding: how a log-prob confidence feature enters the network
            (``features.encode_confidence``): ``logprob_and_surprise`` (log p and the log of −log p,
            which separates the −1e-7…−1e-2 range strong models answer in) or ``logprob`` (log p only,
            what training data without a ``logprob_confidence`` feature always gets).
        network_config: the :class:`NetworkConfig` as a dict (filled in by ``setup``; leave unset in configs).
        models: model names in cost order (filled in by ``setup``).
        binary: 0/1 quality (filled in by ``setup``).
        encoder_init_path: the fine-tuned encoder's starting folder (filled in by ``setup`` when fine-tuning).
        trained_on: the data the network was built for: ``dataset``, ``task_vocabulary`` and the frozen
            encoder's ``encoder_fingerprint`` (filled in by ``setup``; a checkpoint run on other data is
            refused when the task list or encoder differ, see :meth:`check_data`).
    """

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's ``load_from_checkpoint`` of a training checkpoint (``.ckpt``), unchanged; an
        exported estimator artifact (a ``.safetensors`` file or a ``save_pretrained`` folder) is a
        ``ValueError`` saying what it is and how to load it
        (:func:`~cascade_routing.training.checkpoint_file.refuse_artifact`), not an unpickling error. The file
        is read with ``weights_only=True`` unless the call says otherwise (Lightning leaves it to torch's
        default, which ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns into unpickling arbitrary objects).

        When loading a local file that way fails, the file is checked
        (:func:`~cascade_routing.training.checkpoint_file.check_training_checkpoint`): a missing file is a
        ``FileNotFoundError``, a corrupt or truncated file, a pickle of arbitrary objects or a checkpoint
        ``train.py fit`` did not write a ``ValueError`` naming the file and what it is (not torch's bare
        ``OSError``, an ``UnpicklingError`` advising ``weights_only=False``, or a ``KeyError``); any
        other failure is raised as it is."""
        refuse_artifact(checkpoint_path, "QualityEstimatorModule.load_from_checkpoint")
        if len(args) < 4:  # Lightning's positional order: map_location, hparams_file, strict, weights_only
            kwargs.setdefault("weights_only", True)
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        except Exception:
            weights_only = args[3] if len(args) >= 4 else kwargs.get("weights_only")
            if not (weights_only and isinstance(checkpoint_path, (str, os.PathLike))
                    and "://" not in str(checkpoint_path)):
                raise
            try:
                check_training_checkpoint(checkpoint_path)
            except (ValueError, FileNotFoundError) as err:
                raise err from None
            raise

    def __init__(
        self,
        hidden: int = 128,
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        masks_per_query: int = 4,
        singleton_masks: int = 2,
        max_enumerated_masks: int = 16,
        variance_weight: float = 0.1,
        finetune_encoder: bool = False,
        encoder_lr: float = 2e-5,
        neighbours: int = 50,
        text_statistics: bool = True,
        query_embedding_input: bool = False,
        confidence_encoding: str = "logprob_and_surprise",
        network_config: dict | None = None,
        models: list[str] | None = None,
        binary: bool = True,
        encoder_init_path: str | None = None,
        trained_on: dict | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (("hidden", hidden, 1), ("masks_per_query", masks_per_query, 0),
                                 ("singleton_masks", singleton_masks, 0), ("neighbours", neighbours, 0)):
            if value < low:  # hidden 0 trained and exported an empty network; neighbours < 0 failed in topk
                raise ValueError(f"model.{name} must be >= {low}, got {value}")
        if not variance_weight >= 0:
            raise ValueError(f"model.variance_weight must be >= 0, got {variance_weight}")
        if confidence_encoding not in CONFIDENCE_ENCODINGS:
            raise ValueError(f"model.confidence_encoding must be one of {CONFIDENCE_ENCODINGS}, got {confidence_encoding!r}")
        self.save_hyperparameters()
        self.network: QualityNetwork | None = None
        self.models: list[str] = []
        self.binary = True
        self.metrics = nn.ModuleDict()
        if network_config is not None:
            if models is None:
                raise ValueError("network_config needs models (the model names it was built for)")
            encoder = None
            if finetune_encoder:
                from cascade_routing.estimators.encoding import TextEncoder

                if encoder_init_path is None:
                    raise ValueError("a fine-tuned network needs encoder_init_path to rebuild its encoder")
                encoder = TextEncoder.from_path(encoder_init_path)
            self._build_network(NetworkConfig(**network_config), list(models), bool(binary), encoder)

    # ------------------------------------------------------------------ construction
    def build(
        self,
        models: list[str],
        embed_dim: int,
        num_tasks: int,
        binary: bool,
        encoder: nn.Module | None = None,
        memory: tuple[Tensor, Tensor] | None = None,
        confidences: bool = True,
    ) -> None:
        """Create the network and the metric objects (idempotent).

        ``memory`` = (query embeddings [N, D], qualities [N, M]) of the training split, required
        when ``neighbours > 0``. ``confidences``: whether the training data carries a log-prob
        confidence; without one the network reads the log-prob column only (``confidence_encoding``
        ``logprob``), since any encoding of it would be 0 everywhere.
        """
        if self.network is not None:
            return
        hp = self.hparams
        if hp.neighbours and hp.finetune_encoder:
            raise ValueError("model.neighbours needs a frozen encoder; set model.neighbours: 0 to fine-tune the encoder")
        if hp.neighbours and memory is None:
            raise ValueError("model.neighbours > 0 needs the training split's embeddings and qualities (memory)")
        # a training query never counts itself, so one training query leaves no neighbour: k = 0, no prior
        k = 0 if not hp.neighbours else min(int(hp.neighbours), int(memory[0].shape[0]) - 1)
        config = NetworkConfig(
            num_models=len(models), embed_dim=embed_dim, num_tasks=num_tasks, hidden=hp.hidden, dropout=hp.dropout,
            num_answer_features=4 + len(models),
            num_query_features=len(TEXT_STATISTICS) if hp.text_statistics else 0,
            neighbours=k,
            memory_size=int(memory[0].shape[0]) if k else 0,
            # a fine-tuned encoder reaches the heads only through q; so does everything without other inputs
            query_embedding_input=bool(
                hp.query_embedding_input or hp.finetune_encoder or not (k or hp.text_statistics or num_tasks)
            ),
            confidence_encoding=hp.confidence_encoding if confidences else "logprob",
        )
        self.hparams.update(network_config=config.to_dict(), models=list(models), binary=bool(binary))
        self._build_network(config, list(models), bool(binary), encoder if hp.finetune_encoder else None)
        if k:
            self.network.set_memory(*memory)

    def _build_network(self, config: NetworkConfig, models: list[str], binary: bool, encoder: nn.Module | None) -> None:
        """The network of ``config`` and one metric object per (split, kind, model)."""
        self.models = models
        self.binary = binary
        self.network = QualityNetwork(config, encoder)
        for split in SPLITS:
            for kind in KINDS:
                for j in range(len(models)):
                    key = f"{split}_{kind}_{j}"
                    m: dict[str, torchmetrics.Metric] = {"brier": torchmetrics.MeanSquaredError()}
                    if binary:
                        m["auroc"] = torchmetrics.classification.BinaryAUROC()
                        m["ece"] = torchmetrics.classification.BinaryCalibrationError(n_bins=10)
                        m["npos"] = torchmetrics.SumMetric()
                        m["nneg"] = torchmetrics.SumMetric()
                    self.metrics[key] = nn.ModuleDict(m)

    def setup(self, stage: str | None = None) -> None:
        dm = self.trainer.datamodule
        if self.network is not None:
            self.check_data(dm)
            return
        encoder = dm.encoder if self.hparams.finetune_encoder else None
        if self.hparams.finetune_encoder and not dm.finetune:
            raise ValueError("model.finetune_encoder needs data.finetune: true (token ids in the batches)")
        if self.hparams.finetune_encoder:
            self.hparams.update(encoder_init_path=dm.resolved_encoder_path)
        memory = None
        train = dm.splits.get("train")
        if self.hparams.neighbours:
            if train is None:
                raise RuntimeError("the datamodule must be set up (splits encoded) before the module")
            memory = (train.query_emb, train.quality)
        confidences = train is None or CONFIDENCE_FEATURE in train.dataset.features
        self.build(dm.models, dm.embed_dim, len(dm.task_vocabulary), dm.binary_quality, encoder, memory, confidences)
        self.hparams.update(trained_on=self._data_identity(dm))

    def on_train_start(self) -> None:
        """Log the hyperparameters :meth:`setup` derived from the data (:data:`DERIVED_HPARAMS`: models,
        network shape, the data's identity) to every logger. Lightning logs the values ``__init__``
        received, which are None for a network built from the data, so the CSV ``hparams.yaml`` and the
        wandb config would say ``models: null``; skipped where Lightning's own hyperparameter logging is
        off (``Trainer(enable_autolog_hparams=False)``, ``save_hyperparameters(logger=False)``)."""
        if not (getattr(self.trainer, "enable_autolog_hparams", True) and getattr(self, "_log_hyperparams", True)):
            return
        derived = {key: self.hparams[key] for key in DERIVED_HPARAMS if key in self.hparams}
        for logger in self.loggers:
            logger.log_hyperparams(derived)

    def _data_identity(self, dm) -> dict:
        from cascade_routing.estimators.encoding import encoder_fingerprint

        return {"dataset": dm.dataset_name, "task_vocabulary": list(dm.task_vocabulary),
                "encoder_fingerprint": None if self.hparams.finetune_encoder
                else encoder_fingerprint(dm.resolved_encoder_path)}

    def check_data(self, dm) -> None:
        """Raise ``ValueError`` unless the built network can read ``dm``'s batches as it was trained to:
        the same models (in order), the query-embedding width of a frozen encoder, the same number of
        tasks, and, for checkpoints that record them (``trained_on``), the same task list and frozen
        encoder (fingerprint). Another dataset with all of these equal is run, with a warning."""
        if list(dm.models) != self.models:
            raise ValueError(f"the network was built for models {self.models}, the data has {list(dm.models)}")
        cfg = self.network.config
        trained = self.hparams.get("trained_on") or {}
        if not self.hparams.finetune_encoder and dm.embed_dim != cfg.embed_dim:
            raise ValueError(f"the network reads {cfg.embed_dim}-wide query embeddings, but data.encoder_path "
                             f"({dm.resolved_encoder_path}) gives {dm.embed_dim}: use the encoder it was trained with")
        now = self._data_identity(dm)
        tasks = now["task_vocabulary"]
        if len(tasks) != cfg.num_tasks or ("task_vocabulary" in trained and tasks != list(trained["task_vocabulary"])):
            was = trained.get("task_vocabulary", f"{cfg.num_tasks} tasks")
            raise ValueError(f"the network was trained on the tasks {was}, dataset {dm.dataset_name!r} has "
                             f"{tasks}: its task input would mean something else")
        if trained.get("encoder_fingerprint") and now["encoder_fingerprint"] != trained["encoder_fingerprint"]:
            raise ValueError(f"data.encoder_path ({dm.resolved_encoder_path}, fingerprint {now['encoder_fingerprint']}) "
                             f"is not the encoder the network was trained with (fingerprint "
                             f"{trained['encoder_fingerprint']}): its query embeddings would mean something else")
        if trained.get("dataset") and trained["dataset"] != now["dataset"]:
            warnings.warn(f"the network was trained on dataset {trained['dataset']!r}; running it on "
                          f"{now['dataset']!r} (same models, tasks and encoder)", stacklevel=2)

    # ------------------------------------------------------------------ forward
    def query_embedding(self, batch: dict) -> Tensor:
        if self.hparams.finetune_encoder and "input_ids" in batch:
            return self.network.embed_queries(batch["input_ids"], batch["attention_mask"])
        return batch["query_emb"]

    def predict_logits(self, batch: dict, ran: Tensor, query_emb: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(logit, logvar)`` [B, M] for the rows of ``batch`` under ``ran`` [B, M]."""
        q = self.query_embedding(batch) if query_emb is None else query_emb
        feat = compose_features(batch["static"], batch["pair_sim"], ran)
        return self.network(q, ran, batch["answer_emb"], feat, batch["task"], batch.get("query_feat"))

    def _training_masks(self, batch_size: int, num_models: int,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(row index [R], ran [R, M]) for the expanded batch; sampled masks come from ``generator``
        (a CPU generator; drawn on the CPU, then moved) or, when None, torch's global generator."""
        hp = self.hparams
        if 2**num_models <= hp.max_enumerated_masks:
            masks = all_masks(num_models).to(self.device)
            rows = torch.arange(batch_size, device=self.device).repeat_interleave(masks.shape[0])
            return rows, masks.repeat(batch_size, 1)
        draw_on = "cpu" if generator is not None else self.device
        rand = random_ran_masks(batch_size * hp.masks_per_query, num_models, generator=generator, device=draw_on)
        alone = torch.randint(0, num_models, (batch_size, hp.singleton_masks), generator=generator, device=draw_on)
        rand, alone = rand.to(self.device), alone.to(self.device)
        empty = torch.zeros(batch_size, 1, num_models, dtype=torch.bool, device=self.device)
        single = nn.functional.one_hot(alone, num_models).bool()
        masks = torch.cat([empty, single, rand.reshape(batch_size, -1, num_models)], dim=1)
        rows = torch.arange(batch_size, device=self.device).repeat_interleave(masks.shape[1])
        return rows, masks.reshape(-1, num_models)

    def loss(self, batch: dict, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``(total, parts)`` over the batch expanded by :meth:`_training_masks` (``generator``: see there)."""
        y = batch["quality"]
        bsz, m = y.shape
        rows, ran = self._training_masks(bsz, m, generator)
        q = self.query_embedding(batch)
        expanded = {k: v[rows] for k, v in batch.items() if k in ("static", "pair_sim", "answer_emb", "task", "query_feat")}
        logit, logvar = self.predict_logits(expanded, ran, q[rows])
        yy = y[rows]
        if self.binary:
            mean_loss = nn.functional.binary_cross_entropy_with_logits(logit, yy)
        else:
            mean_loss = ((torch.sigmoid(logit) - yy) ** 2).mean()
        with torch.no_grad():
            full = torch.ones_like(ran)
            p_all = torch.sigmoid(self.predict_logits(batch, full[:bsz], q)[0])[rows]
            resid = p_all - torch.sigmoid(logit.detach())
        var_loss = 0.5 * (logvar + resid**2 / logvar.exp()).mean()
        total = mean_loss + self.hparams.variance_weight * var_loss
        return total, {"mean_loss": mean_loss.detach(), "var_loss": var_loss.detach()}

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, parts = self.loss(batch)
        bsz = batch["quality"].shape[0]
        # per step (train/loss_step, every trainer.log_every_n_steps) and the epoch's mean (train/loss_epoch,
        # what compares with val/loss: an epoch shorter than log_every_n_steps logs no step value at all)
        for name, value in (("loss", loss), ("mean_loss", parts["mean_loss"]), ("var_loss", parts["var_loss"])):
            self.log(f"train/{name}", value, prog_bar=name == "loss", on_step=True, on_epoch=True, batch_size=bsz,
                     sync_dist=True)
        return loss

    def _eval_step(self, batch: dict, batch_idx: int, split: str) -> Tensor:
        y = batch["quality"]
        bsz, m = y.shape
        loss, parts = self.loss(batch, torch.Generator().manual_seed(EVAL_MASK_SEED + batch_idx))
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=bsz, sync_dist=True)
        self.log(f"{split}/mean_loss", parts["mean_loss"], batch_size=bsz, sync_dist=True)
        none = torch.zeros_like(batch["eval_ran"])
        for kind, ran in (("exante", none), ("posthoc", batch["eval_ran"])):
            p = torch.sigmoid(self.predict_logits(batch, ran)[0])
            for j in range(m):
                sel = slice(None) if kind == "exante" else ran[:, j]
                pj, yj = p[sel, j], y[sel, j]
                if pj.numel() == 0:
                    continue
                for name, metric in self.metrics[f"{split}_{kind}_{j}"].items():
                    if name == "npos":
                        metric.update((yj > 0.5).sum())
                    elif name == "nneg":
                        metric.update((yj <= 0.5).sum())
                    else:
                        metric.update(pj, yj.long() if name != "brier" else yj)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._eval_step(batch, batch_idx, "test")

    def _log_metrics(self, split: str) -> dict[str, float]:
        summary: dict[str, float] = {}
        for kind, name in itertools.product(KINDS, ("auroc", "brier", "ece")):
            values = []
            for j, model in enumerate(self.models):
                group = self.metrics[f"{split}_{kind}_{j}"]
                if name not in group:
                    continue
                metric = group[name]
                if not metric.update_called:
                    continue
                if name == "auroc" and min(float(group["npos"].compute()), float(group["nneg"].compute())) == 0:
                    metric.reset()  # AUROC undefined with one class: skipped, not reported as 0
                    continue
                value = metric.compute().float()
                metric.reset()
                self.log(f"{split}/{kind}/{name}/{model}", value, sync_dist=False)
                values.append(value)
            if values:
                mean = torch.stack(values).mean()
                self.log(f"{split}/{kind}/{name}_mean", mean, prog_bar=(name == "auroc"), sync_dist=False)
                summary[f"{kind}_{name}_mean"] = float(mean)
        for j in range(len(self.models)):
            for kind in KINDS:
                group = self.metrics[f"{split}_{kind}_{j}"]
                for name in ("npos", "nneg"):
                    if name in group:
                        group[name].reset()
        return summary

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def configure_optimizers(self):
        hp = self.hparams
        head_params = [p for n, p in self.network.named_parameters() if not n.startswith("encoder.")]
        groups = [{"params": head_params, "lr": hp.lr}]
        if hp.finetune_encoder and self.network.encoder is not None:
            groups.append({"params": list(self.network.encoder.parameters()), "lr": hp.encoder_lr})
        return torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
