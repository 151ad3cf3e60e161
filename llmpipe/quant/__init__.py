"""Block quantization formats byte-compatible with llama.cpp (GGUF), and the exports that use them."""
