"""The release's action expert network: ``GCDenoiser`` around ``DiffusionTransformer``.

S-VAM-Code ``policy_models/edm_diffusion/score_wrappers.py`` (``GCDenoiser``),
``policy_models/module/diffusion_decoder.py`` (``DiffusionTransformer``, ``SinusoidalPosEmb``) and
``policy_models/module/transformers/transformer_blocks.py``, with the release's parameter names
(``inner_model.*``; prefix ``model.`` inside a policy checkpoint), so a released state dict loads
with ``strict=True``:

- sigma embedding: sinusoidal features of ln(sigma)/4 (sines first) -> Linear -> Mish -> Linear;
- context = [``lang_emb``(goal), ``tok_emb``(each aggregator latent)], no positional embedding
  (``pos_emb``, ``goal_emb`` and ``proprio_emb`` exist in the release's state dict but are never used);
- encoder: pre-LN blocks (LayerNorms without bias), final LayerNorm;
- decoder on ``action_emb``(c_in x): AdaLN-zero blocks conditioned on the sigma embedding: gated
  causal self-attention, cross-attention to the encoder output (pre-norm ``ln3``, no gate), gated MLP;
  final LayerNorm and ``action_pred``.

Three release quirks are named options (:class:`DenoiserConfig`): the cross-attention mask
(``top-left-causal``: action i sees context tokens 0..i, torch SDPA ``is_causal`` with more keys than
queries; ``none``: every action sees the whole context), the modulation form (``scale-shift``:
x * scale + shift; ``one-plus-scale``: x * (1 + scale) + shift, the DiT form) and proprioception
(``unused``; ``token``: the robot state embedded by ``proprio_emb`` joins the context after the goal).
Without positional embeddings (``pos_emb`` is never read) the top-left causal cross-attention mask
is what tells the chunk positions apart; ``action_positions = "pos_emb"`` adds positions to the
action tokens, which a full cross-attention (``none``) needs.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from foresight.schemas.base import StrictModel
from foresight.trainers.models.decoupler import ModelSize
from foresight.trainers.models.objectives import c_noise

CrossAttnMask = Literal["top-left-causal", "none"]
Modulation = Literal["scale-shift", "one-plus-scale"]
Proprio = Literal["unused", "token"]
ActionPositions = Literal["unused", "pos_emb"]


class DenoiserConfig(StrictModel):
    """Architecture of the release's ``DiffusionTransformer`` (``GCDenoiser`` hard-codes 384 / 4+4 / 8)."""

    action_dim: int = Field(7, description="Action dimensions.")
    chunk: int = Field(10, description="Actions per predicted chunk (action_seq_len).")
    obs_dim: int = Field(384, description="Width of the aggregator latents (state tokens).")
    cond_tokens: int = Field(224, description="Aggregator latents per observation (n_obs_token).")
    goal_dim: int = Field(512, description="Width of the goal (CLIP text_embeds: 512).")
    proprio_dim: int = Field(8, description="Width of proprioception (its embedding is unused by the release).")
    embed_dim: int = Field(384, description="Transformer width.")
    n_enc_layers: int = Field(4, description="Encoder layers over the context.")
    n_dec_layers: int = Field(4, description="Decoder layers over the action tokens.")
    n_heads: int = Field(8, description="Attention heads.")
    goal_seq_len: int = Field(1, description="Goal tokens.")
    attn_pdrop: float = Field(0.3, description="Attention-weight dropout.")
    resid_pdrop: float = Field(0.1, description="Dropout after each attention projection.")
    mlp_pdrop: float = Field(0.05, description="Dropout after each MLP.")
    embed_pdrop: float = Field(0.0, description="Dropout of the context embedding.")
    cross_attn_mask: CrossAttnMask = Field("top-left-causal", description="Decoder cross-attention mask "
                                           "(release: top-left-causal; none: the whole context).")
    modulation: Modulation = Field("scale-shift", description="AdaLN modulation (release: x*scale+shift; "
                                   "one-plus-scale: x*(1+scale)+shift).")
    proprio: Proprio = Field("unused", description="Proprioception (release: unused, the CALVIN batch has no "
                             "'state_obs'; token: proprio_emb(state) as a context token after the goal).")
    action_positions: ActionPositions = Field(
        "unused", description="Positions of the action tokens (release: none, pos_emb is never read, so only the "
                              "causal masks tell chunk positions apart; pos_emb: add its last `chunk` rows).")

    @classmethod
    def preset(cls, size: ModelSize, **dims) -> "DenoiserConfig":
        """The release's architecture (``full``) or a small one for CPU tests (``tiny``)."""
        if size == "full":
            return cls(**dims)
        return cls(**({"embed_dim": 32, "n_enc_layers": 1, "n_dec_layers": 1, "n_heads": 2} | dims))

    @classmethod
    def from_release_kwargs(cls, kwargs: dict) -> "DenoiserConfig":
        """The config of the release's ``DiffusionTransformer(**kwargs)``.

        Keys without effect on the computation (``device``, ``goal_conditioned``, ``use_mlp_goal``,
        ``obs_seq_len``, ``goal_drop``, ``linear_output``) are ignored; any other unknown key is an error.
        """
        names = {"action_dim": "action_dim", "action_seq_len": "chunk", "obs_dim": "obs_dim",
                 "n_obs_token": "cond_tokens", "goal_dim": "goal_dim", "proprio_dim": "proprio_dim",
                 "embed_dim": "embed_dim", "n_enc_layers": "n_enc_layers", "n_dec_layers": "n_dec_layers",
                 "n_heads": "n_heads", "goal_seq_len": "goal_seq_len", "attn_pdrop": "attn_pdrop",
                 "resid_pdrop": "resid_pdrop", "mlp_pdrop": "mlp_pdrop", "embed_pdrob": "embed_pdrop"}
        ignored = {"device", "goal_conditioned", "use_mlp_goal", "obs_seq_len", "goal_drop", "linear_output"}
        unknown = [k for k in kwargs if k not in names and k not in ignored]
        if unknown:
            raise ValueError(f"release denoiser kwargs: unknown key(s) {unknown}")
        return cls(**{names[k]: v for k, v in kwargs.items() if k in names})


