"""llama.cpp's block quantization formats (formats) and GGUF files of the model (files)."""
