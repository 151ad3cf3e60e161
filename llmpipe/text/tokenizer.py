"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with the pipeline's special tokens.

The tokenizer directory holds `tokenizer.json` (the `tokenizers` file, readable by transformers and
llama.cpp exporters) and `special_tokens.json`, which maps each role of a special token
(end_of_document, user, assistant, system, end_of_turn) to its string, for the chat template. A tokenizer
imported from a checkpoint also keeps that checkpoint's chat template (`chat_template.json`) and the tokens
that frame its sequences (`sequence_tokens.json`: BOS, EOS, padding, whether it adds BOS itself), which the
exports carry (`LoadedTokenizer.sequence_tokens`), and for a SentencePiece-style tokenizer the scores and types of
its tokenizer.model's pieces (`sentencepiece.json`), which the GGUF carries.
Training reads a bounded sample of the text (`TextSample`: the first documents up to a number of UTF-8
bytes, streamed), so a corpus larger than memory trains in bounded time and memory.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llmpipe.atomic import json_text
from llmpipe.config.params import params_section, setting
from llmpipe.errors import InputDataError, SettingError

BYTE_ALPHABET_SIZE = 256
CHAT_TEMPLATE_FILE = "chat_template.json"
SEQUENCE_TOKENS_FILE = "sequence_tokens.json"
SENTENCEPIECE_FILE = "sentencepiece.json"


@dataclass(frozen=True)
class SequenceTokens:
    """The tokens that frame a sequence for the tools that run an exported model (transformers, llama.cpp): its
    beginning (BOS; None when the tokenizer has none), its end (EOS), the end of a chat turn (EOT: generation
    stops there too), padding (or None), and whether the tokenizer puts BOS before a text itself. An imported
    checkpoint's own; for the pipeline's tokenizer, end_of_document begins and pads, end_of_turn ends, no BOS
    is added (the pipeline places ids itself)."""
    bos: str | None
    eos: str
    end_of_turn: str
    pad: str | None
    add_bos: bool


@dataclass(frozen=True)
class SpecialTokens:
    end_of_document: str = setting("<|endoftext|>", "separates documents in the token stream")
    system: str = setting("<|system|>", "starts a system turn in the chat template")
    user: str = setting("<|user|>", "starts a user turn")
    assistant: str = setting("<|assistant|>", "starts an assistant turn")
    end_of_turn: str = setting("<|end|>", "ends a turn; generation stops here in chat")

    def __post_init__(self):
        if len(set(asdict(self).values())) != len(fields(self)):
            raise ValueError("each role needs a distinct token string")

    def by_role(self) -> dict[str, str]:
        return asdict(self)


SPECIAL_TOKEN_ROLES = tuple(f.name for f in fields(SpecialTokens))


@params_section("tokenizer")
@dataclass(frozen=True)
class TokenizerSettings:
    vocab_size: int = setting(1024, "tokens in the vocabulary, including 256 byte tokens and the special tokens",
                              max=1 << 31)
    min_frequency: int = setting(2, "a pair must occur at least this often to be merged", min=1)
    train_sample_bytes: int | None = setting(200000000, "BPE learns from the first documents up to this many UTF-8 "
                                                        "bytes (null = all)", min=1)
    special_tokens: SpecialTokens = setting(SpecialTokens(), "strings of the special tokens, by role")

    def __post_init__(self):
        minimum = minimum_vocab_size(self.special_tokens.by_role())
        if self.vocab_size < minimum:
            raise SettingError("vocab_size", f"expected at least {minimum} (256 byte tokens + {minimum - 256} special "
                                             f"tokens), got {self.vocab_size}")
EXAMPLE_STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "uncharacteristically",
    "Tokenization splits text into pieces.",
    "1234567 + 89 = 1234656",
    "Ünïcödé and emoji 🙂",
]


def minimum_vocab_size(special_tokens: dict[str, str]) -> int:
    return BYTE_ALPHABET_SIZE + len(set(special_tokens.values()))