class SinusoidalPosEmb(nn.Module):
    """[sin(x f), cos(x f)] with f_j = exp(-j ln(10000) / (half - 1)), sines first."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x_B: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=x_B.device) * -(math.log(10000) / (half - 1)))
        angles_BF = x_B[:, None] * freqs[None]
        return torch.cat([angles_BF.sin(), angles_BF.cos()], dim=-1)


class ReleaseAttention(nn.Module):
    """``query``/``key``/``value`` (with bias), ``c_proj`` (no bias); optionally causal, top-left aligned."""

    def __init__(self, cfg: DenoiserConfig, causal: bool):
        super().__init__()
        dim = cfg.embed_dim
        self.heads, self.causal = cfg.n_heads, causal
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.c_proj = nn.Linear(dim, dim, bias=False)
        self.attn_pdrop = cfg.attn_pdrop
        self.resid_drop = nn.Dropout(cfg.resid_pdrop)

    def _split(self, x_BND: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x_BND.shape
        return x_BND.view(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)

    def forward(self, x_BND: torch.Tensor, context_BMD: torch.Tensor | None = None) -> torch.Tensor:
        context_BMD = x_BND if context_BMD is None else context_BMD
        q, k, v = self._split(self.query(x_BND)), self._split(self.key(context_BMD)), self._split(self.value(context_BMD))
        drop = self.attn_pdrop if self.training else 0.0
        # SDPA's is_causal aligns the mask top-left: query i sees keys 0..i even when there are more keys.
        out_BHND = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=self.causal)
        return self.resid_drop(self.c_proj(out_BHND.transpose(1, 2).flatten(2)))


class ReleaseMlp(nn.Module):
    """``c_fc`` -> GELU -> ``c_proj`` -> dropout, no biases."""

    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.embed_dim, 4 * cfg.embed_dim, bias=False)
        self.c_proj = nn.Linear(4 * cfg.embed_dim, cfg.embed_dim, bias=False)
        self.dropout = nn.Dropout(cfg.mlp_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Encoder block: x += Attn(LN1(x)); x += MLP(LN2(x)) (LayerNorms without bias)."""

    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.embed_dim, bias=False)
        self.attn = ReleaseAttention(cfg, causal=False)
        self.ln_2 = nn.LayerNorm(cfg.embed_dim, bias=False)
        self.mlp = ReleaseMlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class AdaLNZero(nn.Module):
    """``modulation`` = SiLU -> Linear(E, 6E): shift, scale, gate of the attention and the MLP branch."""

    def __init__(self, dim: int):
        super().__init__()
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, cond_B1E: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.modulation(cond_B1E).chunk(6, dim=-1)


