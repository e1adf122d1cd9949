"""The Eagle3 drafter: fused target features, one decoder layer, training-time test (TTT).

Legend: B batch, T tokens, L feature layers, H hidden size, V target vocab, W draft vocab (V unless pruned),
G key/value heads, D head dim, N supervised rows of one step (or packed new context rows at decode time),
K proposed tokens, S context rows of the longest row drafted together.

Inputs of draft row t at TTT step s = 0 .. ttt_length-1 (row t stands for the target prefix ``x_0 .. x_t``):
- hidden: ``fc([H_l1(t); ...; H_lm(t)])`` at s = 0 (the target features at position t), else the row's own
  output hidden state of step s-1 (pre-norm residual stream);
- token: ``x_{t+1+s}`` (the token after the hidden's prefix; its embedding goes through ``input_layernorm``);
- RoPE position: ``t + s``;
- target: the target's next-token distribution at position ``t+1+s`` (``softmax(lm_head(final[t+1+s]))``,
  i.e. of token ``x_{t+2+s}``); the row is supervised iff ``t+2+s < T`` and ``loss_mask[t+2+s]``.
Attention at step s: row t sees the step-0 keys/values of rows ``u <= t`` and its own keys/values of steps
1..s (see ``layer.ttt_attention``). At decode time the context rows are step 0 with token = the next context
token (the anchor for the last row), and step s of the last row is the s-th drafted token: exactly the
inputs training used, so training and decoding agree step for step.

Loss: step s weighs ``ttt_decay ** s``; per supervised row the soft cross-entropy against the target
distribution (restricted to the draft vocab and renormalised when pruned). Frozen: ``embed_tokens``, the LM
head (or its pruned rows ``lm_head [W, H]``), ``d2t``/``t2d``. Tensor names are the SGLang/vLLM Eagle3 layout
(``fc``, ``midlayer.*``, ``norm``, ``embed_tokens``, ``lm_head``, ``d2t``, ``t2d``).

On a Gemma4 target (DESIGN 8.2) the midlayer is Gemma4's (``layer.py``), token embeddings are scaled by sqrt(H)
and the draft and target logits softcapped (``final_logit_softcapping``), in the loss and when proposing. Such a
drafter, and one with ``drafter.eagle3.qk_norm`` (Qwen3's q/k norms), is written in the reference's deepspec layout
(``Gemma4Eagle3Model`` / ``Qwen3Eagle3Model``, ``dspark.export.deepspec_eagle3``), ``midlayer.*`` as ``layers.0.*``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from dspark.config import DrafterConfig
from dspark.drafters.base import (
    Drafter,
    LossOutput,
    Proposal,
    check_training_batch,
    sample_rows,
)
from dspark.drafters.common import (
    RMSNorm,
    RotaryEmbedding,
    config_get,
    gemma4_global_geometry,
    layer_variant,
    rope_theta_from_config,
    softcap,
)
from dspark.drafters.eagle3.layer import Eagle3Layer, ttt_attention
from dspark.drafters.eagle3.loss import soft_cross_entropy
from dspark.drafters.eagle3.vocab import (
    build_draft_vocab,
    count_supervised_tokens,
    draft_to_target_ids,
)
from dspark.drafters.parts import (
    FrozenWeight,
    PrefixCache,
    check_layer_ids,
    check_proposal_rows,
    check_target_matrix,
    num_target_layers,
)


def _chunk_rows(vocab_size: int) -> int:
    return max(16, min(4096, (1 << 24) // max(vocab_size, 1)))


class Eagle3Drafter(Drafter):
    """Eagle3 (``algorithm="eagle3"``). ``lm_head_weight`` is the target's ``[V, H]`` head, or, when rebuilding a
    pruned export, the draft head ``[W, H]`` together with ``d2t``/``t2d`` (such a drafter decodes but cannot
    train: the full target head that defines the training targets is not stored in the export)."""

    algorithm = "eagle3"
    # The evaluator passes the context token ids to ``propose``: step 0 of every context row embeds a token.
    needs_context_ids = True

    def __init__(self, cfg: DrafterConfig, target_config, layer_ids: list[int], embed_weight: torch.Tensor,
                 lm_head_weight: torch.Tensor, *, d2t: torch.Tensor | None = None, t2d: torch.Tensor | None = None):
        super().__init__()
        if cfg.algorithm != "eagle3":
            raise ValueError(f"Eagle3Drafter needs drafter.algorithm 'eagle3', got {cfg.algorithm!r}")
        # One decoder layer and the section's ranges: checked when the config was built (check_drafter).
        self.cfg, eagle3 = cfg, cfg.eagle3
        H = config_get(target_config, "hidden_size")
        V = config_get(target_config, "vocab_size")
        W = eagle3.draft_vocab_size or V
        if not 1 <= W <= V:
            raise ValueError(f"drafter.eagle3.draft_vocab_size {eagle3.draft_vocab_size} must be within 0..{V} "
                             f"(0 = full)")
        check_target_matrix("embedding", embed_weight, V, H)
        if tuple(lm_head_weight.shape) not in ((V, H), (W, H)):
            raise ValueError(f"LM head has shape {tuple(lm_head_weight.shape)}, expected the target's [{V}, {H}] "
                             f"(or the draft head [{W}, {H}] of an export)")
        self.num_target_layers = num_target_layers(target_config)
        self.layer_ids = ids = check_layer_ids(layer_ids, self.num_target_layers)
        num_heads = config_get(target_config, "num_attention_heads")
        num_kv_heads = config_get(target_config, "num_key_value_heads") or num_heads
        head_dim = config_get(target_config, "head_dim") or H // num_heads
        eps = config_get(target_config, "rms_norm_eps", 1e-6)
        # Gemma4 targets: Gemma4's layer with the global attention geometry, the embedding scaled by sqrt(H), the
        # final-logit softcap on draft and target logits (DESIGN 8.2); exported as the reference's Gemma4Eagle3Model.
        self.variant = variant = layer_variant(target_config)
        self.embed_scale = H ** 0.5 if variant.gemma4 else None
        rope_theta = None
        if variant.gemma4 or eagle3.qk_norm:
            self._check_reference_layout(cfg, ids, W < V)
        if variant.gemma4:
            head_dim, num_kv_heads, rope_theta = self._gemma4_geometry(target_config)
        self.target_name = (config_get(target_config, "target_model_name_or_path")
                            or config_get(target_config, "_name_or_path") or "")
        self.intermediate_size = cfg.intermediate_size or config_get(target_config, "intermediate_size")
        self.hidden_size, self.vocab_size, self.draft_vocab_size = H, V, W
        self.block_size, self.ttt_length = cfg.block_size, eagle3.ttt_length
        # The target's config (HF object or an exported config) and the midlayer's attention geometry, as built:
        # the exporters describe the draft layer from them.
        self.target_config = target_config
        self.head_dim, self.num_kv_heads, self.rms_norm_eps = head_dim, num_kv_heads, eps
        self.initializer_range = config_get(target_config, "initializer_range", 0.02) or 0.02

        self.fc = nn.Linear(len(ids) * H, H, bias=False)
        self.midlayer = Eagle3Layer(H, self.intermediate_size, num_heads, num_kv_heads, head_dim, eps, variant,
                                    qk_norm=eagle3.qk_norm)
        self.norm = RMSNorm(H, eps, gemma=variant.gemma4)
        self.rotary = RotaryEmbedding(head_dim, rope_theta or rope_theta_from_config(target_config),
                                      variant.rotary_fraction)
        self.embed_tokens = FrozenWeight(embed_weight)
        self._prefix_cache = PrefixCache()
        self.pruned = W < V
        has_target_head = tuple(lm_head_weight.shape) == (V, H)
        # The full target head defines the training targets; with the full vocab it is also the draft head.
        self.target_lm_head = FrozenWeight(lm_head_weight) if has_target_head else None
        if self.pruned:
            if (d2t is None) != (t2d is None):
                raise ValueError("pass both d2t and t2d, or neither")
            if d2t is None:
                if not has_target_head:
                    raise ValueError(f"a draft LM head [{W}, {H}] needs its d2t/t2d maps")
                warnings.warn(f"draft vocab of {W} tokens not fitted yet: using target ids 0..{W - 1} until "
                              "set_draft_vocab(...) installs the maps built from token counts")
                d2t, t2d = build_draft_vocab(torch.arange(V, 0, -1), W)
            self._check_maps(d2t, t2d)
            self.register_buffer("d2t", d2t.long().clone())
            self.register_buffer("t2d", t2d.bool().clone())
            draft_head = lm_head_weight[draft_to_target_ids(self.d2t)] if has_target_head else lm_head_weight
            self.lm_head = FrozenWeight(draft_head)
        else:
            self.d2t = self.t2d = None
            self.lm_head = FrozenWeight(lm_head_weight)
        self.loss_chunk_rows = _chunk_rows(V)
        self._init_weights()

    def _check_reference_layout(self, cfg: DrafterConfig, layer_ids: list[int], pruned: bool) -> None:
        """Refuse what the reference's Gemma4Eagle3Model / Qwen3Eagle3Model (the only layout of these midlayers)
        cannot hold, before any training."""
        which = "a Gemma4 target" if self.variant.gemma4 else "drafter.eagle3.qk_norm (Qwen3Eagle3Model)"
        if layer_ids[0] < 0:
            raise ValueError(f"layer_ids {layer_ids}: Eagle3 with {which} reads decoder layers only (ids >= 0, as "
                             f"the reference's Eagle3); -1 (the embeddings) is not one")
        if pruned:
            raise ValueError(f"drafter.eagle3.draft_vocab_size {cfg.eagle3.draft_vocab_size}: Eagle3 with {which} "
                             f"drafts over the full vocabulary (the reference stores lm_head [V, H]); set it to 0")

    def _gemma4_geometry(self, target_config) -> tuple[int, int, float]:
        """(head dim, kv heads, RoPE theta) of a Gemma4 target's global layers, which the midlayer uses."""
        if config_get(target_config, "use_double_wide_mlp") and config_get(target_config, "num_kv_shared_layers"):
            raise ValueError("a Gemma4 target with use_double_wide_mlp and num_kv_shared_layers > 0 (the draft layer "
                             "would need a double-wide MLP) is not supported by the drafter yet")
        head_dim, num_kv_heads = gemma4_global_geometry(target_config)
        theta = config_get(target_config, "rope_parameters")["full_attention"]["rope_theta"]
        return head_dim, num_kv_heads, float(theta)

    def _check_maps(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        W, V = self.draft_vocab_size, self.vocab_size
        if tuple(d2t.shape) != (W,) or tuple(t2d.shape) != (V,):
            raise ValueError(f"d2t must be [{W}] and t2d [{V}]; got {tuple(d2t.shape)} and {tuple(t2d.shape)}")
        target_ids = draft_to_target_ids(d2t.long())
        if int(target_ids.min()) < 0 or int(target_ids.max()) >= V or not bool(t2d[target_ids].all()) \
                or int(t2d.sum()) != W or target_ids.unique().numel() != W:
            raise ValueError("d2t and t2d disagree: every draft id + d2t must be a distinct target id marked in t2d")

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=self.initializer_range)

    @torch.no_grad()
    def set_draft_vocab(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        """Install draft-vocab maps (e.g. ``build_draft_vocab(count_supervised_tokens(...), W)``) and take the
        matching rows of the target LM head as the frozen draft head."""
        if not self.pruned:
            raise ValueError("set_draft_vocab needs drafter.eagle3.draft_vocab_size > 0 (this drafter uses the full "
                             "vocab)")
        if self.target_lm_head is None:
            raise ValueError("this drafter was loaded from a pruned export without the target LM head; its draft "
                             "vocab is fixed")
        self._check_maps(d2t, t2d)
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)
        self.lm_head.weight = self.target_lm_head.weight[draft_to_target_ids(self.d2t)]

    @property
    def needs_token_counts(self) -> bool:
        """True while a pruned draft vocab can still be fitted (the trainer then calls ``fit_draft_vocab``)."""
        return self.pruned and self.target_lm_head is not None

    def fit_draft_vocab(self, samples) -> None:
        """Keep the ``draft_vocab_size`` most frequent supervised tokens of ``samples`` (dicts with ``input_ids``
        and ``loss_mask``: conversations or cache samples)."""
        self.set_draft_vocab(*build_draft_vocab(count_supervised_tokens(samples, self.vocab_size),
                                                self.draft_vocab_size))

    def draft_target_ids(self) -> torch.Tensor | None:
        """Target id of every draft id, or None with the full vocabulary."""
        return draft_to_target_ids(self.d2t) if self.pruned else None

    # -- backbone --------------------------------------------------------------------------------------------

    def fuse(self, features_XLH: torch.Tensor) -> torch.Tensor:
        """``fc([H(l1); ...; H(lm)])`` -> ``[..., H]`` (Eagle3 norms it inside the layer, with ``hidden_norm``).
        ``features_XLH`` is ``[B, T, L, H]``."""
        features_XLH = features_XLH.to(self.fc.weight.dtype)
        *lead, L, H = features_XLH.shape
        if (L, H) != (len(self.layer_ids), self.hidden_size):
            raise ValueError(f"features have {L} layers x hidden {H}; the drafter expects "
                             f"{len(self.layer_ids)} layers (ids {self.layer_ids}) x hidden {self.hidden_size}")
        return self.fc(features_XLH.reshape(*lead, L * H))

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.embed_tokens.weight)
        if self.embed_scale is not None:  # Gemma4: x sqrt(H), the scale rounded to the weight dtype first
            x = x * torch.tensor(self.embed_scale).to(x.dtype)
        return x.to(self.fc.weight.dtype)

    def draft_logits(self, hidden_XH: torch.Tensor) -> torch.Tensor:
        """fp32 draft logits ``[..., W]`` of output hidden states (final norm, draft head, Gemma4's softcap)."""
        return softcap(self.norm(hidden_XH).float() @ self.lm_head.weight.float().T, self.variant.softcap)

    def ttt_hidden(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Output hidden states (pre-norm) of every TTT step, ``[B, T, H]`` each; row t of step s follows the
        module docstring (token ``x_{t+1+s}``, position ``t+s``). Rows whose token lies past the end hold junk."""
        ids_BT = batch["input_ids_BT"]
        B, T = ids_BT.shape
        hidden_BTH = self.fuse(batch["features_BTLH"])
        t_T = torch.arange(T, device=ids_BT.device)
        causal_TT = t_T.unsqueeze(1) >= t_T.unsqueeze(0)
        k0 = v0 = None
        diag: list[tuple[torch.Tensor, torch.Tensor]] = []
        outputs = []
        for s in range(self.ttt_length):
            shift = 1 + s
            tokens_BT = torch.zeros_like(ids_BT)
            tokens_BT[:, : max(T - shift, 0)] = ids_BT[:, shift:]
            rope = self.rotary.cos_sin((t_T + s).expand(B, T), hidden_BTH.dtype)
            q, k, v = self.midlayer.qkv(self._embed(tokens_BT), hidden_BTH, rope)
            if s == 0:
                k0, v0 = k, v
            else:
                diag.append((k, v))
            hidden_BTH = self.midlayer.finish(hidden_BTH, ttt_attention(q, k0, v0, causal_TT, diag,
                                                                        self.midlayer.self_attn.scale))
            outputs.append(hidden_BTH)
        return outputs

    # -- training --------------------------------------------------------------------------------------------

    def forward_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> LossOutput:
        """Every supervised position at every TTT step (no sampling: ``generator`` is unused)."""
        check_training_batch(batch)
        if self.target_lm_head is None:
            raise ValueError("this Eagle3 drafter holds only the pruned draft LM head (loaded from an export); "
                             "training needs the target's full LM head: build it with build_drafter")
        ids_BT, mask_BT, final_BTH = batch["input_ids_BT"], batch["loss_mask_BT"].bool(), batch["final_BTH"]
        T = ids_BT.shape[1]
        S = self.ttt_length
        t_T = torch.arange(T, device=ids_BT.device)
        draft_ids_W = self.draft_target_ids()
        numerator = ce_sum = weight_sum = 0.0
        accept_sum_S = torch.zeros(S, device=ids_BT.device)
        count_S = torch.zeros(S, device=ids_BT.device)
        num_rows = 0
        for s, hidden_BTH in enumerate(self.ttt_hidden(batch)):
            # Row t predicts token t+2+s from the target's distribution at position t+1+s.
            pred_T = t_T + 2 + s
            valid_BT = (pred_T < T) & mask_BT.gather(1, pred_T.clamp(max=T - 1).expand_as(ids_BT))
            b_N, t_N = valid_BT.nonzero(as_tuple=True)
            weight = self.cfg.eagle3.ttt_decay ** s
            coef_N = torch.full(b_N.shape, weight, dtype=torch.float32, device=ids_BT.device)
            loss, ce_N, accept_N = soft_cross_entropy(
                self.norm(hidden_BTH[b_N, t_N]), self.lm_head.weight, self.target_lm_head.weight,
                final_BTH[b_N, t_N + 1 + s], draft_ids_W, coef_N, self.loss_chunk_rows, self.variant.softcap)
            numerator = numerator + loss
            ce_sum = ce_sum + weight * ce_N.sum()
            weight_sum = weight_sum + weight * b_N.numel()
            accept_sum_S[s] = accept_N.sum()
            count_S[s] = b_N.numel()
            num_rows += b_N.numel()
        return LossOutput(numerator=numerator, weight_sum=torch.tensor(float(weight_sum), device=ids_BT.device),
                          terms={"ce": torch.as_tensor(ce_sum, device=ids_BT.device).detach()},
                          accept_sum_K=accept_sum_S, count_K=count_S, num_tokens=num_rows)

    # -- decoding --------------------------------------------------------------------------------------------

    def _weights_version(self) -> tuple:
        return tuple((p._version, p.data_ptr()) for p in self.parameters())

    def _contexts_kv(self, contexts: list[torch.Tensor], row_ids: list[torch.Tensor]) -> list[tuple]:
        """Per row: step-0 keys/values of every context row (``k [1, G, T_b, D]``, ``v``), the last row's query
        (``[1, G, Q, 1, D]``) and its fused hidden (``[1, 1, H]``); ``row_ids[b]``: the token each context row of row b
        embeds.

        Only context rows past the longest prefix a row shares with one of the previous call's rows (same features,
        same tokens, same weights) are projected, all rows' new parts packed into one ``qkv`` call (the projections
        are row-wise): decoding extends each context by the accepted tokens every round. ``reset_context_cache``
        empties the cache. A cached row's last row embedded its anchor, so it is reused only while it is still a
        prefix row, and a row's own last row is always redone (at most ``T - 1`` rows reused).
        """
        version = self._weights_version()
        reused = [self._prefix_cache.longest_prefix(version, (context_TLH, ids_T), context_TLH.shape[0] - 1)
                  for context_TLH, ids_T in zip(contexts, row_ids)]
        device = self.fc.weight.device
        tails = [context_TLH[n:] for context_TLH, (n, _) in zip(contexts, reused)]
        hidden_1NH = self.fuse(torch.cat(tails).unsqueeze(0))
        pos_1N = torch.cat([torch.arange(n, c.shape[0], device=device) for c, (n, _) in zip(contexts, reused)])[None]
        ids_1N = torch.cat([ids_T[n:] for ids_T, (n, _) in zip(row_ids, reused)])[None]
        q_all, k_all, v_all = self.midlayer.qkv(self._embed(ids_1N), hidden_1NH,
                                                self.rotary.cos_sin(pos_1N, hidden_1NH.dtype))
        sizes = [len(t) for t in tails]
        out, new_entries = [], []
        for b, (n, prev) in enumerate(reused):
            first, last = sum(sizes[:b]), sum(sizes[: b + 1])  # every row has >= 1 new context row (its anchor)
            k, v = k_all[:, :, first:last], v_all[:, :, first:last]
            if n:
                k = torch.cat([prev[0][:, :, :n], k], dim=2)
                v = torch.cat([prev[1][:, :, :n], v], dim=2)
            out.append((k, v, q_all[:, :, :, last - 1 : last], hidden_1NH[:, last - 1 : last]))
            new_entries.append(((contexts[b], row_ids[b]), (k, v)))
        self._prefix_cache.store(version, new_entries)
        return out

    def reset_context_cache(self) -> None:
        self._prefix_cache = PrefixCache()

    @torch.no_grad()
    def propose(self, context_TLH: torch.Tensor, anchor_id: int, *, temperature: float,
                generator: torch.Generator | None = None, context_ids_T: torch.Tensor | None = None) -> Proposal:
        """Chain-draft ``block_size`` tokens after ``anchor_id`` (at position T): the batch of one of ``propose_batch``.

        ``context_ids_T`` are the token ids at positions 0..T-1 (row u of step 0 embeds token u+1, the anchor for
        the last row). Probabilities are returned over the TARGET vocab (0 outside a pruned draft vocab).
        """
        return self.propose_batch([context_TLH], [anchor_id], temperature=temperature, generators=[generator],
                                  context_ids=[context_ids_T])[0]

    @torch.no_grad()
    def propose_batch(self, contexts: list[torch.Tensor], anchor_ids: list[int], *, temperature: float,
                      generators: list[torch.Generator | None], context_ids: list[torch.Tensor] | None = None
                      ) -> list[Proposal]:
        """Chain-draft ``block_size`` tokens after each row's anchor, all rows in one forward per step (see
        ``Drafter.propose_batch``; ``context_ids`` is required).

        The rows' step-0 keys/values are right-padded to the longest context and the padding masked out of the
        attention; each row's drafted tokens sit at its own positions ``T_b - 1 + s``.
        """
        check_proposal_rows(contexts, anchor_ids, generators, temperature)
        if context_ids is None:
            context_ids = [None] * len(contexts)
        for context_TLH, ids_T in zip(contexts, context_ids):
            T = context_TLH.shape[0]
            if ids_T is None or ids_T.shape != (T,) or T < 1:
                raise ValueError(f"Eagle3 propose needs context_ids_T with one token id per context row ({T}), got "
                                 f"{None if ids_T is None else tuple(ids_T.shape)}")
        device = self.fc.weight.device
        B = len(contexts)
        anchors_B = torch.tensor([int(a) for a in anchor_ids], device=device)
        row_ids = [torch.cat([ids_T.to(device, torch.long)[1:], anchors_B[b : b + 1]])
                   for b, ids_T in enumerate(context_ids)]
        per_row = self._contexts_kv([c.to(device) for c in contexts], row_ids)
        lengths_B = torch.tensor([c.shape[0] for c in contexts], device=device)
        S = int(lengths_B.max())
        _, G, _, D = per_row[0][0].shape
        k0_BGSD = per_row[0][0].new_zeros((B, G, S, D))
        v0_BGSD = torch.zeros_like(k0_BGSD)
        for b, (k, v, _, _) in enumerate(per_row):
            k0_BGSD[b, :, : k.shape[2]] = k[0]
            v0_BGSD[b, :, : v.shape[2]] = v[0]
        # Broadcast against the scores [B, G, Q, 1, S]: row b sees its own T_b context rows, not the padding.
        visible = (torch.arange(S, device=device) < lengths_B[:, None]).view(B, 1, 1, 1, S)
        q = torch.cat([r[2] for r in per_row])
        hidden_B1H = torch.cat([r[3] for r in per_row])
        target_ids_W = self.draft_target_ids()
        diag: list[tuple[torch.Tensor, torch.Tensor]] = []
        tokens, probs = [], []
        token_B = anchors_B
        for s in range(self.block_size):
            if s > 0:
                rope = self.rotary.cos_sin((lengths_B - 1 + s)[:, None], hidden_B1H.dtype)
                q, k, v = self.midlayer.qkv(self._embed(token_B[:, None]), hidden_B1H, rope)
                diag.append((k, v))
            hidden_B1H = self.midlayer.finish(hidden_B1H, ttt_attention(q, k0_BGSD, v0_BGSD, visible, diag,
                                                                        self.midlayer.self_attn.scale))
            logits_BW = self.draft_logits(hidden_B1H[:, 0])
            draft_B, p_BW = sample_rows(logits_BW, temperature, generators)
            token_B = target_ids_W[draft_B] if target_ids_W is not None else draft_B
            p_BV = p_BW if target_ids_W is None else p_BW.new_zeros(B, self.vocab_size).index_copy_(1, target_ids_W,
                                                                                                      p_BW)
            tokens.append(token_B)
            probs.append(p_BV)
        tokens_BK, probs_BKV = torch.stack(tokens, dim=1), torch.stack(probs, dim=1)
        return [Proposal(tokens_K=tokens_BK[b], probs_KV=probs_BKV[b]) for b in range(B)]

    # -- export ----------------------------------------------------------------------------------------------

    @property
    def deepspec_layout(self) -> bool:
        """Whether the midlayer is the reference's (Gemma4, or q/k-normed Qwen3), which only the deepspec layout holds;
        otherwise it is SGLang/vLLM's Llama midlayer, which only the eagle3 and speculators layouts hold."""
        return self.variant.gemma4 or self.cfg.eagle3.qk_norm

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Trained tensors, the maps when pruned, and the frozen ``embed_tokens`` and (draft) ``lm_head``."""
        state = dict(self.state_dict())
        state["embed_tokens.weight"] = self.embed_tokens.weight
        state["lm_head.weight"] = self.lm_head.weight
        return state

