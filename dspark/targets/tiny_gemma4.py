"""The tiny random Gemma4 built-in target (``builtin:tiny-gemma4``): a Gemma4 text model shrunk to hidden 64 with
every Gemma4 feature that changes features or logits (sliding and global layers with their own head dim, kv heads
and RoPE, ``attention_k_eq_v``, sandwich norms, ``layer_scalar``, the sqrt(H)-scaled embedding, final-logit
softcapping), and a tokenizer with Gemma's special tokens at Gemma's ids and Gemma4's chat template.

Nothing downloads: the tokenizer is a byte-level BPE trained on the built-in prompts (deterministic), with
``<pad>``, ``<eos>``, ``<bos>``, ``<unk>``, ``<mask>`` at ids 0-4 as in Gemma's vocabulary (the reference recipes'
mask token id 4 is ``<mask>``), followed by Gemma4's turn and channel markers.
"""

from __future__ import annotations

from pathlib import Path

# Gemma's first five ids, then Gemma4's chat markers (the real vocabulary has them further up; the ids of the
# markers only need to be special single tokens).
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>", "<|channel>", "<channel|>",
                  "<|think|>")
END_OF_TURN = "<turn|>"
THOUGHT_PREFIX = "<|channel>thought\n<channel|>"  # the empty thought channel that opens a thinking-off answer

# Gemma4's chat template for text turns with thinking off: BOS, ``<|turn>{role}\n{content}<turn|>\n`` per turn
# (the assistant's role is "model"), an assistant turn opened by an empty thought channel unless its content
# already opens a channel, and the generation prompt ``<|turn>model\n`` + that empty thought channel. No default
# system prompt.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<|turn>' + role + '\n' -}}"
    "{%- if role == 'model' and not message['content'].startswith('<|channel>') -%}"
    "{{- '<|channel>thought\n<channel|>' -}}"
    "{%- endif -%}"
    "{{- message['content'] | trim -}}"
    "{{- '<turn|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|turn>model\n<|channel>thought\n<channel|>' -}}"
    "{%- endif -%}"
)


def gemma4_tokenizer(out: Path, vocab_size: int = 1024) -> Path:
    """A Gemma-style tokenizer (special ids as Gemma's, Gemma4's chat template) saved as an HF directory."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from dspark.data.prompts import BUILTIN_PROMPTS
    from dspark.targets.builtin import private_tmp, publish

    if (out / "tokenizer_config.json").exists():
        return out
    texts = [turn for line in BUILTIN_PROMPTS.read_text().splitlines() if line.strip()
             for turn in json.loads(line)["turns"]]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    # eos is the end-of-turn marker: an instruct Gemma4 ends its answer there (its generation config stops on it).
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token=END_OF_TURN, pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>", add_bos_token=False)
    fast.chat_template = CHAT_TEMPLATE
    tmp = private_tmp(out)
    fast.save_pretrained(tmp)
    publish(tmp, out, "tokenizer_config.json")
    return out


def tiny_gemma4_config(vocab_size: int, num_layers: int = 4, *, model_type: str = "gemma4_text",
                       **special_ids):
    """A tiny Gemma4 text config: sliding and full layers alternating (the last is full), sliding window 8, global
    layers with their own head dim 32 and 1 kv head sharing K and V (``attention_k_eq_v``), final-logit softcap 30.
    ``model_type`` gemma4 or gemma4_unified nests it as ``text_config`` of that multimodal config (no vision or
    audio tower)."""
    from transformers import AutoConfig

    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=8,
                layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
                final_logit_softcapping=30.0, hidden_size_per_layer_input=0, vocab_size_per_layer_input=vocab_size,
                max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=True, **special_ids)
    if model_type == "gemma4_text":
        return AutoConfig.for_model("gemma4_text", **text)
    if model_type in ("gemma4", "gemma4_unified"):
        text_type = f"{model_type}_text"
        if model_type == "gemma4_unified":
            text.pop("hidden_size_per_layer_input")
            text.pop("vocab_size_per_layer_input")
        return AutoConfig.for_model(model_type, text_config=dict(model_type=text_type, **text), vision_config=None,
                                    audio_config=None, tie_word_embeddings=True, **special_ids)
    raise ValueError(f"unknown Gemma4 model_type {model_type!r}; expected gemma4_text, gemma4 or gemma4_unified")
