"""The fine-tuned model as an MLflow chat model (chat_model) and in the Model Registry (registry)."""
