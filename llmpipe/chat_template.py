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

import torch

from llmpipe.model import IGNORE_INDEX
from llmpipe.tokenizer import LoadedTokenizer

ROLES = ("system", "user", "assistant")


@dataclass
class EncodedExample:
    ids: list[int]
    labels: list[int]       # IGNORE_INDEX where no loss is taken
    truncated: bool         # cut to the context length


class ChatTemplate:
    def __init__(self, tokenizer: LoadedTokenizer):
        self.tokenizer = tokenizer
        self.role_ids = {role: tokenizer.special_ids[role] for role in ROLES}
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

    def encode_examples(self, examples: list[dict], max_length: int) -> tuple[list[EncodedExample], int]:
        """Encode `{"messages": [...]}` examples for training; returns those that still have answer tokens
        after truncation to `max_length`, and how many were truncated (those left without any answer
        token are dropped)."""
        encoded = [self.encode_example(e["messages"], max_length) for e in examples]
        kept = [e for e in encoded if any(label != IGNORE_INDEX for label in e.labels)]
        return kept, sum(e.truncated for e in encoded)

    def jinja(self) -> str:
        """The same template in Jinja, for tools that format chats themselves (llama.cpp, transformers).
        Role and end-of-turn tokens are the configured special tokens (`tokenizer.special_tokens`)."""
        specials = {role: _jinja_string(token) for role, token in self.tokenizer.special_tokens.items()}
        role_token = "".join(f"{'{% if' if index == 0 else '{% elif'} message['role'] == '{role}' %}}{{{{ {specials[role]} }}}}"
                             for index, role in enumerate(ROLES)) + "{% endif %}"
        return ("{% for message in messages %}" + role_token + "{{ ' ' + message['content'] + "
                + specials["end_of_turn"] + " }}{% endfor %}{% if add_generation_prompt %}{{ "
                + specials["assistant"] + " }}{% endif %}")

    def render(self, messages: list[dict]) -> str:
        """The conversation as text, as `jinja()` renders it."""
        specials = self.tokenizer.special_tokens
        return "".join(f"{specials[m['role']]} {m['content']}{specials['end_of_turn']}" for m in messages)


def _jinja_string(text: str) -> str:
    """A Jinja string literal holding `text` exactly."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def pad_batch(examples: list[EncodedExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels) of shape (examples, longest): padded on the right, IGNORE_INDEX labels on the
    padding. Right padding needs no attention mask under causal attention: a real token only attends to
    earlier positions, never to the padding after it."""
    length = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, :len(example.ids)] = torch.tensor(example.ids)
        labels[row, :len(example.labels)] = torch.tensor(example.labels)
    return ids, labels
