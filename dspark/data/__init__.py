"""Training data: prompt sets, chat tokenisation with loss masks, answer regeneration, batch collation.

    load_prompts / split_prompts      dspark.data.prompts
    prompt_ids / conversation_ids     dspark.data.chat
    regenerate / regenerate_resumable / write_jsonl / read_conversations   dspark.data.regenerate
    ResumableJsonl (ordered, crash-safe, resumable output)         dspark.data.output
    regenerate_with_servers (OpenAI-compatible endpoints)          dspark.data.server
    fetch_prompts (hub dataset or local file -> prompt jsonl)      dspark.data.fetch_prompts
    collate                           dspark.data.collate

Importing this package stays light: each submodule imports only what it needs (torch only in collate).
"""