class ConditionedBlock(nn.Module):
    """Decoder block: AdaLN-zero gated causal self-attention, cross-attention (``ln3``), gated MLP."""

    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.embed_dim, bias=False)
        self.attn = ReleaseAttention(cfg, causal=True)
        self.ln3 = nn.LayerNorm(cfg.embed_dim)
        self.cross_att = ReleaseAttention(cfg, causal=cfg.cross_attn_mask == "top-left-causal")
        self.ln_2 = nn.LayerNorm(cfg.embed_dim, bias=False)
        self.mlp = ReleaseMlp(cfg)
        self.adaLN_zero = AdaLNZero(cfg.embed_dim)
        self.one_plus_scale = cfg.modulation == "one-plus-scale"

    def _modulate(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x * (1 + scale) + shift if self.one_plus_scale else x * scale + shift

    def forward(self, x: torch.Tensor, context: torch.Tensor, cond_B1E: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_zero(cond_B1E)
        x = x + gate1 * self.attn(self._modulate(self.ln_1(x), shift1, scale1))
        x = x + self.cross_att(self.ln3(x), context)
        return x + gate2 * self.mlp(self._modulate(self.ln_2(x), shift2, scale2))


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_enc_layers))
        self.ln = nn.LayerNorm(cfg.embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.ln(x)


class TransformerFiLMDecoder(nn.Module):
    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        self.blocks = nn.ModuleList(ConditionedBlock(cfg) for _ in range(cfg.n_dec_layers))
        self.ln = nn.LayerNorm(cfg.embed_dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor, cond_B1E: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, context, cond_B1E)
        return self.ln(x)


def _goal_mlp(in_dim: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


class DiffusionTransformer(nn.Module):
    """F(state tokens, c_in x, goal, sigma): the release's goal-conditioned encoder-decoder."""

    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.tok_emb = nn.Linear(cfg.obs_dim, dim)
        self.lang_emb = _goal_mlp(cfg.goal_dim, dim)
        # Unused by the release's forward pass, kept so its state dicts load strictly.
        self.goal_emb = _goal_mlp(cfg.goal_dim, dim)
        self.proprio_emb = _goal_mlp(cfg.proprio_dim, dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.goal_seq_len + cfg.cond_tokens + cfg.chunk, dim))
        self.drop = nn.Dropout(cfg.embed_pdrop)
        self.sigma_emb = nn.Sequential(SinusoidalPosEmb(dim), nn.Linear(dim, 2 * dim), nn.Mish(),
                                       nn.Linear(2 * dim, dim))
        self.action_emb = nn.Linear(cfg.action_dim, dim)
        self.encoder = TransformerEncoder(cfg)
        self.decoder = TransformerFiLMDecoder(cfg)
        self.action_pred = nn.Linear(dim, cfg.action_dim)
        # Never-read parameters get no gradient: frozen, so DDP does not wait for them and AdamW skips them.
        unused = ([self.goal_emb] + ([] if cfg.action_positions == "pos_emb" else [self.pos_emb])
                  + ([] if cfg.proprio == "token" else [self.proprio_emb]))
        for item in unused:
            item.requires_grad_(False)

    def embed_sigma(self, sigma_B: torch.Tensor) -> torch.Tensor:
        """(B, 1, E) embedding of the noise level, from c_noise = ln(sigma) / 4."""
        return self.sigma_emb(c_noise(sigma_B.float()))[:, None]

    def encode(self, states_BLD: torch.Tensor, goal_B1G: torch.Tensor,
               proprio_BP: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output over [goal token, (proprio token,) state tokens]: (B, 1 (+1) + L, E)."""
        parts = [self.lang_emb(goal_B1G)]
        if proprio_BP is not None:
            parts.append(self.proprio_emb(proprio_BP.float())[:, None])
        context = torch.cat([*parts, self.tok_emb(states_BLD)], dim=1)
        return self.encoder(self.drop(context))

    def decode(self, scaled_BKA: torch.Tensor, sigma_B: torch.Tensor, memory_BME: torch.Tensor) -> torch.Tensor:
        """Decoder output F for c_in-scaled actions at noise level ``sigma_B``."""
        actions_BKE = self.action_emb(scaled_BKA)
        if self.cfg.action_positions == "pos_emb":
            actions_BKE = actions_BKE + self.pos_emb[:, -actions_BKE.shape[1]:]
        x = self.decoder(actions_BKE, memory_BME, self.embed_sigma(sigma_B))
        return self.action_pred(x)


class GCDenoiser(nn.Module):
    """The release's ``GCDenoiser``: ``inner_model`` plus EDM preconditioning (sigma_data ``sigma_data``).

    Policy interface shared with foresight's ``DiffusionPolicy``: :meth:`encode` (once per observation)
    and :meth:`network` (the raw F of one denoising step); the objective does the rest.
    """

    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        self.cfg = cfg
        self.inner_model = DiffusionTransformer(cfg)

    def encode(self, cond_BLD: torch.Tensor, goal: torch.Tensor, proprio_BP: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Memory from aggregator latents (B, L, obs_dim) and the goal (B, G), (B, 1, G) or (B, S, G).

        A goal of S > 1 token states (foresight's text exports) is averaged over its tokens: the
        release takes one pooled CLIP vector (``text_embeds``), which those exports do not hold.
        ``proprio_BP`` is required with ``proprio = "token"`` and refused otherwise.
        """
        if (proprio_BP is not None) != (self.cfg.proprio == "token"):
            raise ValueError(f"denoiser: proprio = {self.cfg.proprio!r} but a state was "
                             f"{'given' if proprio_BP is not None else 'not given'}")
        goal_B1G = goal[:, None] if goal.dim() == 2 else goal.mean(1, keepdim=True)
        return self.inner_model.encode(cond_BLD.float(), goal_B1G.float(), proprio_BP)

    def network(self, scaled_BKA: torch.Tensor, sigma_B: torch.Tensor, memory_BME: torch.Tensor) -> torch.Tensor:
        return self.inner_model.decode(scaled_BKA, sigma_B, memory_BME).float()
