"""The chat template, built from the tokenizer's special tokens, and its loss mask.

    <|system|> SYSTEM<|end|>            (optional)
    <|user|> QUESTION<|end|>
    <|assistant|> ANSWER<|end|>

Content follows its role token after one space, because a byte-level BPE learns words as they appear
inside running text (" Paris", with the space): an answer encoded without it would use other tokens
than the ones that carry the model's pretraining knowledge.

Token ids are assembled piece by piece (role token, encoded content, end-of-turn token), so text that
happens to contain "<|end|>" is never read as a control token. Labels are IGNORE_INDEX everywhere
except on the assistant's content and its closing end-of-turn token: the model learns to answer and to
stop, never to predict the question.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmpipe.model import IGNORE_INDEX
from llmpipe.tokenizer import LoadedTokenizer


@dataclass
class EncodedExample:
    ids: list[int]
    labels: list[int]       # IGNORE_INDEX where no loss is taken
    truncated: bool         # cut to the context length


class ChatTemplate:
    def __init__(self, tokenizer: LoadedTokenizer):
        self.tokenizer = tokenizer
        self.role_ids = {role: tokenizer.special_ids[role] for role in ("system", "user", "assistant")}
        self.end_of_turn = tokenizer.special_ids["end_of_turn"]

    def _turns(self, messages: list[dict]) -> list[tuple[list[int], bool]]:
        """(ids, is_answer) pieces in order."""
        pieces = []
        for message in messages:
            answer = message["role"] == "assistant"
            pieces.append(([self.role_ids[message["role"]]], False))
            pieces.append((self.tokenizer.encode(" " + message["content"]) + [self.end_of_turn], answer))
        return pieces

    def encode_example(self, messages: list[dict], max_length: int) -> EncodedExample:
        ids, labels = [], []
        for piece, is_answer in self._turns(messages):
            ids += piece
            labels += piece if is_answer else [IGNORE_INDEX] * len(piece)
        # Position t predicts token t+1: the label of input t is the token that follows it.
        inputs, targets = ids[:-1], labels[1:]
        truncated = len(inputs) > max_length
        return EncodedExample(inputs[:max_length], targets[:max_length], truncated)

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """The conversation so far, followed by the assistant's role token: where generation starts."""
        ids = [token for piece, _ in self._turns(messages) for token in piece]
        return ids + [self.role_ids["assistant"]]

    def jinja(self) -> str:
        """The same template in Jinja, for tools that format chats themselves (llama.cpp, transformers)."""
        specials = self.tokenizer.special_tokens
        return ("{% for message in messages %}{{ '<|' + message['role'] + '|> ' + message['content'] + '"
                + specials["end_of_turn"] + "' }}{% endfor %}{% if add_generation_prompt %}{{ '"
                + specials["assistant"] + "' }}{% endif %}")

    def render(self, messages: list[dict]) -> str:
        specials = self.tokenizer.special_tokens
        return "".join(f"{specials[m['role']]} {m['content']}{specials['end_of_turn']}" for m in messages)
