"""Text in and out of token ids: the byte-level BPE tokenizer (tokenizer) and the chat template (chat_template)."""
