"""The quality-estimation network (a plain ``nn.Module``; training logic lives in ``module.py``).

One network serves ex-ante and post-hoc estimation:

    inputs  query embedding q [B, D] (mean-pooled encoder output), task one-hot t [B, T],
            query text statistics x [B, X] (``features.text_statistics``),
            ran [B, M] (bool), answer embeddings A [B, M, D], answer features F [B, M, K]
            (plus the log surprise of its log-prob confidence, ``features.encode_confidence``)
    masking A, F ← where(ran, A, 0), where(ran, F, 0)     (first operation: no leakage, NaN-safe)
    prior   n = neighbour_prior(q; memory of training queries, k)          [B, M + 1]  (``neighbours.py``)
    query   h = MLP([q?, t, x, n])          (q itself only when ``query_embedding_input``) [B, H]
    answers a_m = MLP(W_A·A_m + W_F·[F_m, s_m, C_m]) + e_m,  C_mk = cos(A_m, A_k) for run pairs (k≠m),
            s_m = mean_k C_mk (agreement in embedding space)
            a_m ← ran_m · a_m ;  c = Σ_m a_m / max(1, |ran|)                [B, M, H], [B, H]
    joint   z = h + MLP([h, c, ran])                                       [B, H]
    heads   logit_m = w_m·z + b_m + ran_m · (u_m·a_m)       (mean of model m's quality, logit space)
            logvar_m = v_m·z + d_m + ran_m · (g_m·a_m)      (log-variance of the residual, see below)

With ``ran`` all false this is the ex-ante estimator (the answer branch contributes exactly 0).
``logvar`` is the variance head: the log of E[(p(all) − p(ran))²], the expected squared change of
the probability estimate once every model has run (the paper's notion of uncertainty).
An unrun model's answer embedding and features are replaced by zeros before any arithmetic, so
they cannot influence any output (``tests/test_estimators_network.py`` checks this).

The neighbour memory (unit query embeddings and qualities of the training split) is held in
buffers, so it travels inside the artifact with the weights. Defaults of the fields added for it
(``num_query_features=0``, ``neighbours=0``, ``query_embedding_input=True``) rebuild networks saved
before it existed unchanged; so does ``confidence_encoding="logprob"`` (the raw log-prob, what networks
saved before the field was fed; :class:`~cascade_routing.training.module.QualityEstimatorModule` trains
new ones with ``"logprob_and_surprise"``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from cascade_routing.estimators.agreement import masked_agreement
from cascade_routing.estimators.features import CONFIDENCE_ENCODINGS, encode_confidence, encoded_width
from cascade_routing.estimators.neighbours import neighbour_prior

LOGVAR_MIN, LOGVAR_MAX = -14.0, 2.0


@dataclass
class NetworkConfig:
    num_models: int  # M, columns in cost order
    embed_dim: int  # D, encoder hidden size (queries and answers)
    num_tasks: int = 0  # T, size of the task one-hot (0: no task input)
    num_answer_features: int | None = None  # K; None -> 4 + num_models (what features.compose_features gives)
    hidden: int = 128  # H
    dropout: float = 0.1
    num_query_features: int = 0  # X, query text statistics (0: none)
    neighbours: int = 0  # k of the neighbour prior (0: no prior)
    memory_size: int = 0  # training queries held for the neighbour prior
    query_embedding_input: bool = True  # feed q itself to the query MLP (besides the prior)
    confidence_encoding: str = "logprob"  # how the log-prob confidence enters (features.encode_confidence)

    def __post_init__(self) -> None:
        if self.num_answer_features is None:
            self.num_answer_features = 4 + int(self.num_models)
        if self.confidence_encoding not in CONFIDENCE_ENCODINGS:
            raise ValueError(f"confidence_encoding must be one of {CONFIDENCE_ENCODINGS}, got {self.confidence_encoding!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _mlp(i: int, o: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, o), nn.GELU(), nn.Dropout(dropout), nn.Linear(o, o), nn.GELU())


class QualityNetwork(nn.Module):
    """Per-model quality heads over a pooled query embedding, conditioned on the run answers."""

    def __init__(self, config: NetworkConfig, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        c = config
        self.encoder = encoder  # optional TextEncoder for fine-tuning; None: embeddings given
        if c.neighbours and c.memory_size <= c.neighbours:
            raise ValueError(f"neighbours={c.neighbours} needs memory_size > neighbours, got {c.memory_size}")
        query_in = (c.embed_dim if c.query_embedding_input else 0) + c.num_tasks + c.num_query_features
        query_in += (c.num_models + 1) if c.neighbours else 0
        if query_in == 0:
            raise ValueError("the query MLP has no input: enable query_embedding_input, tasks, statistics or neighbours")
        if c.neighbours:
            self.register_buffer("memory_keys", torch.zeros(c.memory_size, c.embed_dim))
            self.register_buffer("memory_labels", torch.zeros(c.memory_size, c.num_models))
        self.query_mlp = _mlp(query_in, c.hidden, c.dropout)
        self.answer_proj = nn.Linear(c.embed_dim, c.hidden)
        width = c.num_answer_features + encoded_width(c.confidence_encoding) + 1 + c.num_models
        self.answer_feat_proj = nn.Linear(width, c.hidden, bias=False)
        self.answer_mlp = nn.Sequential(nn.GELU(), nn.Dropout(c.dropout), nn.Linear(c.hidden, c.hidden), nn.GELU())
        self.model_embedding = nn.Parameter(torch.zeros(c.num_models, c.hidden))
        self.joint_mlp = _mlp(2 * c.hidden + c.num_models, c.hidden, c.dropout)
        self.mean_head = nn.Linear(c.hidden, c.num_models)
        self.logvar_head = nn.Linear(c.hidden, c.num_models)
        self.mean_self = nn.Parameter(torch.zeros(c.num_models, c.hidden))
        self.logvar_self = nn.Parameter(torch.zeros(c.num_models, c.hidden))
        nn.init.normal_(self.model_embedding, std=0.02)
        nn.init.normal_(self.mean_self, std=0.02)
        nn.init.normal_(self.logvar_self, std=0.02)
        nn.init.constant_(self.logvar_head.bias, -4.0)

    def set_memory(self, query_emb: Tensor, quality: Tensor) -> None:
        """Store the training queries of the neighbour prior (keys are L2-normalised here)."""
        c = self.config
        if not c.neighbours:
            raise RuntimeError("this network has no neighbour prior (config.neighbours == 0)")
        if tuple(query_emb.shape) != (c.memory_size, c.embed_dim) or tuple(quality.shape) != (c.memory_size, c.num_models):
            raise ValueError(
                f"memory must be [{c.memory_size}, {c.embed_dim}] embeddings and [{c.memory_size}, {c.num_models}] "
                f"qualities, got {tuple(query_emb.shape)} and {tuple(quality.shape)}"
            )
        self.memory_keys.copy_(nn.functional.normalize(query_emb.float(), dim=-1))
        self.memory_labels.copy_(quality.float())

    def query_inputs(self, query_emb: Tensor, task: Tensor | None, query_feat: Tensor | None) -> Tensor:
        """``[q?, t, x, n]``: the query MLP's input (missing task / statistics read as zeros)."""
        c = self.config
        parts = [query_emb] if c.query_embedding_input else []
        for width, value in ((c.num_tasks, task), (c.num_query_features, query_feat)):
            if width:
                parts.append(query_emb.new_zeros(query_emb.shape[0], width) if value is None else value.to(query_emb.dtype))
        if c.neighbours:
            parts.append(neighbour_prior(query_emb, self.memory_keys, self.memory_labels, c.neighbours))
        return torch.cat(parts, dim=-1)

    def embed_queries(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if self.encoder is None:
            raise RuntimeError("this QualityNetwork has no encoder; pass query embeddings instead")
        return self.encoder(input_ids, attention_mask)

    def prepare_answers(self, answer_emb: Tensor) -> dict[str, Tensor]:
        """Mask-independent answer terms: ``proj`` = W_A·A_m + b [B, M, H] and cosine ``sim`` [B, M, M].

        Useful to evaluate many ran-masks on the same rows; :meth:`forward_prepared` masks them.
        """
        unit = nn.functional.normalize(answer_emb, dim=-1)
        return {"proj": self.answer_proj(answer_emb), "sim": unit @ unit.transpose(1, 2)}

    def forward(
        self,
        query_emb: Tensor,
        ran: Tensor,
        answer_emb: Tensor,
        answer_feat: Tensor,
        task: Tensor | None = None,
        query_feat: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Returns ``(logit [B, M], logvar [B, M])``; see the module docstring for the formula."""
        r = ran.bool().unsqueeze(-1)
        answer_emb = torch.where(r, answer_emb, torch.zeros((), dtype=answer_emb.dtype))
        return self.forward_prepared(query_emb, ran, self.prepare_answers(answer_emb), answer_feat, task, query_feat)

    def forward_prepared(
        self,
        query_emb: Tensor,
        ran: Tensor,
        prepared: dict[str, Tensor],
        answer_feat: Tensor,
        task: Tensor | None = None,
        query_feat: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`forward` given :meth:`prepare_answers` output; unrun cells are masked here too."""
        ran = ran.bool()
        r = ran.unsqueeze(-1)
        rf = ran.to(query_emb.dtype)
        zero = torch.zeros((), dtype=query_emb.dtype)
        proj = torch.where(r, prepared["proj"], self.answer_proj.bias.to(query_emb.dtype))
        answer_feat = encode_confidence(torch.where(r, answer_feat, zero), self.config.confidence_encoding)
        sim, agree = masked_agreement(prepared["sim"], ran, query_emb.dtype)  # [B, M, M], [B, M]

        h = self.query_hidden(query_emb, task, query_feat)

        a = self.answer_mlp(proj + self.answer_feat_proj(torch.cat([answer_feat, agree.unsqueeze(-1), sim], dim=-1)))
        a = (a + self.model_embedding) * r
        return self._heads(h, a, rf, with_logvar=True)

    def query_hidden(self, query_emb: Tensor, task: Tensor | None, query_feat: Tensor | None) -> Tensor:
        """``h = MLP([q?, t, x, n])`` [B, H]: the query branch."""
        return self.query_mlp(self.query_inputs(query_emb, task, query_feat))

    def _heads(self, h: Tensor, a: Tensor, rf: Tensor, with_logvar: bool) -> tuple[Tensor, Tensor | None]:
        """The joint MLP and the heads from ``h`` [B, H], the masked answer terms ``a`` [B, M, H] and ``rf``
        (ran as 0/1) [B, M]; ``with_logvar=False`` skips the variance head (``logvar`` None)."""
        ctx = a.sum(1) / rf.sum(1, keepdim=True).clamp_min(1.0)
        z = h + self.joint_mlp(torch.cat([h, ctx, rf], dim=-1))
        logit = self.mean_head(z) + rf * (a * self.mean_self).sum(-1)
        if not with_logvar:
            return logit, None
        logvar = self.logvar_head(z) + rf * (a * self.logvar_self).sum(-1)
        return logit, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def forward_ran_sets(self, query_hidden: Tensor, ran: Tensor, prepared: dict[str, Tensor], answer_feat: Tensor
                         ) -> Tensor:
        """``logit`` [S, M] of ONE query under S ran-masks ``ran`` [S, M], given its query branch
        ``query_hidden`` [1, H] (:meth:`query_hidden`), its :meth:`prepare_answers` [1, ...] and the
        answer features under each mask ``answer_feat`` [S, M, K].

        The same function as :meth:`forward_prepared` on the query repeated S times, computed with less
        work: the query branch is given (computed once per query, e.g. for a whole split at once), and
        the answer branch runs on run cells only (an unrun cell's answer term is multiplied by 0
        there). Equal up to float rounding (the products have other shapes), so it serves the
        residual tables, not the estimates decisions are made on.
        """
        ran = ran.bool()
        s = ran.shape[0]
        dtype = query_hidden.dtype
        rf = ran.to(dtype)
        h = query_hidden.expand(s, -1)
        sim, agree = masked_agreement(prepared["sim"].expand(s, -1, -1), ran, dtype)
        cells = ran.nonzero(as_tuple=True)  # (mask, model) of every run cell
        feat = encode_confidence(answer_feat[cells].to(dtype), self.config.confidence_encoding)
        x = torch.cat([feat, agree[cells].unsqueeze(-1), sim[cells]], dim=-1)
        a_cells = self.answer_mlp(prepared["proj"][0, cells[1]] + self.answer_feat_proj(x)) + self.model_embedding[cells[1]]
        a = a_cells.new_zeros(s, ran.shape[1], a_cells.shape[-1])
        a[cells] = a_cells
        return self._heads(h, a, rf, with_logvar=False)[0]
