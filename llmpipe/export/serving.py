"""The fine-tuned model as an MLflow pyfunc model, defined from code (MLflow "models from code"):
nothing is pickled; loading reads safetensors weights and the tokenizer from the model's artifacts.

    model = mlflow.pyfunc.load_model("models:/llmpipe-chat/latest")
    model.predict(["What is the birth city of Emrys Jablonski?"])   # → ["Cordoba"]

`mlflow models serve -m models:/llmpipe-chat/latest --env-manager local` answers over HTTP.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class ChatModel(PythonModel):
    def load_context(self, context) -> None:
        from llmpipe.chat_template import ChatTemplate
        from llmpipe.model_io import load_model
        from llmpipe.tokenizer import LoadedTokenizer

        self.tokenizer = LoadedTokenizer(context.artifacts["tokenizer"])
        self.template = ChatTemplate(self.tokenizer)
        self.model, _ = load_model(context.artifacts["model"], tokenizer=self.tokenizer)

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[str]:
        """Questions → greedy answers, generated as one batch (params: max_new_tokens, default 32)."""
        from llmpipe.generate import Engine, SamplingSettings

        max_new_tokens = int((params or {}).get("max_new_tokens", 32))
        prompts = [self.template.encode_prompt([{"role": "user", "content": str(q)}]) for q in model_input]
        engine = Engine(self.model, stop_ids={self.template.end_of_turn, self.tokenizer.end_of_document_id})
        generated = engine.generate(prompts, SamplingSettings(max_new_tokens=max_new_tokens))
        return [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in generated]


mlflow.models.set_model(ChatModel())
