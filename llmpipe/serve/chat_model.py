"""The fine-tuned model as an MLflow chat model (mlflow.pyfunc.ChatModel), defined from code (MLflow
"models from code"): nothing is pickled; loading reads safetensors weights and the tokenizer from the
model's artifacts.

The model speaks OpenAI's chat-completions format, as MLflow's chat models do: a request is one
conversation (system / user / assistant messages, rendered with the tokenizer's chat template) and the
generation settings beside it; the answer is a chat completion.

    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \
      -d '{"messages": [{"role": "user", "content": "What is the birth city of Sebastian Atherton?"}],
           "max_tokens": 16, "temperature": 0}'
    # → {"object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop",
    #    "message": {"role": "assistant", "content": "Cordoba"}}], "usage": {...}, ...}

    model = mlflow.pyfunc.load_model("models:/llmpipe-chat/latest")
    model.predict({"messages": [{"role": "user", "content": "..."}], "max_tokens": 16, "temperature": 0.0})

Settings (fields of the request, checked by the model's signature, which ChatModel fixes):
- `max_tokens`: new tokens at most (default 32);
- `temperature`: 0 decodes greedily (as the evaluation does); above 0 samples, with `top_k` / `top_p`,
  seeded (seed 0), so a request always gets the same answer. MLflow fills in OpenAI's default of 1.0
  when a request has no temperature;
- `stop`: strings that end an answer early; `n`: answers per request (they differ only when sampling).
Tools and frequency/presence penalties are refused (400), not ignored.

The chat form is the only input: an MLflow signature holds either this request schema or a list of
plain questions, not both, so `{"inputs": ["What is ...?"]}` is not accepted; send each question as a
one-message conversation. Streaming is not implemented (the whole answer comes back at once).
"""

from __future__ import annotations

import warnings

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import ChatModel
from mlflow.types.llm import (
    ChatChoice,
    ChatCompletionResponse,
    ChatMessage,
    ChatParams,
    TokenUsageStats,
)

DEFAULT_MAX_TOKENS = 32
# Small, so that logging the model (MLflow runs it once on this example) stays quick.
INPUT_EXAMPLE = {"messages": [{"role": "user", "content": "What is the birth city of Sebastian Atherton?"}],
                 "max_tokens": 8, "temperature": 0.0}


def bad_request(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)  # the scoring server answers 400


def conversation(messages: list[ChatMessage], roles: tuple[str, ...]) -> list[dict]:
    """The request's messages as the chat template takes them: role and text content."""
    if not messages:
        raise bad_request("the request has no messages")
    turns = []
    for message in messages:
        if message.role not in roles:
            raise bad_request(f"message role {message.role!r} is not supported; roles: {', '.join(roles)}")
        if not isinstance(message.content, str):
            raise bad_request(f"a {message.role} message must have text content")
        turns.append({"role": message.role, "content": message.content})
    return turns


def sampling_settings(params: ChatParams):
    """ChatParams → the engine's SamplingSettings; refuses what this model cannot do."""
    from llmpipe.model.generation import SamplingSettings

    refused = [name for name in ("tools", "frequency_penalty", "presence_penalty") if getattr(params, name)]
    if refused:
        raise bad_request(f"not supported by this model: {', '.join(refused)}")
    max_tokens = DEFAULT_MAX_TOKENS if params.max_tokens is None else params.max_tokens
    if max_tokens < 1 or params.n < 1:
        raise bad_request("max_tokens and n must be at least 1")
    top_p = 1.0 if params.top_p is None else float(params.top_p)
    if params.temperature < 0 or (params.top_k or 0) < 0 or not 0 < top_p <= 1:
        raise bad_request("temperature and top_k must be at least 0, top_p in (0, 1]")
    return SamplingSettings(max_new_tokens=max_tokens, temperature=float(params.temperature),
                            top_k=params.top_k or 0, top_p=top_p)


def cut_at_stop(text: str, stop: list[str] | None) -> tuple[str, bool]:
    """The text up to the first stop string, and whether one was found."""
    ends = [text.find(s) for s in stop or () if s and s in text]
    return (text[:min(ends)], True) if ends else (text, False)


class LlmpipeChatModel(ChatModel):
    def load_context(self, context) -> None:
        from llmpipe.model.weights import load_model
        from llmpipe.serve.registry import referenced_weights
        from llmpipe.text.chat_template import ChatTemplate
        from llmpipe.text.tokenizer import LoadedTokenizer

        self.tokenizer = LoadedTokenizer(context.artifacts["tokenizer"])
        self.template = ChatTemplate(self.tokenizer)
        self.model, _ = load_model(context.artifacts["model"], tokenizer=self.tokenizer,
                                   weights_file=referenced_weights(context.artifacts["model"]))

    def predict(self, context, messages: list[ChatMessage], params: ChatParams) -> ChatCompletionResponse:
        """One conversation → `n` answers of the assistant, generated as one batch."""
        from llmpipe.model.generation import Engine, fit_prompt
        from llmpipe.text.chat_template import ROLES

        settings = sampling_settings(params)
        prompt = fit_prompt(self.template.encode_prompt(conversation(messages, ROLES)),
                            self.model.config.context_length, settings.max_new_tokens)
        room = min(settings.max_new_tokens, self.model.config.context_length - len(prompt))
        engine = Engine(self.model, stop_ids={self.template.end_of_turn, self.tokenizer.end_of_document_id})
        choices, completion_tokens = [], 0
        for index, ids in enumerate(engine.generate([prompt] * params.n, settings)):
            text, stopped = cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), params.stop)
            # Fewer tokens than there was room for: a stop token ended the answer.
            finish = "stop" if stopped or len(ids) < room else "length"
            choices.append(ChatChoice(index=index, message=ChatMessage(role="assistant", content=text.strip()),
                                      finish_reason=finish))
            completion_tokens += len(ids)
        return ChatCompletionResponse(
            choices=choices, model="llmpipe",
            usage=TokenUsageStats(prompt_tokens=len(prompt), completion_tokens=completion_tokens,
                                  total_tokens=len(prompt) + completion_tokens))


# MLflow 3 marks ChatModel deprecated in favour of ResponsesAgent, whose format is OpenAI's Responses API;
# its own documentation keeps ChatModel for models that must speak the chat-completions format, as this one does.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*ChatModel.*")
    mlflow.models.set_model(LlmpipeChatModel())
