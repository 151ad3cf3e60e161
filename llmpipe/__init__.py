"""llmpipe: a reproducible pipeline that trains a small Llama-style language model end to end.

prepare → train_tokenizer → tokenize → pretrain → finetune → quantize → evaluate,
orchestrated by DVC (dvc.yaml), configured by Hydra (conf/ → params.yaml), tracked in MLflow.
"""

__version__ = "0.1.0"
