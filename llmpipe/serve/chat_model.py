"""The fine-tuned model as an MLflow chat model (mlflow.pyfunc.ChatModel) defined from code: nothing is
pickled; loading reads the safetensors weights and the tokenizer from the model's artifacts. It speaks OpenAI's
chat-completions format: one conversation in `messages` (rendered with the tokenizer's chat template) with
`max_tokens` (default 32; at most what the context leaves), `temperature` (0: greedy; MLflow's default is 1.0),
`top_p`, `top_k`, `stop`, `n`; the answer has `id`, `created`, `model`, `choices` and `usage`. Refused with a
400 and a one-line error that does not echo the request: streaming, tools, penalties, other roles, and a
conversation that fills the model's context (it is never cut).

    model = mlflow.pyfunc.load_model("models:/llmpipe-chat@champion")
    model.predict({"messages": [{"role": "user", "content": "..."}], "max_tokens": 16, "temperature": 0.0})
"""

from __future__ import annotations

import uuid
import warnings
from dataclasses import replace

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import ChatModel
from mlflow.types.llm import (
    ChatChoice,
    ChatCompletionResponse,
    ChatMessage,
    ChatParams,
    TokenUsageStats,
)

from llmpipe.model.generation import Engine, SamplingSettings
from llmpipe.model.weights import load_model
from llmpipe.serve.weights_pointer import referenced_weights
from llmpipe.text.chat_template import ROLES, ChatTemplate
from llmpipe.text.tokenizer import LoadedTokenizer

DEFAULT_MAX_TOKENS = 32
# Small, so that logging the model (MLflow runs it once on this example) stays quick.
# Short: MLflow answers it when the model is logged, and it must fit the smallest context a model has (a tiny
# preset on a tokenizer with few merges spends a token per byte).
INPUT_EXAMPLE = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0.0}


class BadRequest(MlflowException):
    """A refused request: the scoring server answers 400 with this message, and OpenAI's `error` object. (It
    prefixes any MlflowException's message with the whole request; this one keeps its own line.)"""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE,
                         error={"message": message, "type": "invalid_request_error"})

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not getattr(self, "_message", None):
            self._message = value


def conversation(messages: list[ChatMessage], roles: tuple[str, ...]) -> list[dict]:
    """The request's messages as the chat template takes them: role and text content."""
    if not messages:
        raise BadRequest("the request has no messages")
    turns = []
    for message in messages:
        if message.role not in roles:
            raise BadRequest(f"message role {message.role!r} is not supported; roles: {', '.join(roles)}")
        if not isinstance(message.content, str):
            raise BadRequest(f"a {message.role} message must have text content")
        turns.append({"role": message.role, "content": message.content})
    return turns


def sampling_settings(params: ChatParams):
    """ChatParams → the engine's SamplingSettings; refuses what this model cannot do."""
    refused = [name for name in ("stream", "tools", "frequency_penalty", "presence_penalty") if getattr(params, name)]
    if refused:
        raise BadRequest(f"not supported by this model: {', '.join(refused)} (the whole answer comes back at once)"
                          if refused == ["stream"] else f"not supported by this model: {', '.join(refused)}")
    max_tokens = DEFAULT_MAX_TOKENS if params.max_tokens is None else params.max_tokens
    if max_tokens < 1 or params.n < 1:
        raise BadRequest("max_tokens and n must be at least 1")
    top_p = 1.0 if params.top_p is None else float(params.top_p)
    if params.temperature < 0 or (params.top_k or 0) < 0 or not 0 < top_p <= 1:
        raise BadRequest("temperature and top_k must be at least 0, top_p in (0, 1]")
    return SamplingSettings(max_new_tokens=max_tokens, temperature=float(params.temperature),
                            top_k=params.top_k or 0, top_p=top_p)


def cut_at_stop(text: str, stop: list[str] | None) -> tuple[str, bool]:
    """The text up to the first stop string, and whether one was found."""
    ends = [text.find(s) for s in stop or () if s and s in text]
    return (text[:min(ends)], True) if ends else (text, False)


class LlmpipeChatModel(ChatModel):
    def load_context(self, context) -> None:
        self.tokenizer = LoadedTokenizer(context.artifacts["tokenizer"])
        self.template = ChatTemplate(self.tokenizer)
        self.model, _ = load_model(context.artifacts["model"], tokenizer=self.tokenizer,
                                   weights_file=referenced_weights(context.artifacts["model"]))
        self.name = (getattr(context, "model_config", None) or {}).get("model_name", "llmpipe")

    def predict(self, context, messages: list[ChatMessage], params: ChatParams) -> ChatCompletionResponse:
        """One conversation → `n` answers of the assistant, generated as one batch."""
        settings = sampling_settings(params)
        prompt = self.template.encode_prompt(conversation(messages, ROLES))
        context_length = self.model.config.context_length
        if len(prompt) >= context_length:  # never cut: the answer would be to a conversation the user did not send
            raise BadRequest(f"this model's context is {context_length} tokens and the messages take {len(prompt)}, "
                              "leaving no room for an answer: shorten the conversation")
        room = min(settings.max_new_tokens, context_length - len(prompt))  # an answer that fills it ends "length"
        settings = replace(settings, max_new_tokens=room)
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
            choices=choices, model=self.name, id=f"chatcmpl-{uuid.uuid4().hex}",
            usage=TokenUsageStats(prompt_tokens=len(prompt), completion_tokens=completion_tokens,
                                  total_tokens=len(prompt) + completion_tokens))


# MLflow 3 marks ChatModel deprecated in favour of ResponsesAgent, whose format is OpenAI's Responses API;
# its own documentation keeps ChatModel for models that must speak the chat-completions format, as this one does.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*ChatModel.*")
    mlflow.models.set_model(LlmpipeChatModel())
