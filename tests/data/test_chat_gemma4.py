"""Gemma4's chat template and loss masks, golden-tested on the tiny Gemma4 tokenizer (DESIGN 8.2): header
``<|turn>model\\n``, the empty thought channel before the answer, end of turn ``<turn|>``; the loss covers the
answer and the end-of-turn token only."""

import pytest

from dspark.data.chat import conversation_ids, prompt_ids


@pytest.fixture(scope="module")
def tokenizer(gemma4_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gemma4_tokenizer_dir)


def test_gemma_special_ids(tokenizer):
    # Gemma's first ids (the reference's mask token id 4 is <mask>) and Gemma4's markers as single tokens.
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.mask_token_id) == (0, 2, 4)
    assert tokenizer.eos_token == "<turn|>"
    for marker in ("<|turn>", "<turn|>", "<|channel>", "<channel|>"):
        assert len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1


def test_prompt_is_gemma4_generation_prompt(tokenizer):
    ids = prompt_ids(tokenizer, "What is 2 + 2?")
    assert tokenizer.decode(ids) == ("<bos><|turn>user\nWhat is 2 + 2?<turn|>\n"
                                     "<|turn>model\n<|channel>thought\n<channel|>")
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1  # no default system turn


def test_loss_mask_golden(tokenizer):
    prompt, answer = "What is 2 + 2?", "The answer is 4."
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids, loss_mask = conversation_ids(tokenizer, prompt, answer_ids)
    supervised = tokenizer.decode([t for t, m in zip(input_ids, loss_mask) if m])
    unsupervised = tokenizer.decode([t for t, m in zip(input_ids, loss_mask) if not m])
    assert supervised == "The answer is 4.<turn|>"  # the answer and the end of turn
    assert unsupervised == "<bos><|turn>user\nWhat is 2 + 2?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    assert loss_mask == sorted(loss_mask)  # one masked prefix, then the answer
    # The template renders the finished conversation the same way: ours is its prefix, short of the final newline.
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        tokenize=True, return_dict=True)["input_ids"]
    assert full[: len(input_ids)] == input_ids and tokenizer.decode(full[len(input_ids):]) == "\n"


def test_template_keeps_a_channel_already_present(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "<|channel>thought\nsay hi<channel|>Hello"},
         {"role": "user", "content": "Bye"},
         {"role": "assistant", "content": "Goodbye"}], tokenize=False)
    assert text == ("<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n"
                    "<|turn>model\n<|channel>thought\nsay hi<channel|>Hello<turn|>\n<|turn>user\nBye<turn|>\n"
                    "<|turn>model\n<|channel>thought\n<channel|>Goodbye<turn|>\n")


def test_builtin_tiny_gemma4_loads(tiny_gemma4_dir, gemma4_tokenizer_dir):
    import torch

    from dspark.config import TargetConfig
    from dspark.targets import load_target

    target = load_target(TargetConfig(name_or_path=str(tiny_gemma4_dir), layer_ids=[-1, 0, 2]))
    cfg = target.config
    assert cfg.model_type == "gemma4_text" and cfg.final_logit_softcapping and cfg.attention_k_eq_v
    assert set(cfg.layer_types) == {"sliding_attention", "full_attention"}
    ids = torch.tensor([prompt_ids(target.tokenizer, "Hello there, how are you?")])
    out = target.model(ids, output_hidden_states=True)
    feats = target.features(ids)
    # id -1 is the embedding output, already scaled by sqrt(H).
    embed = target.embed_weight[ids] * torch.tensor(cfg.hidden_size ** 0.5).to(target.embed_weight.dtype)
    torch.testing.assert_close(feats.layers_BTLH[:, :, 0], embed)
    torch.testing.assert_close(feats.layers_BTLH[:, :, 2], out.hidden_states[3])
