"""The Hugging Face Llama layout, both ways: the config mapping (config), export for transformers (export)
and import of a checkpoint (checkpoint)."""
