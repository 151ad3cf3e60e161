"""The Hugging Face layout of the families our transformer covers (Llama, Mistral, Qwen2, Qwen3), both ways:
the config mapping (config), export for transformers (export), import of a checkpoint (checkpoint) and of its
tokenizer (tokenizer)."""
