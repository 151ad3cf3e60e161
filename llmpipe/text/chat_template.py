"""The chat template and its loss mask: the pipeline's own format, or an imported checkpoint's.

The pipeline's format, built from the tokenizer's special tokens (`tokenizer.special_tokens`):

    <|system|> SYSTEM<|end|>            (optional)
    <|user|> QUESTION<|end|>
    <|assistant|> ANSWER<|end|>

A checkpoint imported with `base_model=hf` brings its own Jinja template (ChatML, Llama 3, ...), which
the tokenizer directory keeps (chat_template.json); both are handled alike. The template is rendered in
Jinja's sandbox with each message's content replaced by a marker: the text between markers is the
template's (role headers and end-of-turn tokens); each content is text (a special token's string in it
stays text). The rendering is encoded as transformers encodes it: split at the template's special tokens,
each run of text between two of them encoded as a whole (so a byte-level BPE keeps " Paris" with its space,
and a SentencePiece-style tokenizer puts its "▁" where transformers does), and each token goes to the
content it overlaps.

Labels are IGNORE_INDEX everywhere except on the assistant's content and what closes its turn (the template
text after it, up to its end-of-turn token): the model learns to answer and to stop, never to predict the
question.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from llmpipe.errors import InputDataError
from llmpipe.model.targets import IGNORE_INDEX
from llmpipe.text.tokenizer import LoadedTokenizer

if TYPE_CHECKING:
    import torch

ROLES = ("system", "user", "assistant")
_MARK = "\ue000{}\ue001"  # private-use characters: never in real text
_MARKER = re.compile("\ue000(\\d+)\ue001")


@dataclass
class EncodedExample:
    ids: list[int]
    labels: list[int]       # IGNORE_INDEX where no loss is taken
    truncated: bool         # cut to the context length


def pipeline_jinja(special_tokens: dict[str, str]) -> str:
    """The pipeline's own format in Jinja, from the configured special tokens."""
    specials = {role: _jinja_string(token) for role, token in special_tokens.items()}
    role_token = "".join(f"{'{% if' if index == 0 else '{% elif'} message['role'] == '{role}' %}}{{{{ {specials[role]} }}}}"
                         for index, role in enumerate(ROLES)) + "{% endif %}"
    return ("{% for message in messages %}" + role_token + "{{ ' ' + message['content'] + "
            + specials["end_of_turn"] + " }}{% endfor %}{% if add_generation_prompt %}{{ "
            + specials["assistant"] + " }}{% endif %}")


