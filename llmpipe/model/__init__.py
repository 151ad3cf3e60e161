"""The transformer and what works on its weights: the model (transformer), saving and loading it (weights),
its size (size), LoRA adapters (lora) and the one decoding engine (generation)."""