class TextSample:
    """The first documents of `texts` whose UTF-8 size adds up to at most `max_bytes` (None: every document;
    the first document is always taken), streamed once into the BPE trainer. A prefix, not a random sample:
    it is deterministic, reads only what it uses and holds nothing (a reservoir sample would read the whole
    corpus and hold the sample); shuffled sources (the embedded world, a mixed corpus) make a prefix
    representative, and a corpus sorted by topic should be shuffled first. After iteration: `documents`,
    `utf8_bytes`, and `whole_corpus` (no document was left out)."""

    def __init__(self, texts: Iterable[str], max_bytes: int | None):
        self.texts, self.max_bytes = texts, max_bytes
        self.documents = self.utf8_bytes = 0
        self.whole_corpus = True

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            size = len(text.encode("utf-8"))
            if self.max_bytes is not None and self.documents and self.utf8_bytes + size > self.max_bytes:
                self.whole_corpus = False
                return
            self.documents += 1
            self.utf8_bytes += size
            yield text

    def report(self) -> dict[str, int | bool]:
        return {"train_sample_documents": self.documents, "train_sample_bytes": self.utf8_bytes,
                "train_sample_whole_corpus": self.whole_corpus}


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int,
              special_tokens: dict[str, str]) -> Tokenizer:
    """Train a byte-level BPE: every byte is in the vocabulary, so any text encodes without <unk>."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(dict.fromkeys(special_tokens[role] for role in SPECIAL_TOKEN_ROLES)),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


# Pre-tokenizers llama.cpp recognizes by name (GGUF `tokenizer.ggml.pre`), by their split pattern in tokenizer.json
# (a Split followed by a ByteLevel without its own regex). Qwen2's differs from Llama 3's in single digits.
LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
                "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace("\\p{N}{1,3}", "\\p{N}")
GGUF_PRE_TOKENIZERS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
SUPPORTED_KINDS = ("byte-level BPE with the GPT-2 pre-tokenizer (GPT-2, this pipeline's own), Llama 3's (Llama 3.x) "
                   "or Qwen2's (Qwen2, Qwen2.5, Qwen3); SentencePiece-style BPE with byte fallback (Llama 2, "
                   "TinyLlama, Mistral v0.1-v0.3)")
SPIECE_UNDERLINE = "\u2581"  # SentencePiece's space


def gguf_pre_tokenizer(tokenizer: Tokenizer) -> str | None:
    """llama.cpp's name for this byte-level BPE's pre-tokenizer ("gpt-2", "llama-bpe", "qwen2"), or None."""
    spec = json.loads(tokenizer.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers") or []
    if pre.get("type") == "Sequence" and len(steps) == 2 and steps[0].get("type") == "Split" \
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True):
        return GGUF_PRE_TOKENIZERS.get(steps[0].get("pattern", {}).get("Regex"))
    return None


def is_sentencepiece_bpe(tokenizer: Tokenizer) -> bool:
    """Whether this is a SentencePiece-style BPE as Llama 2, TinyLlama and Mistral ship it (transformers'
    LlamaTokenizerFast): BPE over characters with byte fallback, spaces written as "▁" and one "▁" put before
    the text, either by a Prepend + Replace normalizer (the original SentencePiece behaviour) or by a Metaspace
    pre-tokenizer that does not split on spaces (as transformers 5 writes it)."""
    spec = json.loads(tokenizer.to_str())
    model, normalizer, pre = spec.get("model") or {}, spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
    decoder = [step.get("type") for step in (spec.get("decoder") or {}).get("decoders", [])]
    if model.get("type") != "BPE" or not model.get("byte_fallback") \
            or decoder[:3] != ["Replace", "ByteFallback", "Fuse"]:
        return False
    spaces = {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_UNDERLINE}
    prepend = {"type": "Prepend", "prepend": SPIECE_UNDERLINE}
    if not pre and normalizer.get("type") == "Sequence":
        return normalizer.get("normalizers") == [prepend, spaces]
    return not normalizer and pre.get("type") == "Metaspace" and pre.get("replacement") == SPIECE_UNDERLINE \
        and not pre.get("split", True) and pre.get("prepend_scheme") in ("first", "always")


def gguf_tokenizer_model(tokenizer: Tokenizer) -> tuple[str, str] | None:
    """llama.cpp's tokenizer model and pre-tokenizer for this tokenizer (GGUF `tokenizer.ggml.model`, `.pre`):
    ("gpt2", "gpt-2" | "llama-bpe" | "qwen2") for byte-level BPE, ("llama", "default") for SentencePiece-style;
    None for a kind llama.cpp would not tokenize alike."""
    if is_sentencepiece_bpe(tokenizer):
        return "llama", "default"
    pre = gguf_pre_tokenizer(tokenizer)
    return None if pre is None else ("gpt2", pre)


def save_tokenizer(tokenizer: Tokenizer, special_tokens: dict[str, str], directory: Path,
                   chat_template: dict | None = None, sequence_tokens: dict | None = None,
                   sentencepiece: dict | None = None) -> None:
    """`chat_template`, `sequence_tokens` ({bos, eos, pad, add_bos}) and `sentencepiece` ({tokens, scores, types} of
    a tokenizer.model): an imported checkpoint's own."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "special_tokens.json").write_text(json_text(special_tokens), encoding="utf-8")
    if chat_template is not None:  # an imported checkpoint's own chat format
        (directory / CHAT_TEMPLATE_FILE).write_text(json_text(chat_template), encoding="utf-8")
    if sequence_tokens is not None:
        (directory / SEQUENCE_TOKENS_FILE).write_text(json_text(sequence_tokens), encoding="utf-8")
    if sentencepiece is not None:
        (directory / SENTENCEPIECE_FILE).write_text(json_text(sentencepiece), encoding="utf-8")


