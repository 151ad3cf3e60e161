"""Data: the embedded world, the user's files or a Hugging Face dataset, prepared into JSONL
(prepare stage), and encoded into token files (tokenize stage)."""
