"""The quality-estimation network (a plain ``nn.Module``; training logic lives in ``module.py``).

One network serves ex-ante and post-hoc estimation:

    inputs  query embedding q [B, D] (mean-pooled encoder output), task one-hot t [B, T],
            ran [B, M] (bool), answer embeddings A [B, M, D], answer features F [B, M, K]
    masking A, F ← where(ran, A, 0), where(ran, F, 0)     (first operation: no leakage, NaN-safe)
    query   h = MLP([q, t])                                               [B, H]
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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

LOGVAR_MIN, LOGVAR_MAX = -14.0, 2.0


@dataclass
class NetworkConfig:
    num_models: int  # M, columns in cost order
    embed_dim: int  # D, encoder hidden size (queries and answers)
    num_tasks: int = 0  # T, size of the task one-hot (0: no task input)
    num_answer_features: int | None = None  # K; None -> 4 + num_models (what features.compose_features gives)
    hidden: int = 128  # H
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.num_answer_features is None:
            self.num_answer_features = 4 + int(self.num_models)

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
        self.query_mlp = _mlp(c.embed_dim + c.num_tasks, c.hidden, c.dropout)
        self.answer_proj = nn.Linear(c.embed_dim, c.hidden)
        self.answer_feat_proj = nn.Linear(c.num_answer_features + 1 + c.num_models, c.hidden, bias=False)
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
    ) -> tuple[Tensor, Tensor]:
        """Returns ``(logit [B, M], logvar [B, M])``; see the module docstring for the formula."""
        r = ran.bool().unsqueeze(-1)
        answer_emb = torch.where(r, answer_emb, torch.zeros((), dtype=answer_emb.dtype))
        return self.forward_prepared(query_emb, ran, self.prepare_answers(answer_emb), answer_feat, task)

    def forward_prepared(
        self,
        query_emb: Tensor,
        ran: Tensor,
        prepared: dict[str, Tensor],
        answer_feat: Tensor,
        task: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`forward` given :meth:`prepare_answers` output; unrun cells are masked here too."""
        ran = ran.bool()
        r = ran.unsqueeze(-1)
        rf = ran.to(query_emb.dtype)
        zero = torch.zeros((), dtype=query_emb.dtype)
        proj = torch.where(r, prepared["proj"], self.answer_proj.bias.to(query_emb.dtype))
        answer_feat = torch.where(r, answer_feat, zero)
        eye = torch.eye(rf.shape[1], dtype=rf.dtype, device=rf.device)
        pair = rf.unsqueeze(2) * rf.unsqueeze(1) * (1 - eye)
        sim = torch.where(pair.bool(), prepared["sim"], zero)
        agree = sim.sum(-1) / pair.sum(-1).clamp_min(1.0)  # [B, M]

        if self.config.num_tasks:
            if task is None:
                task = query_emb.new_zeros(query_emb.shape[0], self.config.num_tasks)
            h = self.query_mlp(torch.cat([query_emb, task.to(query_emb.dtype)], dim=-1))
        else:
            h = self.query_mlp(query_emb)

        a = self.answer_mlp(proj + self.answer_feat_proj(torch.cat([answer_feat, agree.unsqueeze(-1), sim], dim=-1)))
        a = (a + self.model_embedding) * r
        ctx = a.sum(1) / rf.sum(1, keepdim=True).clamp_min(1.0)
        z = h + self.joint_mlp(torch.cat([h, ctx, rf], dim=-1))

        logit = self.mean_head(z) + rf * (a * self.mean_self).sum(-1)
        logvar = self.logvar_head(z) + rf * (a * self.logvar_self).sum(-1)
        return logit, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