def _jinja_string(text: str) -> str:
    """A Jinja string literal holding `text` exactly."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def compile_template(source: str):
    """A Jinja chat template compiled in a sandbox (a checkpoint's template is untrusted code)."""
    # deferred: Jinja's sandbox takes ~40 ms to import; train_tokenizer imports this module without rendering
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(source)


class ChatTemplate:
    def __init__(self, tokenizer: LoadedTokenizer):
        self.tokenizer = tokenizer
        imported = tokenizer.chat_template or {}
        self.source = imported.get("template") or pipeline_jinja(tokenizer.special_tokens)
        self.bos_token = imported.get("bos_token") or tokenizer.special_tokens["end_of_document"]
        self.eos_token = imported.get("eos_token") or tokenizer.special_tokens["end_of_turn"]
        self.end_of_turn = tokenizer.special_ids["end_of_turn"]

    @cached_property
    def _compiled(self):
        return compile_template(self.source)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text, as tools that format chats themselves render it."""
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token, eos_token=self.eos_token)

    @cached_property
    def _special_split(self) -> re.Pattern:
        """Splits template text at the tokenizer's added tokens (as `tokenizers` does before anything else)."""
        added = sorted((token.content for token in self.tokenizer.tokenizer.get_added_tokens_decoder().values()
                        if not token.normalized), key=len, reverse=True)
        return re.compile("(" + "|".join(map(re.escape, added)) + ")") if added else re.compile("(?!)")

    def _pieces(self, messages: list[dict], add_generation_prompt: bool) -> list[tuple[list[int], int | None]]:
        """(ids, index of the message whose content they are, or None for template text), in order."""
        marked = [{**message, "content": _MARK.format(index)} for index, message in enumerate(messages)]
        parts = _MARKER.split(self.render(marked, add_generation_prompt))  # text, index, text, index, ..., text
        tokens: list[tuple[int, int | None]] = []  # (id, owner)
        run, spans = "", []  # the text since the last special token; its contents' (start, end, index)
        for position, part in enumerate(parts):
            if position % 2:
                content = messages[int(part)]["content"]
                spans.append((len(run), len(run) + len(content), int(part)))
                run += content
                continue
            for number, chunk in enumerate(self._special_split.split(part)):  # text, special, text, ...
                if number % 2 == 0:
                    run += chunk
                    continue
                tokens += self._encode_run(run, spans, at_start=not tokens)
                tokens.append((self.tokenizer.tokenizer.token_to_id(chunk), None))
                run, spans = "", []
        tokens += self._encode_run(run, spans, at_start=not tokens)
        return [([token for token, _ in group], owner)
                for owner, group in itertools.groupby(tokens, key=lambda token: token[1])]

    def _encode_run(self, run: str, spans: list[tuple[int, int, int]], at_start: bool) -> list[tuple[int, int | None]]:
        """A run of text between special tokens as (id, index of the content the token overlaps or None)."""
        if not run:
            return []
        ids, offsets = self.tokenizer.encode_run(run, at_start)
        return [(token, next((index for first, last, index in spans if start < last and end > first), None))
                for token, (start, end) in zip(ids, offsets)]

    def encode_example(self, messages: list[dict], max_length: int) -> EncodedExample:
        ids, labels, closing = [], [], False
        for piece, index in self._pieces(messages, add_generation_prompt=False):
            ids += piece
            if index is not None:
                closing = messages[index]["role"] == "assistant"
                labels += piece if closing else [IGNORE_INDEX] * len(piece)
                continue
            for token in piece:  # template text after an answer is learned up to its end-of-turn token
                labels.append(token if closing else IGNORE_INDEX)
                closing = closing and token != self.end_of_turn
        # Position t predicts token t+1: the label of input t is the token that follows it.
        inputs, targets = ids[:-1], labels[1:]
        truncated = len(inputs) > max_length
        return EncodedExample(inputs[:max_length], targets[:max_length], truncated)

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """The conversation so far, followed by the assistant's header: where generation starts."""
        return [token for piece, _ in self._pieces(messages, add_generation_prompt=True) for token in piece]

    def encode_examples(self, examples: list[dict], max_length: int) -> tuple[list[EncodedExample], int]:
        """Encode `{"messages": [...]}` examples for training; returns those that still have answer tokens
        after truncation to `max_length`, and how many were truncated (those left without any answer
        token are dropped)."""
        encoded = [self.encode_example(e["messages"], max_length) for e in examples]
        kept = [e for e in encoded if any(label != IGNORE_INDEX for label in e.labels)]
        return kept, sum(e.truncated for e in encoded)

    def markup_special_ids(self) -> set[int]:
        """The special tokens the template's own text uses (role headers, end of turn), found by rendering a
        system/user/assistant exchange (without the system turn where the template refuses one)."""
        special = {token_id for token_id, token in self.tokenizer.tokenizer.get_added_tokens_decoder().items()
                   if token.special} | set(self.tokenizer.special_ids.values())
        probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        for messages in ([{"role": "system", "content": "s"}, *probe], probe):
            try:
                pieces = self._pieces(messages, add_generation_prompt=False)
            except Exception:  # noqa: BLE001, S112 (a template that refuses a system turn raises its own error)
                continue
            return {token for ids, index in pieces if index is None for token in ids if token in special}
        return set()

    def jinja(self) -> str:
        """The template's Jinja source, for tools that format chats themselves (llama.cpp, transformers)."""
        return self.source


def pad_batch(examples: list[EncodedExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels) of shape (examples, longest): padded on the right, IGNORE_INDEX labels on the
    padding. Right padding needs no attention mask under causal attention: a real token only attends to
    earlier positions, never to the padding after it."""
    import torch  # here: train_tokenizer reads this module's template checks and starts ~1.5 s sooner without torch

    length = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, :len(example.ids)] = torch.tensor(example.ids)
        labels[row, :len(example.labels)] = torch.tensor(example.labels)
    return ids, labels


def end_of_turn_token(template: dict, tokenizer, where) -> str:
    """The special token that closes an assistant turn in a Jinja chat template (ChatML's <|im_end|>,
    Llama 3's <|eot_id|>): generation stops there, and fine-tuning learns to produce it."""
    probe = [{"role": "user", "content": _MARK.format(0)}, {"role": "assistant", "content": _MARK.format(1)}]
    try:
        rendered = compile_template(template["template"]).render(
            messages=probe, add_generation_prompt=False, bos_token=template.get("bos_token", ""),
            eos_token=template.get("eos_token", ""))
    except Exception as exc:  # a template error, or one that refuses the probe conversation
        raise InputDataError(f"{where}: the chat template does not render a user/assistant exchange ({exc})"
                             .splitlines()[0]) from None
    after = _MARKER.split(rendered)[-1].lstrip()  # Llama 2 closes a turn with " </s>"
    ids = tokenizer.encode(after, add_special_tokens=False).ids if after else []
    specials = {token.content for token in tokenizer.get_added_tokens_decoder().values() if token.special}
    first = tokenizer.id_to_token(ids[0]) if ids else None
    if first not in specials:
        raise InputDataError(f"{where}: the chat template closes an assistant turn with {after[:20]!r}, not with a "
                             "special token; such templates are not supported")
    return first