class LoadedTokenizer:
    """A trained tokenizer plus its special-token ids, as later stages use it."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        for name in ("tokenizer.json", "special_tokens.json"):
            if not (directory / name).is_file():
                raise InputDataError(f"{directory / name}: not found; run the train_tokenizer stage first "
                                     "(dvc repro train_tokenizer)")
        try:
            self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
            self.special_tokens: dict[str, str] = json.loads((directory / "special_tokens.json").read_text("utf-8"))
        except Exception as exc:
            raise InputDataError(f"{directory}: not a valid tokenizer ({exc})".splitlines()[0]) from None
        if not isinstance(self.special_tokens, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.special_tokens.items()) \
                or not {"end_of_document", "end_of_turn"} <= set(self.special_tokens):
            raise InputDataError(f"{directory / 'special_tokens.json'}: expected an object mapping roles (at least "
                                 "end_of_document and end_of_turn) to token strings; rerun the train_tokenizer stage")
        self.directory = directory
        template_path = directory / CHAT_TEMPLATE_FILE
        self.chat_template: dict | None = (json.loads(template_path.read_text("utf-8"))
                                           if template_path.is_file() else None)
        self.special_ids = {role: self.tokenizer.token_to_id(token) for role, token in self.special_tokens.items()}
        missing = [role for role, token_id in self.special_ids.items() if token_id is None]
        if missing:
            raise InputDataError(f"{directory / 'tokenizer.json'}: special tokens {missing} are not in the vocabulary")
        self.sequence_tokens = self._read_sequence_tokens(directory / SEQUENCE_TOKENS_FILE)
        pieces_path = directory / SENTENCEPIECE_FILE
        self.sentencepiece: dict | None = json.loads(pieces_path.read_text("utf-8")) if pieces_path.is_file() else None

    def _read_sequence_tokens(self, path: Path) -> SequenceTokens:
        specials = self.special_tokens
        if not path.is_file():  # the pipeline's own tokenizer
            return SequenceTokens(bos=specials["end_of_document"], eos=specials["end_of_turn"],
                                  end_of_turn=specials["end_of_turn"], pad=specials["end_of_document"], add_bos=False)
        try:
            values = json.loads(path.read_text("utf-8"))
            tokens = SequenceTokens(bos=values["bos"], eos=values["eos"], end_of_turn=specials["end_of_turn"],
                                    pad=values["pad"], add_bos=values["add_bos"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputDataError(f"{path}: expected an object with bos, eos, pad and add_bos ({exc!r}); rerun the "
                                 "train_tokenizer stage") from None
        unknown = [token for token in (tokens.bos, tokens.eos, tokens.pad)
                   if token is not None and self.tokenizer.token_to_id(token) is None]
        if unknown or not isinstance(tokens.eos, str) or not isinstance(tokens.add_bos, bool):
            raise InputDataError(f"{path}: expected bos/pad as tokens of the vocabulary or null, eos a token, "
                                 f"add_bos true or false; got {values}")
        return tokens

    def token_id(self, token: str | None) -> int | None:
        """A token's id, None for None."""
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def fingerprint(self) -> str:
        """A short hash of what the tokenizer does (vocabulary, merges, pre-tokenizer, special tokens):
        every model records the fingerprint of the tokenizer it was trained with."""
        content = self.tokenizer.to_str() + json.dumps(self.special_tokens, sort_keys=True)
        return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]

    @property
    def end_of_document_id(self) -> int:
        return self.special_ids["end_of_document"]

    def encode(self, text: str) -> list[int]:
        """Plain text → ids. A special token's string inside the text is just text (user data cannot inject
        chat structure or end a document early), and no post-processor adds a BOS: ids are placed explicitly."""
        self.tokenizer.encode_special_tokens = True
        try:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        finally:
            self.tokenizer.encode_special_tokens = False

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts at once, on the tokenizers library's threads."""
        self.tokenizer.encode_special_tokens = True
        try:
            return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        finally:
            self.tokenizer.encode_special_tokens = False

    def encode_run(self, text: str, at_start: bool) -> tuple[list[int], list[tuple[int, int]]]:
        """Text that runs between two special tokens of a rendered chat, as transformers encodes that stretch of the
        whole rendering: ids and each one's character span in `text` (a special token's string is text here).
        `at_start`: whether it begins the rendering (a Metaspace that marks only the first word with "▁" marks
        it only then)."""
        pre = self.tokenizer.pre_tokenizer
        first_only = isinstance(pre, pre_tokenizers.Metaspace) and pre.prepend_scheme == "first" and not at_start
        self.tokenizer.encode_special_tokens = True
        if first_only:
            pre.prepend_scheme = "never"
        try:
            encoding = self.tokenizer.encode(text, add_special_tokens=False)
            return encoding.ids, encoding.offsets
        finally:
            self.tokenizer.encode_special_tokens = False
            if first_only:
                pre.prepend_scheme = "first"

    def encode_markup(self, text: str) -> list[int]:
        """Template text (a chat template's headers) → ids, its special tokens' strings read as those tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each token as the text it stands for (bytes decoded; partial UTF-8 shown as �; a SentencePiece "▁"
        as the space it stands for, which decoding a token by itself would strip)."""
        if not self.is_sentencepiece:
            return [self.tokenizer.decode([i], skip_special_tokens=False) for i in ids]
        return [self.tokenizer.id_to_token(i).replace(SPIECE_UNDERLINE, " ") if self.tokenizer.id_to_token(i)[:1]
                == SPIECE_UNDERLINE else self.tokenizer.decode([i], skip_special_tokens=False) for i in ids]

    @cached_property
    def is_sentencepiece(self) -> bool:
        return is_sentencepiece_bpe(self.tokenizer)


def tokenizer_metrics(tokenizer: LoadedTokenizer, validation_texts: Iterable[str],
                      batch_size: int = 1000) -> dict[str, float]:
    """Vocabulary size, characters per token and tokens per 100 words on the validation text (streamed)."""
    characters = words = tokens = 0
    texts = iter(validation_texts)
    while batch := list(itertools.islice(texts, batch_size)):
        characters += sum(len(t) for t in batch)
        words += sum(len(t.split()) for t in batch)
        tokens += sum(len(ids) for ids in tokenizer.encode_batch(batch))
    return {
        "vocab_size": tokenizer.vocab_size,
        "validation_characters_per_token": characters / max(tokens, 1),
        "validation_tokens_per_100_words": 100 * tokens / max(words, 1),
    }


def longest_learned_tokens(tokenizer: LoadedTokenizer, count: int) -> list[str]:
    special = set(tokenizer.special_ids.values())
    learned = [i for i in tokenizer.tokenizer.get_vocab().values() if i not in special]
    decoded = sorted(((tokenizer.decode([i]), i) for i in learned), key=lambda x: (-len(x[0]), x[1]))
    return [text for text, _ in decoded[:count]]
