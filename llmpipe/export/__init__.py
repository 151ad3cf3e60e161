"""Exports: GGUF block formats and files for llama.cpp, the Hugging Face layout, and the MLflow model
(pyfunc serving and registry)."""
