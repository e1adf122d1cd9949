"""The DSpark / DFlash parallel drafter: fused target context, KV-injected Qwen3 layers, sequential heads.

Legend: B batch, T tokens, L feature layers, H hidden size, V vocab, A anchors (blocks) per sequence,
K block size (predicted tokens per block), S block length (K, or K + 1 in the DFlash layout), R Markov rank,
N supervised slots (at decode time: the new context rows of all rows, packed).

Block layouts (anchor at position p, both predict the K tokens at p+1..p+K):
- DSpark (default): input ``[anchor, mask x (K-1)]`` at positions p..p+K-1; slot j predicts token p+j+1
  (the anchor slot itself predicts p+1).
- DFlash (``dflash_layout=True``): input ``[anchor, mask x K]`` at positions p..p+K; the anchor slot's output
  is unused and mask slot j (1..K), at position p+j, predicts the token at p+j.

Tensor names (the deepspec export layout, DESIGN section 8): ``fc``, ``hidden_norm``, ``layers.{i}.*``,
``norm``, ``markov_head.*``, ``confidence_head.proj``, and the frozen ``embed_tokens.weight`` and
``lm_head.weight``. The frozen two are non-persistent buffers: training checkpoints (``state_dict()``) hold
only what is trained; ``full_state_dict()`` and the exporter add them back. The exported ``config.json`` is
assembled by ``dspark.export.deepspec`` from the drafter's attributes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dspark.config import DrafterConfig
from dspark.drafters.anchors import block_labels, position_weights, sample_anchors
from dspark.drafters.base import (
    Drafter,
    LossOutput,
    Proposal,
    check_training_batch,
)
from dspark.drafters.common import (
    DraftDecoderLayer,
    RMSNorm,
    RotaryEmbedding,
    config_get,
    gemma4_global_geometry,
    layer_variant,
    rope_theta_from_config,
    softcap,
)
from dspark.drafters.dspark.heads import ConfidenceHead, MarkovHead
from dspark.drafters.dspark.loss import chunked_vocab_loss, default_chunk_rows
from dspark.drafters.parts import (
    FrozenWeight,
    PrefixCache,
    check_layer_ids,
    check_proposal_rows,
    check_target_matrix,
    copy_target_layer,
    draft_slots,
    num_target_layers,
)

ALGORITHMS = ("dspark", "dflash")


def resolve_mask_token_id(mask_token_id: int, vocab_size: int) -> int:
    """``-1`` means ``vocab_size - 1``: deterministic and, in the usual BPE vocabularies (SmolLM2, Qwen3), a
    rare merge or reserved id rather than a chat special token. Its frozen embedding only marks the slots to
    fill, so any fixed id works as long as training and decoding agree (it is recorded in the export)."""
    if mask_token_id == -1:
        return vocab_size - 1
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"drafter.mask_token_id {mask_token_id} is outside the vocabulary [0, {vocab_size}); "
                         f"use -1 for the default ({vocab_size - 1})")
    return mask_token_id


class DSparkDrafter(Drafter):
    """DSpark (``algorithm="dspark"``) or DFlash (``algorithm="dflash"``: CE only, no sequential heads)."""

    def __init__(self, cfg: DrafterConfig, target_config, layer_ids: list[int], embed_weight: torch.Tensor,
                 lm_head_weight: torch.Tensor):
        super().__init__()
        if cfg.algorithm not in ALGORITHMS:
            raise ValueError(f"drafter.algorithm {cfg.algorithm!r} is not a parallel drafter; "
                             f"expected dspark or dflash")
        self.algorithm = cfg.algorithm
        self.cfg = cfg
        H = config_get(target_config, "hidden_size")
        V = config_get(target_config, "vocab_size")
        check_target_matrix("embedding", embed_weight, V, H)
        check_target_matrix("LM head", lm_head_weight, V, H)
        self.num_target_layers = num_target_layers(target_config)
        self.layer_ids = check_layer_ids(layer_ids, self.num_target_layers)
        num_heads = config_get(target_config, "num_attention_heads")
        num_kv_heads = config_get(target_config, "num_key_value_heads") or num_heads
        head_dim = config_get(target_config, "head_dim") or H // num_heads
        eps = config_get(target_config, "rms_norm_eps", 1e-6)
        # Gemma4 targets: Gemma4 layers with the global attention geometry, the embedding scaled by sqrt(H), the
        # final-logit softcap on draft and target logits (DESIGN 8.2).
        self.variant = variant = layer_variant(target_config)
        self.embed_scale = H ** 0.5 if variant.gemma4 else None
        rope_theta = None
        if variant.gemma4:
            if config_get(target_config, "use_double_wide_mlp") and config_get(target_config, "num_kv_shared_layers"):
                raise ValueError("a Gemma4 target with use_double_wide_mlp and num_kv_shared_layers > 0 (its last "
                                 "draft layers would need double-wide MLPs) is not supported by the drafter yet")
            head_dim, num_kv_heads = gemma4_global_geometry(target_config)
            rope_theta = float(config_get(target_config, "rope_parameters")["full_attention"]["rope_theta"])
        self.intermediate_size = cfg.intermediate_size or config_get(target_config, "intermediate_size")
        self.hidden_size, self.vocab_size, self.block_size = H, V, cfg.block_size
        self.mask_token_id = resolve_mask_token_id(cfg.mask_token_id, V)
        self.dflash_layout = cfg.dflash_layout
        # The target's config (HF object or an exported drafter config) and the draft layers' attention geometry,
        # as built: the exporters describe the draft layers from them.
        self.target_config = target_config
        self.head_dim, self.num_kv_heads, self.rms_norm_eps = head_dim, num_kv_heads, eps
        self.initializer_range = config_get(target_config, "initializer_range", 0.02) or 0.02

        L = len(self.layer_ids)
        self.fc = nn.Linear(L * H, H, bias=False)
        self.hidden_norm = RMSNorm(H, eps, gemma=variant.gemma4)
        self.layers = nn.ModuleList(
            DraftDecoderLayer(H, self.intermediate_size, num_heads, num_kv_heads, head_dim, eps, variant)
            for _ in range(cfg.num_layers)
        )
        self.norm = RMSNorm(H, eps, gemma=variant.gemma4)
        self.rotary = RotaryEmbedding(head_dim, rope_theta or rope_theta_from_config(target_config),
                                      variant.rotary_fraction)
        self.embed_tokens = FrozenWeight(embed_weight)
        self.lm_head = FrozenWeight(lm_head_weight)
        self._prefix_cache = PrefixCache()

        if cfg.algorithm == "dflash":  # CE only: DFlash has no sequential heads (it reads no drafter.dspark)
            self.markov_rank, self.markov_head = 0, None
        else:
            heads = cfg.dspark
            self.markov_rank = rank = heads.markov_rank
            self.markov_head = MarkovHead(heads.markov_head_type, V, rank, H) if rank > 0 else None
            if heads.enable_confidence_head:
                self.confidence_head = ConfidenceHead(H, rank, cfg.block_size)
        self.loss_chunk_rows = default_chunk_rows(V)
        self._init_weights()

    def _init_weights(self) -> None:
        # HF-style init; the Markov W2 starts at zero so an untrained head adds no bias to the target's LM head.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=self.initializer_range)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=self.initializer_range)
        if self.markov_head is not None:
            nn.init.zeros_(self.markov_head.markov_w2.weight)

    # -- backbone --------------------------------------------------------------------------------------------

    @property
    def block_len(self) -> int:
        return self.block_size + int(self.dflash_layout)

    def fuse_context(self, features_BTLH: torch.Tensor) -> torch.Tensor:
        """``hidden_norm(fc([H(l1); ...; H(lm)]))`` -> ``[B, T, H]``."""
        features_BTLH = features_BTLH.to(self.fc.weight.dtype)
        B, T, L, H = features_BTLH.shape
        if (L, H) != (len(self.layer_ids), self.hidden_size):
            raise ValueError(f"features have {L} layers x hidden {H}; the drafter expects "
                             f"{len(self.layer_ids)} layers (ids {self.layer_ids}) x hidden {self.hidden_size}")
        return self.hidden_norm(self.fc(features_BTLH.reshape(B, T, L * H)))

    def block_hidden(self, ctx_BTH: torch.Tensor, anchor_ids_BA: torch.Tensor, anchor_pos_BA: torch.Tensor
                     ) -> torch.Tensor:
        """Final-normed hidden states of the K prediction slots of every block -> ``[B, A, K, H]``."""
        B, A = anchor_ids_BA.shape
        S = self.block_len
        ids_BAS = torch.full((B, A, S), self.mask_token_id, dtype=torch.long, device=anchor_ids_BA.device)
        ids_BAS[..., 0] = anchor_ids_BA
        x_BASH = F.embedding(ids_BAS, self.embed_tokens.weight)
        if self.embed_scale is not None:  # Gemma4: x sqrt(H), the scale rounded to the weight dtype first
            x_BASH = x_BASH * torch.tensor(self.embed_scale).to(x_BASH.dtype)
        x_BASH = x_BASH.to(self.fc.weight.dtype)
        pos_BAS = anchor_pos_BA.unsqueeze(-1) + torch.arange(S, device=anchor_pos_BA.device)
        rope_block = self.rotary.cos_sin(pos_BAS, x_BASH.dtype)
        rope_ctx = self.rotary.cos_sin(torch.arange(ctx_BTH.shape[1], device=ctx_BTH.device), x_BASH.dtype)
        for layer in self.layers:
            x_BASH = layer(x_BASH, ctx_BTH, anchor_pos_BA, rope_block, rope_ctx)
        h_BASH = self.norm(x_BASH)
        return h_BASH[..., 1:, :] if self.dflash_layout else h_BASH

    def _heads(self, h_BAKH: torch.Tensor, prev_BAK: torch.Tensor):
        """Teacher-forced Markov features ``u [B, A, K, R]`` and confidence logits ``[B, A, K]`` (or None)."""
        u_BAKR = e_BAKR = conf_BAK = None
        if self.markov_head is not None:
            u_BAKR, e_BAKR = self.markov_head.teacher_forced(h_BAKH, prev_BAK)
        if self.confidence_head is not None:
            conf_BAK = self.confidence_head(h_BAKH, e_BAKR)
        return u_BAKR, conf_BAK

    def teacher_forced_logits(self, batch: dict[str, torch.Tensor], anchor_pos_BA: torch.Tensor) -> torch.Tensor:
        """Draft logits ``[B, A, K, V]`` (fp32) of the blocks at ``anchor_pos_BA``, previous tokens = ground truth.

        The exact computation ``forward_loss`` trains, materialised for tests and debugging.
        """
        ids_BT = batch["input_ids_BT"]
        everything_BT = torch.ones_like(ids_BT, dtype=torch.bool)
        all_valid_BA = torch.ones_like(anchor_pos_BA, dtype=torch.bool)
        labels_BAK, _ = block_labels(ids_BT, everything_BT, anchor_pos_BA, all_valid_BA, self.block_size)
        anchor_ids_BA = ids_BT.gather(1, anchor_pos_BA)
        h_BAKH = self.block_hidden(self.fuse_context(batch["features_BTLH"]), anchor_ids_BA, anchor_pos_BA)
        prev_BAK = torch.cat([anchor_ids_BA.unsqueeze(-1), labels_BAK[..., :-1]], dim=-1)
        u_BAKR, _ = self._heads(h_BAKH, prev_BAK)
        logits = softcap(h_BAKH.float() @ self.lm_head.weight.float().T, self.variant.softcap)
        if u_BAKR is not None:
            logits = logits + self.markov_head.markov_w2(u_BAKR).float()
        return logits

    # Where the target's decoder layers live in its checkpoint (causal LMs; multimodal Gemma4).
    TARGET_LAYER_PREFIXES = ("model.layers.", "model.language_model.layers.")
    # The parts a copied draft layer must get from the target (the rest, e.g. q/k norms a Llama target lacks,
    # keep their initialisation).
    REQUIRED_COPIES = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                       "self_attn.o_proj.weight", "mlp.down_proj.weight")

    def target_layers_to_copy(self) -> list[int]:
        """The target layer each draft layer starts from: the deepest feature layers (``layer_ids``' last
        ``num_layers``, the deepest one repeated when there are more draft layers than ids)."""
        ids, n = self.layer_ids, len(self.layers)
        start = max(0, len(ids) - n)
        return [ids[min(start + s, len(ids) - 1)] for s in range(n)]

    @torch.no_grad()
    def init_from_target(self, model_dir) -> list[str]:
        """Copy each draft layer's attention, MLP and norms from the target's own decoder layer
        (``target_layers_to_copy``) in the checkpoint at ``model_dir``, read through ``WeightIndex`` (sharded,
        dequantising). Parameters the target layer lacks (Qwen3's q/k norms on a Llama target) keep their
        initialisation; the projections must all be there with the draft's shapes. Returns the names copied."""
        from dspark.targets.weights import WeightIndex

        index = WeightIndex(model_dir)
        copied = []
        for s, (layer, source_layer) in enumerate(zip(self.layers, self.target_layers_to_copy())):
            prefix = next((p + f"{source_layer}." for p in self.TARGET_LAYER_PREFIXES
                           if p + f"{source_layer}.self_attn.q_proj.weight" in index), None)
            if prefix is None:
                raise ValueError(f"{model_dir} has no decoder layer {source_layer} (looked for "
                                 f"{' or '.join(p + str(source_layer) for p in self.TARGET_LAYER_PREFIXES)}.*) to "
                                 f"initialise draft layer {s} from")
            copied += [f"layers.{s}.{name}" for name in copy_target_layer(
                layer, index, prefix, f"draft layer {s}", optional=lambda name: name not in self.REQUIRED_COPIES,
                hint=" (drafter.intermediate_size and the head layout must be the target's to copy its layers)")]
        return copied

    # -- training --------------------------------------------------------------------------------------------

    def forward_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> LossOutput:
        """Sample anchors, run every block at once, and return the weighted loss sums (DESIGN section 4)."""
        check_training_batch(batch)
        ids_BT, mask_BT = batch["input_ids_BT"], batch["loss_mask_BT"].bool()
        K = self.block_size
        anchor_pos_BA, anchor_valid_BA = sample_anchors(mask_BT, self.cfg.num_anchors, generator)
        labels_BAK, valid_BAK = block_labels(ids_BT, mask_BT, anchor_pos_BA, anchor_valid_BA, K)
        anchor_ids_BA = ids_BT.gather(1, anchor_pos_BA)

        ctx_BTH = self.fuse_context(batch["features_BTLH"])
        h_BAKH = self.block_hidden(ctx_BTH, anchor_ids_BA, anchor_pos_BA)
        prev_BAK = torch.cat([anchor_ids_BA.unsqueeze(-1), labels_BAK[..., :-1]], dim=-1)
        u_BAKR, conf_BAK = self._heads(h_BAKH, prev_BAK)

        # Keep only the valid slots: N rows, each with its target position a + k (predicting token a + k + 1).
        b_N, a_N, k_N = valid_BAK.nonzero(as_tuple=True)
        final_NH = batch["final_BTH"][b_N, anchor_pos_BA[b_N, a_N] + k_N]
        w_N = position_weights(K, self.cfg.loss_decay, device=ids_BT.device)[k_N]
        dspark = self.algorithm == "dspark"
        coef_ce_N = w_N * (self.cfg.dspark.ce_weight if dspark else 1.0)
        coef_l1_N = w_N * self.cfg.dspark.l1_weight if dspark else torch.zeros_like(w_N)
        loss_args = dict(h_NH=h_BAKH[b_N, a_N, k_N], lm_head_VH=self.lm_head.weight, final_NH=final_NH,
                         labels_N=labels_BAK[b_N, a_N, k_N], coef_ce_N=coef_ce_N, coef_l1_N=coef_l1_N,
                         chunk_rows=self.loss_chunk_rows, softcap=self.variant.softcap)
        # W2 enters the fused loss as a tensor, outside markov_w2's own forward (see ``external_parameters``).
        u_NR = u_BAKR[b_N, a_N, k_N] if u_BAKR is not None else None
        w2_VR = self.markov_head.markov_w2.weight if u_BAKR is not None else None
        numerator, ce_N, l1_N = chunked_vocab_loss(u_NR=u_NR, w2_VR=w2_VR, **loss_args)
        terms = {"ce": (w_N * ce_N).sum()}
        if dspark:
            terms["l1"] = (w_N * l1_N).sum()
        if conf_BAK is not None:
            # Soft label = analytic acceptance probability 1 - TV(p_draft, p_target), detached.
            label_N = (1.0 - 0.5 * l1_N).clamp(0.0, 1.0)
            bce_N = F.binary_cross_entropy_with_logits(conf_BAK[b_N, a_N, k_N].float(), label_N, reduction="none")
            numerator = numerator + self.cfg.dspark.bce_weight * (w_N * bce_N).sum()
            terms["bce"] = (w_N * bce_N).sum().detach()
        accept_N = 1.0 - 0.5 * l1_N
        return LossOutput(
            numerator=numerator,
            weight_sum=w_N.sum().detach(),
            terms=terms,
            accept_sum_K=torch.zeros(K, device=ids_BT.device).index_add_(0, k_N, accept_N),
            count_K=torch.bincount(k_N, minlength=K).float(),
            num_tokens=int(k_N.numel()),
        )

    # -- decoding --------------------------------------------------------------------------------------------

    def _fuse_contexts_incremental(self, contexts: list[torch.Tensor]) -> list[torch.Tensor]:
        """``fuse_context`` of every row's context ``[T_b, L, H]`` -> ``[T_b, H]`` each, for decoding.

        Each round a row's context extends its previous one by the tokens accepted since, so only rows past the
        longest prefix it shares with a context fused by the previous call are fused (the ``fc`` matmul over the
        whole context was ~55% of a proposal at SmolLM2 size), all rows' new parts in one matmul. The cache holds
        the previous call's rows (one entry per row) and is keyed on the weights' versions so training in between
        invalidates it; ``reset_context_cache`` empties it.
        """
        version = (self.fc.weight._version, self.hidden_norm.weight._version, self.fc.weight.data_ptr())
        reused = [self._prefix_cache.longest_prefix(version, (context_TLH,), context_TLH.shape[0])
                  for context_TLH in contexts]
        tails = [context_TLH[n:] for context_TLH, (n, _) in zip(contexts, reused)]
        fused_NH = self.fuse_context(torch.cat(tails).unsqueeze(0))[0]  # every row's new part, packed
        fused = []
        for (n, prev_fused_TH), new_NH in zip(reused, fused_NH.split([len(t) for t in tails])):
            fused.append(torch.cat([prev_fused_TH[:n], new_NH]) if n else new_NH)
        self._prefix_cache.store(version, [((c,), f) for c, f in zip(contexts, fused)])
        return fused

    def reset_context_cache(self) -> None:
        self._prefix_cache = PrefixCache()

    @property
    def cuts_drafting(self) -> bool:
        """Drafting can stop early on the confidences (``draft_slots``) when there is a confidence head."""
        return self.confidence_head is not None

    @torch.no_grad()
    def propose(self, context_TLH: torch.Tensor, anchor_id: int, *, temperature: float,
                generator: torch.Generator | None = None, context_ids_T: torch.Tensor | None = None) -> Proposal:
        """Draft K tokens after ``anchor_id`` (at position T), sampling the sequential head left to right: the
        batch of one of ``propose_batch`` (``context_ids_T`` is not needed and ignored)."""
        return self.propose_batch([context_TLH], [anchor_id], temperature=temperature, generators=[generator])[0]

    @torch.no_grad()
    def propose_batch(self, contexts: list[torch.Tensor], anchor_ids: list[int], *, temperature: float,
                      generators: list[torch.Generator | None], context_ids: list[torch.Tensor] | None = None,
                      stop_drafting=None) -> list[Proposal]:
        """Draft K tokens after each row's anchor in one backbone forward (see ``Drafter.propose_batch``).

        Contexts of different lengths are right-padded to the longest: the block attention already hides context
        positions at or after each row's anchor (``DraftAttention``), which covers the padding. The sequential
        heads then run slot by slot over all rows, each row drawing from its own generator (``draft_slots``, which
        also stops early when ``stop_drafting`` says so).
        """
        check_proposal_rows(contexts, anchor_ids, generators, temperature)
        device = self.fc.weight.device
        B = len(contexts)
        fused = self._fuse_contexts_incremental([c.to(device) for c in contexts])
        lengths = [f.shape[0] for f in fused]
        ctx_BTH = fused[0].new_zeros((B, max(lengths), self.hidden_size))
        for b, fused_TH in enumerate(fused):
            ctx_BTH[b, : lengths[b]] = fused_TH
        anchors_B = torch.tensor([int(a) for a in anchor_ids], device=device)
        pos_B1 = torch.tensor(lengths, device=device).unsqueeze(1)
        h_BKH = self.block_hidden(ctx_BTH, anchors_B.unsqueeze(1), pos_B1)[:, 0]
        state = None

        def slot(k: int, prev_B: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
            nonlocal state
            u_BR = e_BR = None
            if self.markov_head is not None:
                u_BR, e_BR, state = self.markov_head.step(h_BKH[:, k], prev_B, state)
            conf_B = (self.confidence_head.probability(self.confidence_head(h_BKH[:, k], e_BR), k)
                      if self.confidence_head is not None else None)
            return conf_B, u_BR

        return draft_slots(
            anchors_B, block_size=self.block_size, vocab_size=self.lm_head.weight.shape[0],
            # The Markov bias is added after the softcap, as in training.
            base_logits=lambda: softcap(h_BKH.float() @ self.lm_head.weight.float().T, self.variant.softcap),
            slot=slot, bias=self.markov_head.markov_w2 if self.markov_head is not None else None,
            temperature=temperature, generators=generators, stop_drafting=stop_drafting)

    def external_parameters(self) -> list[nn.Parameter]:
        """W2 of the Markov head: ``forward_loss`` hands it to the fused vocabulary loss as a tensor."""
        return [self.markov_head.markov_w2.weight] if self.markov_head is not None else []

    # -- export ----------------------------------------------------------------------------------------------

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Trained tensors plus the frozen ``embed_tokens.weight`` and ``lm_head.weight`` (deepspec names)."""
        state = dict(self.state_dict())
        state["embed_tokens.weight"] = self.embed_tokens.weight
        state["lm_head.weight"] = self.lm_head.weight
        return state
