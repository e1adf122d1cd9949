"""DeepSeek-V4's production DSpark drafter: the three ``mtp.*`` stages (MoE + mHC + sliding window) that V4-Flash
and V4-Pro ship, trained by dspark's trainer (``algorithm="dspark_v4"``). The specification is V4_DSPARK.md.

Legend: B batch, T tokens, L feature layers, C mHC streams, H hidden size, V vocab, A anchors per sequence,
K block size (5 in V4), M blocks (B x A flattened), W window (128), D head dim, R Markov rank, N supervised slots.

Forward (one draft round, V4_DSPARK.md section 3):
1. ``main_x = main_norm(main_proj([mean_c f_l1 ; ... ; mean_c f_lL]))`` over the target layers' features ``[T, H]``.
2. Every stage s keeps its context K/V ``RoPE_pos(kv_norm_s(kv_proj_s(main_x)))`` at absolute positions; a block at
   anchor position a sees the W context rows a-W..a-1. main_x enters attention only (never the residual).
3. Block ``[anchor, noise x (K-1)]`` at positions a..a+K-1, embedded and repeated to C streams; slot j predicts the
   token at a+j+1 (dspark's DSpark layout: the anchor slot predicts the next token, as DeepSeek's reference does).
4. The stages run stacked, once each; ``hc_head`` collapses the streams to ``z``, ``U = lm_head(norm(z))``.
5. The vanilla Markov head adds ``W2 W1[prev]``; the confidence head reads ``[z ; W1[prev]]`` (pre-norm z, no bias).

Trained: main_proj/main_norm, the stages, hc_head/norm, the Markov and confidence heads. Frozen: the target's
embedding and LM head (non-persistent buffers, as in ``DSparkDrafter``). The selection bias of every router
(``gate.e_score_correction_bias``, DeepSeek's ``ffn.gate.bias``) is a buffer moved by aux-loss-free balancing
(``update_selection_bias``), not by the optimizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dspark.config import DrafterConfig
from dspark.drafters.anchors import block_labels, position_weights, sample_anchors
from dspark.drafters.base import Drafter, LossOutput, Proposal, check_training_batch
from dspark.drafters.dspark.heads import ConfidenceHead, MarkovHead
from dspark.drafters.dspark.loss import chunked_vocab_loss, default_chunk_rows
from dspark.drafters.dspark.model import resolve_mask_token_id
from dspark.drafters.parts import (
    FrozenWeight,
    check_proposal_rows,
    check_target_matrix,
    copy_target_layer,
    draft_slots,
)
from dspark.drafters.v4.layers import DraftStage, gather_windows, rope_cos_sin, v4_modules

ALGORITHM = "dspark_v4"


def v4_config(target_config):
    """The target's config as a transformers ``DeepseekV4Config``; anything but a DeepSeek-V4 target is a
    ValueError (the draft's attention, mHC and MoE are V4's own)."""
    get = target_config.get if isinstance(target_config, dict) else lambda k, d=None: getattr(target_config, k, d)
    model_type = get("model_type")
    if model_type != "deepseek_v4":
        raise ValueError(f"drafter.algorithm dspark_v4 needs a DeepSeek-V4 target (model_type deepseek_v4), got "
                         f"model_type {model_type!r}; use algorithm dspark for other targets")
    from transformers import DeepseekV4Config

    if isinstance(target_config, DeepseekV4Config):
        return target_config
    data = dict(target_config) if isinstance(target_config, dict) else target_config.to_dict()
    data.pop("model_type", None)
    return DeepseekV4Config(**data)


class DSparkV4Drafter(Drafter):
    """The ``mtp.*`` DSpark draft of DeepSeek-V4 behind the common ``Drafter`` interface."""

    algorithm = ALGORITHM
    # The export layouts that can hold this drafter (dspark.export refuses the others).
    export_formats = ("deepseek-v4-mtp", "deepseek-v4-mtp-fp8")

    def __init__(self, cfg: DrafterConfig, target_config, layer_ids: list[int], embed_weight: torch.Tensor,
                 lm_head_weight: torch.Tensor):
        super().__init__()
        config = v4_config(target_config)
        self.cfg, self.config = cfg, config
        H, V = config.hidden_size, config.vocab_size
        check_target_matrix("embedding", embed_weight, V, H)
        check_target_matrix("LM head", lm_head_weight, V, H)
        self.num_target_layers = config.num_hidden_layers
        ids = list(layer_ids)
        if not ids or any(not 0 <= i < self.num_target_layers for i in ids):
            raise ValueError(f"dspark_v4 target layer ids {ids} must lie in 0..{self.num_target_layers - 1} (the "
                             f"target has {self.num_target_layers} decoder layers)")
        self.layer_ids = ids
        self.hidden_size, self.vocab_size, self.block_size = H, V, cfg.block_size
        self.hc_mult, self.window = config.hc_mult, config.sliding_window
        self.mask_token_id = resolve_mask_token_id(cfg.mask_token_id, V)
        self.markov_rank = rank = cfg.dspark.markov_rank  # >= 1, vanilla: checked by the config (check_drafter)
        m = v4_modules()
        self.main_proj = nn.Linear(len(ids) * H, H, bias=False)
        self.main_norm = m.DeepseekV4RMSNorm(H, eps=config.rms_norm_eps)
        self.stages = nn.ModuleList(DraftStage(config) for _ in range(cfg.num_layers))
        self.hc_head = m.DeepseekV4HyperHead(config)
        self.norm = m.DeepseekV4RMSNorm(H, eps=config.rms_norm_eps)
        self.markov_head = MarkovHead("vanilla", V, rank, H)
        if cfg.dspark.enable_confidence_head:
            self.confidence_head = ConfidenceHead(H, rank, cfg.block_size)
            # DeepSeek's confidence_head.proj has no bias slot [1, H + R] (V4_DSPARK.md section 1).
            self.confidence_head.proj = nn.Linear(H + rank, 1, bias=False)
        self.embed_tokens = FrozenWeight(embed_weight)
        self.lm_head = FrozenWeight(lm_head_weight)
        self.loss_chunk_rows = default_chunk_rows(V)
        self._init_weights(config.initializer_range)

    def _init_weights(self, std: float) -> None:
        """transformers' DeepSeek-V4 init (normal linears, router and experts; zero sinks and HC bases; unit HC
        scales); the Markov W2 starts at zero so an untrained head adds no bias to the target's LM head."""
        m = v4_modules()
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, m.DeepseekV4TopKRouter):
                nn.init.normal_(module.weight, std=std)
                module.e_score_correction_bias.zero_()
            elif isinstance(module, m.DeepseekV4Experts):
                nn.init.normal_(module.gate_up_proj, std=std)
                nn.init.normal_(module.down_proj, std=std)
            elif isinstance(module, m.DeepseekV4HyperConnection):
                nn.init.normal_(module.fn, std=std)
                nn.init.zeros_(module.base)
                nn.init.ones_(module.scale)
            elif isinstance(module, m.DeepseekV4HyperHead):
                nn.init.normal_(module.hc_fn, std=std)
                nn.init.zeros_(module.hc_base)
                nn.init.ones_(module.hc_scale)
        nn.init.zeros_(self.markov_head.markov_w2.weight)

    # -- backbone --------------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.main_proj.weight.dtype

    def fuse_context(self, features_BTLH: torch.Tensor) -> torch.Tensor:
        """``main_x = main_norm(main_proj([f_l1 ; ... ; f_lL]))`` ``[B, T, H]``; each ``f_l`` is the mean of the
        target layer's mHC streams (taken by the backend, ``dspark.targets.common.collapse_streams``)."""
        features_BTLH = features_BTLH.to(self.dtype)
        B, T, L, H = features_BTLH.shape
        if (L, H) != (len(self.layer_ids), self.hidden_size):
            raise ValueError(f"features have {L} layers x hidden {H}; the drafter expects "
                             f"{len(self.layer_ids)} layers (ids {self.layer_ids}) x hidden {self.hidden_size}")
        return self.main_norm(self.main_proj(features_BTLH.reshape(B, T, L * H)))

    def block_streams(self, main_x_BTH: torch.Tensor, offset_B: torch.Tensor, anchor_ids_BA: torch.Tensor,
                      anchor_pos_BA: torch.Tensor) -> torch.Tensor:
        """The last stage's output streams ``[B*A, K, C, H]`` of every block.

        Row t of ``main_x_BTH[b]`` is the context at absolute position ``offset_B[b] + t``; the block of anchor
        ``anchor_pos_BA[b, a]`` (absolute) sees the W rows before it (training: offset 0 and the whole sequence;
        decoding: only the last W rows are kept).
        """
        B, A = anchor_ids_BA.shape
        K, T = self.block_size, main_x_BTH.shape[1]
        device = main_x_BTH.device
        ids_BAK = torch.full((B, A, K), self.mask_token_id, dtype=torch.long, device=device)
        ids_BAK[..., 0] = anchor_ids_BA
        x_MKH = F.embedding(ids_BAK, self.embed_tokens.weight).to(self.dtype).view(B * A, K, -1)
        x_MKCH = x_MKH.unsqueeze(2).expand(-1, -1, self.hc_mult, -1).contiguous()
        pos_MK = (anchor_pos_BA.unsqueeze(-1) + torch.arange(K, device=device)).view(B * A, K)
        cos_sin_block = rope_cos_sin(self.config, pos_MK, self.dtype)
        ctx_pos_BT = offset_B.view(B, 1) + torch.arange(T, device=device)
        cos_sin_ctx = rope_cos_sin(self.config, ctx_pos_BT, self.dtype)
        anchor_row_BA = anchor_pos_BA - offset_B.view(B, 1)
        for stage in self.stages:
            ctx_BTD = stage.self_attn.context_kv(main_x_BTH, cos_sin_ctx)
            ctx_MWD, valid_MW = gather_windows(ctx_BTD, anchor_row_BA, self.window)
            x_MKCH = stage(x_MKCH, ctx_MWD, valid_MW, cos_sin_block)
        return x_MKCH

    def head_states(self, x_MKCH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, norm(z))``: the hc_head output (the confidence head's input) and the LM head's input."""
        z_MKH = self.hc_head(x_MKCH)
        return z_MKH, self.norm(z_MKH)

    def teacher_forced_logits(self, batch: dict[str, torch.Tensor], anchor_pos_BA: torch.Tensor) -> torch.Tensor:
        """Draft logits ``[B, A, K, V]`` (fp32) of the blocks at ``anchor_pos_BA``, previous tokens = ground truth:
        the computation ``forward_loss`` trains, materialised for tests and round-trip checks."""
        ids_BT = batch["input_ids_BT"]
        B, A = anchor_pos_BA.shape
        everything_BT = torch.ones_like(ids_BT, dtype=torch.bool)
        labels_BAK, _ = block_labels(ids_BT, everything_BT, anchor_pos_BA, torch.ones_like(everything_BT[:, :A]),
                                     self.block_size)
        anchor_ids_BA = ids_BT.gather(1, anchor_pos_BA)
        main_x = self.fuse_context(batch["features_BTLH"])
        x = self.block_streams(main_x, torch.zeros(B, dtype=torch.long, device=ids_BT.device), anchor_ids_BA,
                               anchor_pos_BA)
        _, h_MKH = self.head_states(x)
        prev_BAK = torch.cat([anchor_ids_BA.unsqueeze(-1), labels_BAK[..., :-1]], dim=-1)
        e_MKR = self.markov_head.markov_w1(prev_BAK.view(B * A, -1))
        logits = h_MKH.float() @ self.lm_head.weight.float().T + self.markov_head.markov_w2(e_MKR).float()
        return logits.view(B, A, self.block_size, -1)

    @torch.no_grad()
    def init_from_target(self, model_dir) -> list[str]:
        """Copy each stage's attention, mHC, norms and MoE (router and selection bias included) from the target's
        own decoder layer ``layer_ids[s]`` (the last id for stages beyond the list), read through ``WeightIndex``
        (sharded, dequantising, per-expert or fused experts). The draft's window attention has no compressor, so a
        compressed layer's compressor is not read. Returns the names copied."""
        from dspark.targets.weights import WeightIndex

        index = WeightIndex(model_dir)
        copied = []
        for s, stage in enumerate(self.stages):
            prefix = f"model.layers.{self.layer_ids[min(s, len(self.layer_ids) - 1)]}."
            copied += [f"stages.{s}.{name}" for name in copy_target_layer(stage, index, prefix, f"draft stage {s}")]
        return copied

    # -- training --------------------------------------------------------------------------------------------

    def forward_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> LossOutput:
        """DSpark's loss (``drafter.dspark``: ``ce_weight`` CE + ``l1_weight`` L1 + ``bce_weight`` BCE, position
        decay) over sampled blocks; in training mode it then moves the routers' selection biases
        (``update_selection_bias``)."""
        check_training_batch(batch)
        ids_BT, mask_BT = batch["input_ids_BT"], batch["loss_mask_BT"].bool()
        B, K = ids_BT.shape[0], self.block_size
        anchor_pos_BA, anchor_valid_BA = sample_anchors(mask_BT, self.cfg.num_anchors, generator)
        A = anchor_pos_BA.shape[1]
        labels_BAK, valid_BAK = block_labels(ids_BT, mask_BT, anchor_pos_BA, anchor_valid_BA, K)
        anchor_ids_BA = ids_BT.gather(1, anchor_pos_BA)
        main_x = self.fuse_context(batch["features_BTLH"])
        x = self.block_streams(main_x, torch.zeros(B, dtype=torch.long, device=ids_BT.device), anchor_ids_BA,
                               anchor_pos_BA)
        z_BAKH, h_BAKH = (t.view(B, A, K, -1) for t in self.head_states(x))
        prev_BAK = torch.cat([anchor_ids_BA.unsqueeze(-1), labels_BAK[..., :-1]], dim=-1)
        e_BAKR = self.markov_head.markov_w1(prev_BAK)

        b_N, a_N, k_N = valid_BAK.nonzero(as_tuple=True)
        final_NH = batch["final_BTH"][b_N, anchor_pos_BA[b_N, a_N] + k_N]
        w_N = position_weights(K, self.cfg.loss_decay, device=ids_BT.device)[k_N]
        loss_args = dict(h_NH=h_BAKH[b_N, a_N, k_N], lm_head_VH=self.lm_head.weight, final_NH=final_NH,
                         labels_N=labels_BAK[b_N, a_N, k_N], coef_ce_N=w_N * self.cfg.dspark.ce_weight,
                         coef_l1_N=w_N * self.cfg.dspark.l1_weight, chunk_rows=self.loss_chunk_rows)
        # W2 enters the fused loss as a tensor, outside markov_w2's own forward (see ``external_parameters``).
        numerator, ce_N, l1_N = chunked_vocab_loss(u_NR=e_BAKR[b_N, a_N, k_N], w2_VR=self.markov_head.markov_w2.weight,
                                                   **loss_args)
        terms = {"ce": (w_N * ce_N).sum(), "l1": (w_N * l1_N).sum()}
        if self.confidence_head is not None:
            # Soft label = the analytic acceptance 1 - TV(p_draft, p_target), detached.
            label_N = (1.0 - 0.5 * l1_N).clamp(0.0, 1.0)
            conf_N = self.confidence_head(z_BAKH[b_N, a_N, k_N], e_BAKR[b_N, a_N, k_N]).float()
            bce_N = F.binary_cross_entropy_with_logits(conf_N, label_N, reduction="none")
            numerator = numerator + self.cfg.dspark.bce_weight * (w_N * bce_N).sum()
            terms["bce"] = (w_N * bce_N).sum().detach()
        if self.training:
            self.update_selection_bias()
        return LossOutput(numerator=numerator, weight_sum=w_N.sum().detach(), terms=terms,
                          accept_sum_K=torch.zeros(K, device=ids_BT.device).index_add_(0, k_N, 1.0 - 0.5 * l1_N),
                          count_K=torch.bincount(k_N, minlength=K).float(), num_tokens=int(k_N.numel()))

    def external_parameters(self) -> list[nn.Parameter]:
        """W2 of the Markov head: ``forward_loss`` hands it to the fused vocabulary loss as a tensor."""
        return [self.markov_head.markov_w2.weight]

    @torch.no_grad()
    def update_selection_bias(self) -> None:
        """Aux-loss-free balancing (DeepSeek-V3's noaux_tc): every router's selection bias moves by
        ``drafter.v4.moe_bias_update_rate`` towards the experts that got fewer tokens than the mean (sign update)
        over the micro batch just run. ``reduce_expert_counts`` (set by the trainer when there are several data ranks)
        sums the loads over ranks first, so every rank applies the same update and the biases stay equal."""
        rate = self.cfg.v4.moe_bias_update_rate
        for stage in self.stages:
            counts_E = stage.mlp.take_expert_counts()
            if counts_E is None or rate == 0:
                continue
            if self.reduce_expert_counts is not None:
                counts_E = self.reduce_expert_counts(counts_E)
            bias = stage.mlp.gate.e_score_correction_bias
            bias += rate * torch.sign(counts_E.mean() - counts_E).to(bias.dtype)

    # -- decoding --------------------------------------------------------------------------------------------

    @property
    def cuts_drafting(self) -> bool:
        """Drafting can stop early on the confidences (``draft_slots``) when there is a confidence head."""
        return self.confidence_head is not None

    @torch.no_grad()
    def propose(self, context_TLH: torch.Tensor, anchor_id: int, *, temperature: float,
                generator: torch.Generator | None = None, context_ids_T: torch.Tensor | None = None) -> Proposal:
        """The batch of one of ``propose_batch``."""
        return self.propose_batch([context_TLH], [anchor_id], temperature=temperature, generators=[generator])[0]

    @torch.no_grad()
    def propose_batch(self, contexts: list[torch.Tensor], anchor_ids: list[int], *, temperature: float,
                      generators: list[torch.Generator | None], context_ids: list[torch.Tensor] | None = None,
                      stop_drafting=None) -> list[Proposal]:
        """Draft K tokens after each row's anchor (at position ``len(context)``). Only the last W context rows
        enter the window, so a proposal costs the same at any context length; the Markov head then samples slot
        by slot (``prev_0`` = the anchor), each row from its own generator (``draft_slots``, which also stops
        early when ``stop_drafting`` says so)."""
        check_proposal_rows(contexts, anchor_ids, generators, temperature)
        device = self.main_proj.weight.device
        B, W = len(contexts), self.window
        lengths = [c.shape[0] for c in contexts]
        tails = [c[-W:].to(device) for c in contexts]
        kept = [t.shape[0] for t in tails]
        main_x = self.fuse_context(torch.cat(tails).unsqueeze(0))[0].split(kept)
        main_x_BTH = main_x[0].new_zeros((B, max(kept), self.hidden_size))
        for b, rows in enumerate(main_x):
            main_x_BTH[b, : kept[b]] = rows
        offset_B = torch.tensor([n - k for n, k in zip(lengths, kept)], device=device)
        anchors_B = torch.tensor([int(a) for a in anchor_ids], device=device)
        x = self.block_streams(main_x_BTH, offset_B, anchors_B.unsqueeze(1),
                               torch.tensor(lengths, device=device).unsqueeze(1))
        z_BKH, h_BKH = self.head_states(x)

        def slot(k: int, prev_B: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
            e_BR = self.markov_head.markov_w1(prev_B)
            conf_B = (self.confidence_head.probability(self.confidence_head(z_BKH[:, k], e_BR), k)
                      if self.confidence_head is not None else None)
            return conf_B, e_BR

        return draft_slots(anchors_B, block_size=self.block_size, vocab_size=self.lm_head.weight.shape[0],
                           base_logits=lambda: h_BKH.float() @ self.lm_head.weight.float().T, slot=slot,
                           bias=self.markov_head.markov_w2, temperature=temperature, generators=generators,
                           stop_drafting=stop_drafting)
