"""The self-contained estimator artifact: one safetensors file, no code inside.

Layout: a safetensors file whose tensors are the network weights (``net.<name>``), the per-model
variance calibration ``var_scale`` [M] and, when computed, the residual covariances
``covariances`` [2^M, M, M], or [S, M, M] for a table restricted to the S ran-sets of
``covariance_coverage`` (every set with at most ``max_run`` models run plus the prefixes of
``chains``, in id order; in memory the other rows are NaN and a lookup of one raises
:class:`~cascade_routing.estimators.learned.UncoveredRanSetError`); its string metadata holds ``format`` = ``cascade-routing-estimator``,
``format_version`` and ``payload``: JSON with the model names (cheapest first), prices and the
cost model, the network config, the encoder reference (the default MiniLM is stored as
``"default"``; a fine-tuned query encoder travels inside ``net.encoder.*``), the data config, the
task vocabulary, the chosen uncertainty method, its calibration report and the per-mode
decision-quality scores it was chosen by (``uncertainty_selection``), and the fitted λ/γ
tables per strategy and budget (fitted on the calibration split).

Encoders inside the file (format version 2): any query encoder whose weights are in
``net.encoder.*`` has its Hugging Face config in the payload (``encoder["hf_config"]``), so the
network is rebuilt without the encoder folder. ``encoder["carried"]`` says what those weights are:

- ``"frozen"``: a non-default frozen encoder (e.g. a distilled student, ``distill.py``), carried
  whole; it embeds queries *and* answers, and the tokenizer is ``encoder["tokenizer"]``:
  ``"default"`` (the MiniLM tokenizer, used when the vocabularies match by
  :func:`~cascade_routing.estimators.encoding.tokenizer_fingerprint`; nothing embedded) or, for an
  encoder with a vocabulary of its own, its fast tokenizer's files carried in the file as uint8
  tensors ``tokenizer/<name>`` (``tokenizer.json``, ``tokenizer_config.json``, see
  :data:`TOKENIZER_FILES`; listed in ``encoder["tokenizer_files"]``), checked against
  ``encoder["tokenizer_fingerprint"]`` -- no encoder folder needed. ``encoder["tokenizer"]`` still
  records the folder path, which is read instead only when no files are embedded (artifacts written
  before they were, or a tokenizer that cannot be embedded, :meth:`EstimatorArtifact.embed_tokenizer`);
- ``"finetuned"``: a fine-tuned query encoder; answers still use the frozen encoder at ``path``,
  so a non-default one needs that folder (weights and tokenizer; :meth:`EstimatorArtifact.encoder_path`).

Version 1 files (no ``hf_config``; encoder config read from the folder) still load.

Loading never unpickles anything: safetensors holds only raw tensors, JSON holds only data; an
embedded tokenizer is JSON files read by ``transformers``/``tokenizers`` from a temporary folder,
offline and without remote code (:func:`tokenizer_from_files`). Embedded tokenizers add only
optional keys and tensors: readers that predate them ignore both and read the recorded folder.
:func:`load_artifact` raises :class:`ArtifactError` naming the problem for a missing, corrupt or
foreign file, a pickle, a wrong format version, or a model list that does not match.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor

from cascade_routing.estimators import encoding
from cascade_routing.interfaces import checked_queries
from cascade_routing.estimators.cost import BoundCostEstimator, CostModel
from cascade_routing.estimators.features import UnseenTaskWarning, task_onehot, text_statistics, unseen_task_message
from cascade_routing.estimators.learned import LearnedQualityEstimator, check_uncertainty_mode, coverage_ids
from cascade_routing.estimators.masks import on_all_sets
from cascade_routing.estimators.network import NetworkConfig, QualityNetwork

FORMAT_TAG = "cascade-routing-estimator"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 2 added encoder["hf_config" / "carried" / "tokenizer" / "tokenizer_fingerprint"]
# (and later, optional, encoder["tokenizer_files"] with tensors tokenizer/<name>)
DEFAULT_ENCODER = "default"
#: The files of a fast (``tokenizers``) tokenizer an artifact may carry, as uint8 tensors
#: ``tokenizer/<name>``: what ``save_pretrained`` writes for one, without the slow tokenizer's files.
#: No other name is written or read back.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
TOKENIZER_TENSOR_PREFIX = "tokenizer/"


class ArtifactError(ValueError):
    """A checkpoint/artifact cannot be used; the message says which file and why."""


@dataclass
class EstimatorArtifact:
    """Everything needed to estimate quality and cost for new queries (see module docstring)."""

    models: list[str]
    network_config: dict
    state_dict: dict[str, Tensor]
    cost_model: CostModel
    encoder: dict  # {"path": str | "default", "fingerprint": str, "max_length", "truncation" (absent: "right"),
    #                "answer_max_length", "answer_encoding", "answer_truncation" (absent: "right")}
    task_vocabulary: list[str] = field(default_factory=list)
    binary: bool = True
    uncertainty: str = "variance"
    var_scale: Tensor | None = None
    covariances: Tensor | None = None
    covariance_kind: str | None = None  # residual_covariance (centered) or residual_second_moment
    covariance_coverage: dict | None = None  # {"max_run", "chains"} of a restricted table; None: all ran-sets
    calibration: dict = field(default_factory=dict)
    uncertainty_selection: dict = field(default_factory=dict)  # export.select_uncertainty's scores
    pools: dict[str, list[str]] = field(default_factory=dict)  # strategy -> models it may run (calibration frontier)
    fitted: dict[str, dict[float, Any]] = field(default_factory=dict)  # strategy -> budget -> FittedLambda
    data_config: dict = field(default_factory=dict)
    train_config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    source: str | None = None
    # file name -> bytes of the carried frozen encoder's tokenizer (embed_tokenizer); empty: none embedded
    tokenizer_files: dict[str, bytes] = field(default_factory=dict, repr=False)
    _network: QualityNetwork | None = field(default=None, repr=False)
    _text: tuple | None = field(default=None, repr=False)
    _answer_tokenizer: Any = field(default=None, repr=False)
    # Guards the lazy loads: a server binds (encodes queries) and estimates (embeds answers) on two threads.
    _lazy_lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    # ------------------------------------------------------------------ views
    @property
    def prices(self) -> dict[str, dict[str, float]]:
        """Per model: mean cost per query and, where known, USD per input/output token."""
        return self.cost_model.prices()

    def check_models(self, models: list[str], where: str = "data") -> None:
        """Raise :class:`ArtifactError` unless ``models`` equals the artifact's list (same order)."""
        if list(models) != list(self.models):
            missing = [m for m in self.models if m not in models]
            extra = [m for m in models if m not in self.models]
            raise ArtifactError(
                f"model list of {where} does not match the artifact{f' {self.source}' if self.source else ''}: "
                f"artifact has {self.models}, {where} has {list(models)}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unknown {extra}" if extra else "")
                + ("; same models in a different order (order models cheapest first as in the artifact)" if not missing and not extra else "")
            )

    def policy(self, strategy: str, **kwargs):
        """The engine's policy for ``strategy`` as its λ table was fitted: with the stored pool
        (``pools[strategy]``, model names; none stored: every model). ``kwargs`` go to ``make_policy``."""
        from cascade_routing.policies.registry import make_policy

        names = self.pools.get(strategy)
        if names is None:
            return make_policy(strategy, **kwargs)
        unknown = [n for n in names if n not in self.models]
        if unknown:
            raise ArtifactError(f"pool of {strategy!r} names models {unknown} that the artifact does not have ({self.models})")
        return make_policy(strategy, pool=tuple(self.models.index(n) for n in names), **kwargs)

    def fitted_lambda(self, strategy: str, budget: float):
        """The fitted λ/γ of ``strategy`` at the largest stored budget <= ``budget``
        (:func:`~cascade_routing.policies.lambda_table.lookup_fitted`, the server's rule too);
        :class:`ArtifactError` for a budget that is not a finite number >= 0 or is below every one."""
        if strategy not in self.fitted or not self.fitted[strategy]:
            raise ArtifactError(f"no fitted λ for strategy {strategy!r}; artifact has {sorted(self.fitted)}")
        from cascade_routing.policies.lambda_table import checked_budget, lookup_fitted

        try:
            budget = checked_budget(budget)
        except ValueError as err:
            raise ArtifactError(str(err)) from None
        table = self.fitted[strategy]
        found = lookup_fitted(table, budget)
        if found is None:
            raise ArtifactError(
                f"budget {budget!r} is below the smallest fitted budget {min(table)!r} for {strategy!r}"
            )
        return found[1]

    # ------------------------------------------------------------------ network / encoders
    def network(self) -> QualityNetwork:
        with self._lazy_lock:
            if self._network is None:
                self._network = self._build_network()
        return self._network

    def _build_network(self) -> QualityNetwork:
        """The network of the stored config and weights (dtype and shape checked first)."""
        known = {f.name for f in fields(NetworkConfig)}
        unknown = sorted(set(self.network_config) - known)
        if unknown:
            raise ArtifactError(f"artifact {self.source or ''} has unknown network config key(s) {unknown}; "
                                f"known: {sorted(known)}")
        try:
            cfg = NetworkConfig(**self.network_config)
            encoder_module = None
            if any(k.startswith("encoder.") for k in self.state_dict):
                encoder_module = encoding.TextEncoder(self._encoder_skeleton())
            net = QualityNetwork(cfg, encoder_module)
        except (TypeError, ValueError) as err:
            raise ArtifactError(f"artifact {self.source or ''} has an unusable network config "
                                f"{self.network_config}: {err}") from None
        # load_state_dict would silently cast (e.g. I32 bytes read as integers into a float
        # parameter): every stored tensor must have exactly the dtype and shape the config needs.
        for key, ref in net.state_dict().items():
            got = self.state_dict.get(key)
            if got is not None and (got.dtype != ref.dtype or got.shape != ref.shape):
                raise ArtifactError(
                    f"artifact {self.source or ''} tensor net.{key} is {got.dtype} {tuple(got.shape)}, but the "
                    f"stored network config needs {ref.dtype} {tuple(ref.shape)}"
                )
        for key, value in self.state_dict.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ArtifactError(f"artifact {self.source or ''} tensor net.{key} has non-finite values "
                                    f"({int((~torch.isfinite(value)).sum())} of {value.numel()}): corrupt weights")
        try:
            net.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as err:
            raise ArtifactError(f"artifact weights do not fit the stored network config: {err}") from None
        return net.eval()

    def _encoder_skeleton(self):
        """An untrained HF model of the carried encoder's shape (config from the payload, else the folder)."""
        from transformers import AutoConfig, AutoModel
        from transformers.utils import logging as hf_logging

        stored = self.encoder.get("hf_config")
        if stored:
            try:
                stored = dict(stored)
                hf_cfg = AutoConfig.for_model(stored.pop("model_type"), **stored)
            except (KeyError, ValueError, TypeError) as err:
                raise ArtifactError(f"artifact {self.source or ''} has an unusable encoder hf_config: {err}") from None
        else:  # format version 1: the config lives in the encoder folder
            hf_cfg = AutoConfig.from_pretrained(self.encoder_path(), local_files_only=True)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            return AutoModel.from_config(hf_cfg)
        finally:
            hf_logging.set_verbosity(verbosity)

    def tokenizer_path(self, folder: str | os.PathLike[str] | None = None) -> str:
        """Folder of the tokenizer of a carried frozen encoder (``folder``, default: the recorded
        ``encoder["tokenizer"]``), checked by fingerprint; :class:`ArtifactError` when it is missing or
        holds another vocabulary. Not read when the artifact embeds the tokenizer (:meth:`tokenizer`)."""
        ref = self.encoder.get("tokenizer", DEFAULT_ENCODER) if folder is None else os.fspath(folder)
        path = encoding.default_encoder_path() if ref == DEFAULT_ENCODER else str(ref)
        if not Path(path).is_dir():
            raise ArtifactError(
                f"artifact {self.source or ''} needs the tokenizer folder {path!r}, which does not exist "
                "(the artifact carries its encoder's weights, but that encoder's vocabulary differs from the "
                "default MiniLM's, and this artifact does not embed its tokenizer (written before artifacts "
                "did, or one that cannot be embedded), so it is read from the encoder's folder: copy that "
                "folder along with the artifact, to the same path, or embed it: "
                "art.embed_tokenizer(folder); art.save(path))"
            )
        want = self.encoder.get("tokenizer_fingerprint")
        got = encoding.tokenizer_fingerprint(path)
        if want and got != want:
            raise ArtifactError(
                f"tokenizer at {path!r} (vocabulary fingerprint {got}) is not the one the artifact's encoder was "
                f"trained with (fingerprint {want}); token ids would index the wrong embeddings"
            )
        return path

    def embed_tokenizer(self, folder: str | os.PathLike[str] | None = None) -> bool:
        """Carry the tokenizer of a carried frozen encoder with a vocabulary of its own inside the
        artifact (:attr:`tokenizer_files`, written by :meth:`save`), so the file needs no encoder folder.

        Applies only to ``carried="frozen"`` with a tokenizer folder (not ``"default"``); otherwise
        nothing is embedded and False returned (the default MiniLM ships with the library; a fine-tuned
        artifact needs its frozen encoder's folder anyway). The tokenizer is read from ``folder``
        (default: the recorded ``encoder["tokenizer"]``; :meth:`tokenizer_path` checks it exists and
        has ``encoder["tokenizer_fingerprint"]``, else :class:`ArtifactError`). Its files
        (:data:`TOKENIZER_FILES` of ``save_pretrained``) are kept only if the tokenizer read back from
        them alone has the same fingerprint, special tokens and token ids on probe texts (with the
        artifact's query and answer truncation); otherwise -- e.g. a slow-only tokenizer -- a warning
        says so and the artifact keeps referring to the folder. Returns whether the tokenizer is
        embedded (already embedded and no ``folder``: True, nothing read). Re-embedding an older
        artifact: ``art = load_artifact(p); art.embed_tokenizer(folder); art.save(p)``.
        """
        if self.encoder.get("carried") != "frozen" or self.encoder.get("tokenizer", DEFAULT_ENCODER) == DEFAULT_ENCODER:
            return False
        if self.tokenizer_files and folder is None:
            return True
        path = self.tokenizer_path(folder)
        tok = encoding.load_tokenizer(path)
        try:
            files = tokenizer_files_of(tok)
            why = self._tokenization_differs(tok, tokenizer_from_files(files, f"the tokenizer of {path!r}"))
        except ArtifactError as err:
            why = str(err)
        if why:
            warnings.warn(f"the tokenizer of {path!r} is not embedded in the artifact ({why}); the artifact "
                          "refers to that folder: copy it along with the artifact, to the same path", stacklevel=2)
            return False
        self.tokenizer_files = files
        return True

    def _tokenization_differs(self, want, got) -> str | None:
        """Why tokenizer ``got`` (read back from embedded files) would not give ``want``'s token ids, or None."""
        if encoding.tokenizer_object_fingerprint(want) != encoding.tokenizer_object_fingerprint(got):
            return "its vocabulary fingerprint changes when read back from its files"
        for attr in ("pad_token_id", "all_special_ids", "model_max_length", "__len__"):
            a, b = getattr(want, attr), getattr(got, attr)
            if (a() if callable(a) else a) != (b() if callable(b) else b):
                return f"its {attr.strip('_')} changes when read back from its files"
        probes = _probe_texts(want)
        if want(probes, verbose=False)["input_ids"] != got(probes, verbose=False)["input_ids"]:
            return "read back from its files it gives other token ids"
        settings = {(int(self.encoder["max_length"]), self.query_truncation)}
        if "answer_max_length" in self.encoder:
            settings.add((int(self.encoder["answer_max_length"]), self.answer_truncation))
        for max_length, truncation in sorted(settings):
            if encoding.tokenize(probes, want, max_length, truncation) != encoding.tokenize(probes, got, max_length, truncation):
                return f"read back from its files it gives other token ids at max_length {max_length}, {truncation} truncation"
        return None

    def encoder_path(self) -> str:
        """Folder of the frozen encoder the artifact does not carry: the default MiniLM (``path`` is
        ``"default"``) or the folder recorded at export. A non-default one is needed by a fine-tuned
        artifact (answers are embedded by the frozen encoder it was fine-tuned from, with that
        folder's tokenizer) and by a format-1 artifact (weights, config and tokenizer read from the
        folder); :class:`ArtifactError` naming it, and why, when it is missing."""
        path = self.encoder.get("path", DEFAULT_ENCODER)
        if path == DEFAULT_ENCODER:
            return encoding.resolve_encoder_path(None)
        if not Path(str(path)).is_dir():
            why = ("it carries only its fine-tuned query encoder; answers are embedded by the frozen encoder it "
                   "was fine-tuned from, and queries and answers are tokenized by that folder's tokenizer"
                   if self.encoder.get("carried") == "finetuned"
                   else "it refers to its encoder by path: weights, config and tokenizer are read from that folder")
            raise ArtifactError(f"artifact {self.source or ''} needs the encoder folder {str(path)!r}, which does not "
                                f"exist ({why}): copy that folder along with the artifact, to the same path")
        return str(path)

    def _text_encoders(self):
        with self._lazy_lock:
            return self._load_text_encoders()

    def _load_text_encoders(self):
        if self._text is None and self.encoder.get("carried") == "frozen":
            tok = self._carried_tokenizer()
            enc = self.network().encoder
            vocab = int(enc.model.config.vocab_size)
            if len(tok) > vocab:
                raise ArtifactError(
                    f"tokenizer has {len(tok)} tokens but the carried encoder's vocabulary has {vocab}"
                )
            self._text = (tok, enc)  # the carried encoder embeds queries and answers
        if self._text is None:
            path = self.encoder_path()
            fp = encoding.encoder_fingerprint(path)
            if self.encoder.get("fingerprint") and fp != self.encoder["fingerprint"]:
                raise ArtifactError(
                    f"encoder at {path!r} (fingerprint {fp}) is not the one the artifact was trained with "
                    f"(fingerprint {self.encoder['fingerprint']})"
                )
            self._text = (encoding.load_tokenizer(path), encoding.TextEncoder.from_path(path))
        return self._text

    def _carried_tokenizer(self):
        """The carried frozen encoder's tokenizer: the embedded one (:attr:`tokenizer_files`), else the
        folder's (:meth:`tokenizer_path`); checked against ``encoder["tokenizer_fingerprint"]``."""
        if not self.tokenizer_files:
            return encoding.load_tokenizer(self.tokenizer_path())
        tok = tokenizer_from_files(self.tokenizer_files, f"artifact {self.source or ''}")
        want, got = self.encoder.get("tokenizer_fingerprint"), encoding.tokenizer_object_fingerprint(tok)
        if want and got != want:
            raise ArtifactError(
                f"the tokenizer embedded in artifact {self.source or ''} (vocabulary fingerprint {got}) is not the "
                f"one its encoder was trained with (fingerprint {want}): the file was altered or is corrupt"
            )
        return tok

    def embed_queries(self, queries: list[str], batch_size: int = 64) -> np.ndarray:
        """[N, D] query embeddings (the fine-tuned encoder when the artifact carries one)."""
        tok, frozen = self._text_encoders()
        net = self.network()
        enc = net.encoder if net.encoder is not None else frozen
        return encoding.encode_texts(list(queries), tok, enc, "transformer", int(self.encoder["max_length"]), batch_size,
                                     truncation=self.query_truncation)

    @property
    def query_truncation(self) -> str:
        """How queries were truncated in training (artifacts written before the setting existed: ``right``)."""
        return str(self.encoder.get("truncation", encoding.SETTINGS_BEFORE_THEY_EXISTED["truncation"]))

    @property
    def answer_truncation(self) -> str:
        """How answers were truncated in training (artifacts written before the setting existed: ``right``)."""
        return str(self.encoder.get("answer_truncation", encoding.SETTINGS_BEFORE_THEY_EXISTED["answer_truncation"]))

    def embed_answers(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """[N, D] answer embeddings. Answers have their own tokenizer instance, so a server may embed
        answers on one thread while it encodes queries on another (a fast tokenizer is not shared)."""
        with self._lazy_lock:
            tok, frozen = self._text_encoders()
            if self._answer_tokenizer is None:
                self._answer_tokenizer = copy.deepcopy(tok)
        return encoding.encode_texts(
            list(texts), self._answer_tokenizer, frozen, self.encoder["answer_encoding"], int(self.encoder["answer_max_length"]), batch_size,
            truncation=self.answer_truncation,
        )

    # ------------------------------------------------------------------ binding
    def bind(
        self,
        queries: list[str],
        responses: np.ndarray | None = None,
        features: Mapping[str, np.ndarray] | None = None,
        tasks: list[str] | None = None,
        *,
        query_embeddings: np.ndarray | Tensor | None = None,
        answer_embedder: Callable[[list[str]], np.ndarray] | None = None,
        uncertainty: str | None = None,
    ) -> tuple[LearnedQualityEstimator, BoundCostEstimator]:
        """Bound ``(QualityEstimator, CostEstimator)`` over ``queries`` (row i = ``queries[i]``).

        ``responses`` object [N, M] (None where not run) and ``features`` {name: float [N, M]} are
        read only where a model has run, so they may be filled in place as answers arrive;
        ``features["cost"]`` (if given) is the exact cost of run models. ``tasks``: one task label
        (or None) per query; unknown or missing ones warn (:class:`UnseenTaskWarning`).
        ``query_embeddings`` [N, D] (finite) / ``answer_embedder`` override the encoder (e.g. with
        cached embeddings). ``uncertainty``: ``variance``, ``covariance`` or ``none`` (default: the
        artifact's). Bad shapes, lengths, modes or non-finite embeddings raise :class:`ArtifactError`;
        a single string for ``queries`` or ``tasks`` raises ``TypeError``.
        """
        queries = checked_queries(queries)
        if tasks is not None:
            tasks = checked_queries(tasks, "tasks", allow_none=True)
        n, m = len(queries), len(self.models)
        if responses is not None and np.shape(responses) != (n, m):
            raise ArtifactError(
                f"responses has shape {np.shape(responses)}, expected [{n} queries, {m} models {self.models}]"
            )
        for key, arr in (features or {}).items():
            if np.shape(arr) != (n, m):
                raise ArtifactError(f"feature {key!r} has shape {np.shape(arr)}, expected [{n}, {m}] (models {self.models})")
        if tasks is not None and len(tasks) != n:
            raise ArtifactError(f"{len(tasks)} task labels for {n} queries")
        mode = uncertainty or self.uncertainty
        check_uncertainty_mode(mode, ArtifactError)
        q = self.embed_queries(queries) if query_embeddings is None else query_embeddings
        q = torch.as_tensor(np.asarray(q, dtype=np.float32))
        if q.shape != (n, self.network_config["embed_dim"]):
            raise ArtifactError(f"query embeddings have shape {tuple(q.shape)}, expected ({n}, {self.network_config['embed_dim']})")
        if not bool(torch.isfinite(q).all()):
            row = int((~torch.isfinite(q)).any(1).nonzero()[0, 0])
            raise ArtifactError(f"query embeddings must be finite; row {row} has NaN or inf")
        unseen = unseen_task_message(tasks, self.task_vocabulary)
        if unseen:
            warnings.warn(UnseenTaskWarning(unseen), stacklevel=2)
        task = torch.from_numpy(task_onehot(tasks, self.task_vocabulary, n))
        query_feat = None
        if self.network_config.get("num_query_features"):
            query_feat = torch.from_numpy(text_statistics(queries))
        quality = LearnedQualityEstimator(
            self.network(),
            self.models,
            q,
            task,
            responses,
            features,
            answer_embedder or self.embed_answers,
            uncertainty=mode,
            var_scale=self.var_scale,
            covariances=self.covariances,
            query_feat=query_feat,
            covariance_coverage=self.covariance_coverage,
        )
        cost = BoundCostEstimator(self.cost_model, queries, features, tasks)
        return quality, cost

    # ------------------------------------------------------------------ persistence
    def payload(self) -> dict:
        encoder = {k: v for k, v in self.encoder.items() if k != "tokenizer_files"}
        if self.tokenizer_files:
            encoder["tokenizer_files"] = sorted(self.tokenizer_files)
        return {
            "models": self.models,
            "network_config": self.network_config,
            "cost_model": self.cost_model.to_dict(),
            "prices": self.prices,
            "encoder": encoder,
            "task_vocabulary": self.task_vocabulary,
            "binary": self.binary,
            "uncertainty": self.uncertainty,
            "covariance_kind": self.covariance_kind,
            "covariance_coverage": self.covariance_coverage,
            "calibration": self.calibration,
            "uncertainty_selection": self.uncertainty_selection,
            "pools": self.pools,
            "fitted": {s: [{**f.to_dict(), "table_budget": b} for b, f in sorted(t.items())] for s, t in self.fitted.items()},
            "data_config": self.data_config,
            "train_config": self.train_config,
            "metrics": self.metrics,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the artifact atomically to ``path`` (a ``.safetensors`` file)."""
        from safetensors.torch import save as safetensors_bytes

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in self.state_dict.items()}
        if self.var_scale is not None:
            tensors["var_scale"] = self.var_scale.detach().cpu().float().contiguous()
        if self.covariances is not None:
            table = self.covariances.detach().cpu().float()
            if self.covariance_coverage is not None:  # only the covered rows (the others are NaN)
                table = table[coverage_ids(self.covariance_coverage, self.models)]
            tensors["covariances"] = table.contiguous()
        for name, data in sorted(self.tokenizer_files.items()):  # readers that predate them ignore these
            tensors[TOKENIZER_TENSOR_PREFIX + name] = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
        # version 2 only adds optional encoder keys, so a loaded version-1 artifact is written as valid version 2
        meta = {"format": FORMAT_TAG, "format_version": str(FORMAT_VERSION), "payload": json.dumps(self.payload())}
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        # written by Python's open, so the file mode follows the umask like any other output (safetensors'
        # save_file creates it owner-only, which another user's server could not read)
        with open(tmp, "wb") as fh:
            fh.write(safetensors_bytes(tensors, metadata=meta))
        os.replace(tmp, path)
        return path

    def save_pretrained(self, path: str | os.PathLike[str]) -> Path:
        """:meth:`save` to ``path``; a folder (existing, or a path without suffix) gets ``ARTIFACT_FILENAME`` inside."""
        return self.save(_artifact_file(path))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], expected_models: list[str] | None = None) -> "EstimatorArtifact":
        """:func:`load_artifact` of ``path``, a ``.safetensors`` file or a folder written by :meth:`save_pretrained`."""
        return load_artifact(_artifact_file(path), expected_models)

    def tokenizer(self):
        """The tokenizer of the artifact's query/answer encoder (loaded once)."""
        return self._text_encoders()[0]


ARTIFACT_FILENAME = "estimator.safetensors"


def _artifact_file(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    return path / ARTIFACT_FILENAME if path.is_dir() or not path.suffix else path


def looks_like_safetensors(path: str | os.PathLike[str]) -> bool:
    """Whether the file has a safetensors file's shape: an 8-byte little-endian header length n, then
    n bytes of JSON (``{`` first) within the file. Reads 9 bytes."""
    path = Path(path)
    with path.open("rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size


def _sniff(path: Path) -> str | None:
    """None for a safetensors-shaped file, else what it looks like.

    The safetensors shape (:func:`looks_like_safetensors`) is checked first: the low byte of its
    header length may be 0x80 or the first two bytes ``PK``, which alone would look like a pickle /
    zip archive.
    """
    if looks_like_safetensors(path):
        return None
    with path.open("rb") as fh:
        head = fh.read(8)
    if head[:1] == b"\x80" or head[:2] == b"PK":
        return "a Python pickle / torch.save archive"
    if len(head) < 8:
        return "too short to be a safetensors file"
    return None


def _read_file(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """(metadata, tensors) of an artifact file, refusing anything that is not a safetensors file of
    this format at a readable version without loading it (pickles, torch.save archives, corrupt files)."""
    if not path.is_file():
        raise ArtifactError(f"checkpoint {str(path)!r} does not exist or is not a file")
    kind = _sniff(path)
    if kind is not None:
        raise ArtifactError(
            f"checkpoint {str(path)!r} is {kind}, not a cascade-routing estimator artifact (safetensors); "
            "refused without loading it (pickles can run code)"
        )
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ArtifactError(f"checkpoint {str(path)!r} is corrupt or not a safetensors file: {err}") from None
    if meta.get("format") != FORMAT_TAG:
        raise ArtifactError(
            f"checkpoint {str(path)!r} is a safetensors file but not a cascade-routing estimator artifact "
            f"(metadata format={meta.get('format')!r}, expected {FORMAT_TAG!r})"
        )
    version = meta.get("format_version")
    if version not in {str(v) for v in READABLE_VERSIONS}:
        raise ArtifactError(
            f"checkpoint {str(path)!r} has artifact format version {version!r}; this library reads versions "
            f"{list(READABLE_VERSIONS)} (retrain or use the matching cascade-routing release)"
        )
    return meta, tensors


def _from_payload(path: Path, meta: dict[str, str], tensors: dict[str, Tensor]) -> EstimatorArtifact:
    """The artifact from the JSON payload and tensors of a file (the inverse of
    :meth:`EstimatorArtifact.save`); a missing or mistyped field is an :class:`ArtifactError`."""
    from cascade_routing.policies.fitting import FittedLambda

    try:
        p = json.loads(meta["payload"])
        return EstimatorArtifact(
            models=[str(x) for x in p["models"]],
            network_config=dict(p["network_config"]),
            state_dict={k[4:]: v for k, v in tensors.items() if k.startswith("net.")},
            cost_model=CostModel.from_dict(p["cost_model"]),
            encoder=dict(p["encoder"]),
            task_vocabulary=list(p.get("task_vocabulary", [])),
            binary=bool(p.get("binary", True)),
            uncertainty=str(p.get("uncertainty", "variance")),
            var_scale=tensors.get("var_scale"),
            covariances=tensors.get("covariances"),
            covariance_kind=p.get("covariance_kind"),
            covariance_coverage=p.get("covariance_coverage"),
            calibration=dict(p.get("calibration", {})),
            uncertainty_selection=dict(p.get("uncertainty_selection", {})),
            pools={str(k): [str(x) for x in v] for k, v in p.get("pools", {}).items()},
            fitted={
                s: {float(e.get("table_budget", e.get("budget"))): FittedLambda.from_dict(e) for e in entries}
                for s, entries in p.get("fitted", {}).items()
            },
            data_config=dict(p.get("data_config", {})),
            train_config=dict(p.get("train_config", {})),
            metrics=dict(p.get("metrics", {})),
            format_version=int(meta["format_version"]),
            source=str(path),
        )
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
        raise ArtifactError(f"checkpoint {str(path)!r} has a malformed payload: {type(err).__name__}: {err}") from None


def _check_consistent(art: EstimatorArtifact, path: Path) -> None:
    """Raise unless the network, cost model and variance scale fit the model list (covariances:
    :func:`_covariances_on_all_sets`)."""
    m = len(art.models)
    if art.network_config.get("num_models") != m or art.cost_model.models != art.models:
        raise ArtifactError(
            f"checkpoint {str(path)!r} is inconsistent: {m} models {art.models}, network for "
            f"{art.network_config.get('num_models')}, cost model for {art.cost_model.models}"
        )
    if art.var_scale is not None and tuple(art.var_scale.shape) != (m,):
        raise ArtifactError(f"checkpoint {str(path)!r}: var_scale has shape {tuple(art.var_scale.shape)}, expected ({m},)")
    for strategy, table in art.fitted.items():
        for budget, fit in table.items():
            if fit.models is not None and max(fit.models) >= m:
                raise ArtifactError(f"checkpoint {str(path)!r}: the fitted λ of {strategy!r} at budget {budget:.6g} "
                                    f"names model indices {list(fit.models)}, but the artifact has {m} models")


def load_artifact(path: str | os.PathLike[str], expected_models: list[str] | None = None) -> EstimatorArtifact:
    """Read an artifact written by :meth:`EstimatorArtifact.save` (see module docstring for errors);
    a folder is read as the one :meth:`EstimatorArtifact.save_pretrained` writes (``estimator.safetensors`` inside)."""
    if Path(path).is_dir():
        folder, path = Path(path), _artifact_file(path)
        if not path.is_file():
            raise ArtifactError(f"{str(folder)!r} is a folder without {ARTIFACT_FILENAME}: not one that "
                                "save_pretrained writes; pass the artifact file (.safetensors) or such a folder")
    path = Path(path)
    meta, tensors = _read_file(path)
    art = _from_payload(path, meta, tensors)
    art.tokenizer_files = _embedded_tokenizer_files(art, path, tensors)
    _check_consistent(art, path)
    if art.covariances is not None:
        art.covariances = _covariances_on_all_sets(art, path)
    if expected_models is not None:
        art.check_models(list(expected_models), where="the expected model list")
    art.network()  # fail now, not at first use, if the weights do not fit
    return art


def _embedded_tokenizer_files(art: EstimatorArtifact, path: Path, tensors: dict[str, Tensor]) -> dict[str, bytes]:
    """The tokenizer files a file embeds (``tokenizer/<name>`` uint8 tensors, listed in
    ``encoder["tokenizer_files"]``); :class:`ArtifactError` for a name outside :data:`TOKENIZER_FILES`,
    a list that does not match the tensors, or a tensor that is not 1-D uint8. Nothing is parsed here."""
    stored = {k[len(TOKENIZER_TENSOR_PREFIX):]: v for k, v in tensors.items() if k.startswith(TOKENIZER_TENSOR_PREFIX)}
    listed = art.encoder.get("tokenizer_files")
    if not stored and not listed:
        return {}
    if not isinstance(listed, list) or sorted(map(str, listed)) != sorted(stored):
        raise ArtifactError(f"checkpoint {str(path)!r} lists the embedded tokenizer files {listed!r} but holds "
                            f"{sorted(stored)}: the file is corrupt or was edited")
    unknown = sorted(set(stored) - set(TOKENIZER_FILES))
    if unknown or "tokenizer.json" not in stored:
        raise ArtifactError(f"checkpoint {str(path)!r} embeds the tokenizer files {sorted(stored)}; an embedded "
                            f"tokenizer is tokenizer.json plus some of {list(TOKENIZER_FILES[1:])} "
                            "(refused without reading them)")
    for name, t in stored.items():
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise ArtifactError(f"checkpoint {str(path)!r}: tensor {TOKENIZER_TENSOR_PREFIX}{name} is {t.dtype} "
                                f"{tuple(t.shape)}, expected the file's bytes (uint8, 1-D)")
    return {name: t.numpy().tobytes() for name, t in sorted(stored.items())}


def tokenizer_files_of(tok) -> dict[str, bytes]:
    """The files of the fast tokenizer ``tok`` that :func:`tokenizer_from_files` reads back: those of
    :data:`TOKENIZER_FILES` that ``save_pretrained`` writes (``tokenizer.json`` without its
    indentation). :class:`ArtifactError` for a tokenizer that is not a fast (``tokenizers``) one."""
    from transformers import PreTrainedTokenizerFast

    if not isinstance(tok, PreTrainedTokenizerFast):
        raise ArtifactError(f"{type(tok).__name__} is not a fast (tokenizers) tokenizer, the only kind an "
                            "artifact embeds")
    with tempfile.TemporaryDirectory(prefix="cascade-routing-tokenizer-") as tmp:
        tok.save_pretrained(tmp)
        files = {f.name: f.read_bytes() for f in Path(tmp).iterdir() if f.name in TOKENIZER_FILES and f.is_file()}
    if "tokenizer.json" not in files:
        raise ArtifactError(f"{type(tok).__name__}.save_pretrained wrote no tokenizer.json")
    files["tokenizer.json"] = json.dumps(json.loads(files["tokenizer.json"]), ensure_ascii=False,
                                         separators=(",", ":")).encode()
    return files


#: tokenizer_config.json keys an embedded tokenizer may not set (nor any ``*_file`` / ``*_files`` key,
#: which would make transformers read other files): ``auto_map`` names code to import.
_REFUSED_TOKENIZER_KEYS = ("auto_map",)


def tokenizer_from_files(files: Mapping[str, bytes], where: str = "the artifact") -> Any:
    """The fast tokenizer of ``files`` (name -> bytes, as :func:`tokenizer_files_of` gives), loaded by
    ``transformers`` from a temporary folder (local files only, no remote code) that is removed
    afterwards. :class:`ArtifactError` naming ``where`` for a name outside :data:`TOKENIZER_FILES`, no
    ``tokenizer.json``, a ``tokenizer_config.json`` that is not a JSON object or names files or code
    (``*_file``, ``auto_map``), files ``transformers`` cannot read, or a tokenizer that is not a fast one."""
    from transformers import PreTrainedTokenizerFast

    unknown = sorted(set(files) - set(TOKENIZER_FILES))
    if unknown or "tokenizer.json" not in files:
        raise ArtifactError(f"{where}: an embedded tokenizer is tokenizer.json plus some of "
                            f"{list(TOKENIZER_FILES[1:])}, not {sorted(files)}")
    if "tokenizer_config.json" in files:
        try:
            config = json.loads(files["tokenizer_config.json"])
        except (ValueError, UnicodeDecodeError) as err:
            raise ArtifactError(f"{where}: the embedded tokenizer_config.json is not JSON: {err}") from None
        if not isinstance(config, dict):
            raise ArtifactError(f"{where}: the embedded tokenizer_config.json is not a JSON object")
        refused = sorted(k for k, v in config.items()
                         if v is not None and (k in _REFUSED_TOKENIZER_KEYS or k.endswith(("_file", "_files"))))
        if refused:
            raise ArtifactError(f"{where}: the embedded tokenizer_config.json sets {refused}, which would make "
                                "transformers read other files or code; refused")
    try:
        with tempfile.TemporaryDirectory(prefix="cascade-routing-tokenizer-") as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(bytes(data))
            try:
                tok = encoding.load_tokenizer(tmp)
            except Exception as err:  # noqa: BLE001 -- the tokenizers parser raises plain Exception for bad JSON
                raise ArtifactError(f"{where}: its embedded tokenizer cannot be read: {type(err).__name__}: "
                                    f"{err}") from None
    except OSError as err:
        raise ArtifactError(f"{where}: cannot write its embedded tokenizer to a temporary folder ({err}); set "
                            "TMPDIR to a writable folder") from None
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise ArtifactError(f"{where}: its embedded tokenizer loads as {type(tok).__name__}, not a fast tokenizer")
    return tok


def _probe_texts(tok) -> list[str]:
    """Texts whose token ids must not change when a tokenizer is read back from its files: every
    200th-or-so vocabulary entry, accents, CJK, emoji, control whitespace, and texts far longer
    than any max_length (truncation)."""
    vocab = tok.get_vocab()
    words = [w.removeprefix("##") for w in sorted(vocab, key=vocab.__getitem__)[:: max(1, len(vocab) // 200)]]
    sample = " ".join(words)
    return ["", "Hello, World!", "naïve CAFÉ — 日本語 🙂\ttab\nnew line  spaces", sample,
            " ".join([sample] * 8), "x" * 3000]


def _covariances_on_all_sets(art: EstimatorArtifact, path: Path) -> Tensor:
    """The stored table as [2^M, M, M]: a restricted one (``covariance_coverage``) expanded with NaN rows."""
    m = len(art.models)
    try:
        ids = coverage_ids(art.covariance_coverage, art.models)
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"checkpoint {str(path)!r}: unusable covariance_coverage {art.covariance_coverage!r}: "
                            f"{type(err).__name__}: {err}") from None
    what = "" if art.covariance_coverage is None else f" (the {ids.numel()} ran-sets of {art.covariance_coverage})"
    if tuple(art.covariances.shape) != (ids.numel(), m, m):
        raise ArtifactError(
            f"checkpoint {str(path)!r}: covariances have shape {tuple(art.covariances.shape)}, expected "
            f"({ids.numel()}, {m}, {m}){what}"
        )
    if art.covariance_coverage is None:
        return art.covariances
    if not bool(torch.isfinite(art.covariances).all()):
        raise ArtifactError(f"checkpoint {str(path)!r}: covariances hold NaN or inf")
    return on_all_sets(art.covariances, ids, m)


def encoder_reference(datamodule, network) -> tuple[dict, dict[str, Tensor]]:
    """The artifact's ``encoder`` entry and the encoder tensors to add to its state dict.

    - default MiniLM, frozen: ``path="default"``, nothing carried;
    - a fine-tuned query encoder (``network.encoder`` set): its weights are already in the state
      dict; ``carried="finetuned"`` and its ``hf_config`` are recorded;
    - a non-default frozen encoder (a distilled student): its weights are added as
      ``encoder.model.*`` (the fine-tuned encoder's keys), ``carried="frozen"``, with its
      ``hf_config`` and a tokenizer reference (``"default"`` when its vocabulary fingerprint equals
      the default MiniLM's, else the folder, whose tokenizer
      :meth:`EstimatorArtifact.embed_tokenizer` then embeds), so the artifact works without the
      encoder folder.
    """
    enc_path = datamodule.resolved_encoder_path
    # MiniLM's own folder given by path is the default too: referenced, not carried (91 MB)
    is_default = (datamodule.encoder_path in (None, DEFAULT_ENCODER)
                  or Path(enc_path).resolve() == Path(encoding.default_encoder_path()).resolve())
    ref = {
        "path": DEFAULT_ENCODER if is_default else str(Path(enc_path).resolve()),
        "fingerprint": encoding.encoder_fingerprint(enc_path),
        "max_length": datamodule.max_length,
        "truncation": datamodule.truncation,
        "answer_max_length": datamodule.answer_max_length,
        "answer_encoding": datamodule.answer_encoding,
        "answer_truncation": datamodule.answer_truncation,
    }
    extra: dict[str, Tensor] = {}
    if network.encoder is not None:
        ref["carried"] = "finetuned"
        ref["hf_config"] = network.encoder.model.config.to_dict()
    elif not is_default:
        frozen = datamodule.encoder
        ref["carried"] = "frozen"
        ref["hf_config"] = frozen.model.config.to_dict()
        fp = encoding.tokenizer_fingerprint(enc_path)
        ref["tokenizer_fingerprint"] = fp
        ref["tokenizer"] = DEFAULT_ENCODER if fp == encoding.tokenizer_fingerprint(encoding.default_encoder_path()) \
            else str(Path(enc_path).resolve())
        extra = {f"encoder.{k}": v.detach().cpu().clone() for k, v in frozen.state_dict().items()}
    return ref, extra
