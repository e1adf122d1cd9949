"""Training data: prompt sets, chat tokenisation with loss masks, answer regeneration, batch collation.

    load_prompts / split_prompts      dspark.data.prompts
    prompt_ids / conversation_ids     dspark.data.chat
    regenerate / write_jsonl / read_conversations   dspark.data.regenerate
    collate                           dspark.data.collate

Importing this package stays light: each submodule imports only what it needs (torch only in collate).
"""
