"""Real vocabularies and llama.cpp's own converter, references that nobody here wrote, from the llama-cpp-python
sdist:
- llama.cpp's ggml-vocab-*.gguf files hold each vocabulary's tokens and merges, with test texts (.inp) and the
  ids the original tokenizer gives them (.out). The tokenizer.json each family ships (same tokens and merges, the
  family's pre-tokenizer) goes through the pipeline's import, and its encoding must give those ids; the GGUF
  metadata we would write (pre-tokenizer name, tokens, merges) must be the vocabulary file's.
- convert_hf_to_gguf.py converts a random checkpoint of each family carrying a real vocabulary; our F16 GGUF of
  the same checkpoint must have its architecture, tensor names, types, shapes and bytes, and its metadata
  (the extra keys we write aside).

The sdist (about 77 MB) is not in the repository: .ci/run downloads it with
`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d ~/.cache/llmpipe`; the test extracts the
few files it needs next to it and is skipped, with that command as the reason, where it is absent (under CI,
CI=true, it fails instead)."""

import json
import os
import struct
import tarfile
from pathlib import Path

import pytest
from harness import skip_outside_ci
from small_inputs import LLAMA3_TEMPLATE, QWEN_TEMPLATE, SPECIALS, byte_level_pipeline

from llmpipe.hf.tokenizer import import_tokenizer
from llmpipe.text.tokenizer import (
    LLAMA3_SPLIT,
    QWEN2_SPLIT,
    LoadedTokenizer,
    gguf_pre_tokenizer,
    save_tokenizer,
)

SDIST_NAME = "llama_cpp_python-0.3.36"
SDIST = Path(os.environ.get("LLMPIPE_LLAMA_CPP_SDIST",
                            Path.home() / ".cache" / "llmpipe" / f"{SDIST_NAME}.tar.gz"))
VOCABULARIES = {  # llama.cpp's vocabulary → the pre-tokenizer its family's tokenizer.json has
    "gpt-2": {"split": None, "nfc": False, "ignore_merges": False},
    "llama-bpe": {"split": LLAMA3_SPLIT, "nfc": False, "ignore_merges": True},  # as Llama 3's tokenizer.json
    "qwen2": {"split": QWEN2_SPLIT, "nfc": True, "ignore_merges": False},
}


METADATA_KEYS = ("model", "pre", "tokens", "merges", "scores", "token_type", "bos_token_id", "eos_token_id",
                 "add_bos_token")


def vocabulary(name: str) -> tuple[dict, list[str], list[list[int]]]:
    """ggml-vocab-`name`.gguf's tokenizer metadata (tokens, merges or scores, token types, pre, ids), its test texts and
    their ids; extracted once from the sdist into a cache beside it (the metadata as JSON: gguf's reader takes
    about a minute over a 150k-token list)."""
    if not SDIST.is_file():
        skip_outside_ci(f"{SDIST} not found: pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 "
                        f"-d {SDIST.parent}")
    cache = SDIST.parent / f"{SDIST_NAME}-vocab"
    base = cache / f"ggml-vocab-{name}"
    if not all(Path(f"{base}{suffix}").is_file() for suffix in (".json", ".inp", ".out")):
        import gguf

        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(SDIST) as archive:
            for suffix in (".gguf", ".gguf.inp", ".gguf.out"):
                member = archive.getmember(f"{SDIST_NAME}/vendor/llama.cpp/models/ggml-vocab-{name}{suffix}")
                Path(f"{base}{suffix}.part").write_bytes(archive.extractfile(member).read())
        fields = gguf.GGUFReader(f"{base}.gguf.part").fields
        metadata = {key: fields[f"tokenizer.ggml.{key}"].contents() for key in METADATA_KEYS
                    if f"tokenizer.ggml.{key}" in fields}
        Path(f"{base}.json.part").write_text(json.dumps(metadata), encoding="utf-8")
        for suffix in (".json", ".inp", ".out"):
            Path(f"{base}{'' if suffix == '.json' else '.gguf'}{suffix}.part").rename(f"{base}{suffix}")
        Path(f"{base}.gguf.part").unlink()
    metadata = json.loads(Path(f"{base}.json").read_text("utf-8"))
    texts = Path(f"{base}.inp").read_text("utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    expected = [[int(i) for i in line.split()] for line in Path(f"{base}.out").read_text("utf-8").split("\n")]
    return metadata, texts, expected[:len(texts)]


def family_tokenizer_json(metadata: dict, directory: Path, split: str | None, nfc: bool, ignore_merges: bool):
    """The tokenizer.json a checkpoint of this vocabulary ships: byte-level BPE with the GGUF's tokens and merges,
    its control tokens special, and its family's pre-tokenizer."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, models

    tokens = metadata["tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in metadata["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges,
                                     ignore_merges=ignore_merges))
    byte_level_pipeline(tokenizer, split, nfc)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token, kind in zip(tokens, metadata["token_type"])
                                  if kind == gguf.TokenType.CONTROL])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": tokens[metadata["eos_token_id"]]}))


@pytest.mark.parametrize("name", VOCABULARIES)
def test_a_real_vocabulary_encodes_llama_cpps_test_texts_to_the_original_ids(tmp_path, name):
    from llmpipe.gguf.files import _merges

    metadata, texts, expected = vocabulary(name)
    family_tokenizer_json(metadata, tmp_path / "ckpt", **VOCABULARIES[name])
    imported = import_tokenizer(tmp_path / "ckpt", SPECIALS)
    save_tokenizer(imported.tokenizer, imported.special_tokens, tmp_path / "tok", imported.chat_template,
                   imported.sequence_tokens)
    tokenizer = LoadedTokenizer(tmp_path / "tok")
    assert gguf_pre_tokenizer(tokenizer.tokenizer) == metadata["pre"] == name
    vocabulary_list = sorted(tokenizer.tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
    added = len(imported.added)  # the pipeline's chat tokens, after the vocabulary (no chat template here)
    assert [token for token, _ in vocabulary_list][:len(vocabulary_list) - added] == metadata["tokens"]
    assert _merges(tokenizer) == metadata["merges"]
    assert len(texts) >= 40
    mismatches = [(text, ids) for text, ids in zip(texts, expected) if tokenizer.encode(text) != ids]
    assert mismatches == []


def chat_template_file(name: str) -> str:
    """A real chat template from llama.cpp's models/templates/ in the sdist (extracted once into the cache)."""
    vocabulary("qwen2")  # skips where the sdist is absent
    path = SDIST.parent / f"{SDIST_NAME}-vocab" / name
    if not path.is_file():
        with tarfile.open(SDIST) as archive:
            member = archive.getmember(f"{SDIST_NAME}/vendor/llama.cpp/models/templates/{name}")
            Path(f"{path}.part").write_bytes(archive.extractfile(member).read())
        Path(f"{path}.part").rename(path)
    return path.read_text("utf-8")


def protobuf(*fields: tuple[int, object]) -> bytes:
    """A protobuf message from (field number, value): ints as varints, floats as fixed 32-bit, str/bytes
    length-delimited."""
    out = bytearray()

    def varint(number: int) -> None:
        while True:
            out.append((number & 0x7F) | (0x80 if number > 0x7F else 0))
            number >>= 7
            if not number:
                return

    for number, value in fields:
        if isinstance(value, float):
            varint(number << 3 | 5)
            out.extend(struct.pack("<f", value))
        elif isinstance(value, (str, bytes)):
            data = value.encode("utf-8") if isinstance(value, str) else value
            varint(number << 3 | 2)
            varint(len(data))
            out.extend(data)
        else:
            varint(number << 3)
            varint(int(value))
    return bytes(out)


MISTRAL_TEMPLATE = "mistralai-Mistral-Nemo-Instruct-2407.jinja"  # [INST]…[/INST]answer</s>, as Mistral's v1-v3


def sentencepiece_checkpoint_tokenizer(metadata: dict, directory: Path, chat_template: str | None = None,
                                      metaspace: bool = False) -> None:
    """The tokenizer files a Llama 2 / TinyLlama / Mistral v0.1 checkpoint ships, from ggml-vocab-llama-spm's pieces:
    tokenizer.model (SentencePiece's BPE model: each piece's text, score and type; identity normalization with a
    dummy "▁" prefix), the tokenizer.json transformers converted it to (LlamaTokenizerFast: BPE with byte fallback,
    merges ordered by the merged piece's score, Prepend + Replace "▁" normalizer, <s> added by its post-processor)
    and TinyLlama-1.1B-Chat's tokenizer_config.json (add_bos_token, <s>, </s>, </s> as padding). `metaspace`: the
    tokenizer.json as transformers 5's LlamaTokenizer writes it instead (a Metaspace pre-tokenizer that marks only
    the text's first word with "▁", nothing after a special token)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tokens, scores, types = metadata["tokens"], metadata["scores"], metadata["token_type"]
    directory.mkdir(parents=True, exist_ok=True)
    pieces = [(1, protobuf((1, token), (2, float(score)), (3, kind)))
              for token, score, kind in zip(tokens, scores, types)]
    trainer = protobuf((3, 2), (35, 1))  # model_type BPE, byte_fallback
    normalizer = protobuf((1, "identity"), (3, 1), (4, 0), (5, 1))  # add_dummy_prefix, keep spaces, escape them
    (directory / "tokenizer.model").write_bytes(protobuf(*pieces, (2, trainer), (3, normalizer)))
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores):  # transformers' SentencePieceExtractor
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(local, key=lambda merge: (vocab[merge[0]], vocab[merge[1]]))
    merges = [(left, right) for left, right, _ in sorted(merges, key=lambda merge: merge[2], reverse=True)]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    if metaspace:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in tokens[:3]])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
              "pad_token": "</s>", "unk_token": "<unk>", "legacy": False, "tokenizer_class": "LlamaTokenizer",
              "clean_up_tokenization_spaces": False,
              "added_tokens_decoder": {str(i): {"content": token, "lstrip": False, "normalized": False,
                                                "rstrip": False, "single_word": False, "special": True}
                                       for i, token in enumerate(tokens[:3])}}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def import_sentencepiece(tmp_path: Path, chat_template: str | None = None, metaspace: bool = False, **changes):
    """(llama-spm's metadata, its test texts, their ids, the pipeline's tokenizer, our model) for a random Llama 2
    shaped checkpoint built with transformers' LlamaForCausalLM carrying llama-spm's tokenizer files (its config
    `changes` from the tiny shape)."""
    import torch
    import transformers

    from llmpipe.hf.checkpoint import import_checkpoint

    metadata, texts, expected = vocabulary("llama-spm")
    sentencepiece_checkpoint_tokenizer(metadata, tmp_path / "ckpt", chat_template, metaspace)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{
        "vocab_size": len(metadata["tokens"]), "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, **changes})
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "ckpt")
    imported = import_tokenizer(tmp_path / "ckpt", SPECIALS)
    save_tokenizer(imported.tokenizer, imported.special_tokens, tmp_path / "tok", imported.chat_template,
                   imported.sequence_tokens, imported.sentencepiece)
    tokenizer = LoadedTokenizer(tmp_path / "tok")
    return metadata, texts, expected, tokenizer, import_checkpoint(tmp_path / "ckpt", tokenizer.vocab_size)


def test_llama_2s_sentencepiece_vocabulary_encodes_the_test_texts_to_the_original_ids_everywhere(tmp_path):
    """ggml-vocab-llama-spm (Llama 2, TinyLlama, Mistral v0.1): the tokenizer.model built from its pieces gives the
    .out ids in SentencePiece itself; the pipeline's tokenizer, and the HF export read back by AutoTokenizer,
    give them too; the export and the GGUF carry <s> (added before a text), </s> and the padding, and the GGUF
    SentencePiece's own pieces, scores and types."""
    import gguf
    import sentencepiece
    import transformers

    from llmpipe.gguf.files import plan_tensors, write_gguf
    from llmpipe.hf.export import write_hf_directory

    metadata, texts, expected, tokenizer, ours = import_sentencepiece(tmp_path)
    original = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "ckpt/tokenizer.model"))
    assert len(texts) >= 40
    assert [text for text, ids in zip(texts, expected) if original.encode(text) != ids] == []
    assert [text for text, ids in zip(texts, expected) if tokenizer.encode(text) != ids] == []

    write_hf_directory(tmp_path / "export", ours, tokenizer)
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    assert [text for text, ids in zip(texts, expected)
            if exported.encode(text, add_special_tokens=False) != ids] == []
    assert exported("Hello")["input_ids"] == [1, *expected[texts.index("Hello")]]  # <s> added, as Llama 2's
    assert (exported.bos_token, exported.eos_token, exported.pad_token) == ("<s>", "</s>", "</s>")
    config = json.loads((tmp_path / "export/config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)

    write_gguf(tmp_path / "m.gguf", ours, tokenizer, plan_tensors(ours, "F16", "Q4_0", None, None), "F16", "m")
    fields = {key: value for key, (_, value) in gguf_contents(tmp_path / "m.gguf")[0].items()}
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("llama", "default")
    chat_tokens = [SPECIALS[role] for role in ("system", "user", "assistant", "end_of_turn")]  # no template: added
    assert fields["tokenizer.ggml.tokens"][1] == metadata["tokens"] + chat_tokens
    added = [-1000.0] * len(chat_tokens)  # and <unk> <s> </s>, special in tokenizer.json: control, as the converter
    assert fields["tokenizer.ggml.scores"][1] == [-1000.0] * 3 + metadata["scores"][3:] + added
    assert fields["tokenizer.ggml.token_type"][1] == [gguf.TokenType.CONTROL] * 3 + metadata["token_type"][3:] + [
        gguf.TokenType.CONTROL] * len(chat_tokens)
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.padding_token_id"], fields["tokenizer.ggml.add_bos_token"]) == (1, 2, 2, True)
    assert "tokenizer.ggml.merges" not in fields


@pytest.mark.parametrize("metaspace", [False, True], ids=["as-sentencepiece", "as-transformers-5-writes-it"])
def test_a_mistral_chat_template_on_llama_2s_vocabulary_gives_transformers_ids(tmp_path, metaspace):
    """Mistral's real chat template ([INST]…[/INST]answer</s>) over the SentencePiece vocabulary: fine-tuning's ids
    are transformers' apply_chat_template ids for the checkpoint's tokenizer.json and for the HF export, the loss
    is on the answers and their </s>, and the GGUF carries the template. Also for a tokenizer.json in transformers
    5's own form (no "▁" after a special token), which AutoTokenizer reads as the checkpoint's LlamaTokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from llmpipe.hf.export import write_hf_directory
    from llmpipe.model.targets import IGNORE_INDEX
    from llmpipe.text.chat_template import ChatTemplate

    template = chat_template_file(MISTRAL_TEMPLATE)
    _, texts, _, tokenizer, ours = import_sentencepiece(tmp_path, template, metaspace)
    assert tokenizer.special_tokens == {"end_of_document": "</s>", "end_of_turn": "</s>"}
    messages = [{"role": "user", "content": "Where was Ada born?"}, {"role": "assistant", "content": "In Lisbon."},
                {"role": "user", "content": " And  Bo?\n"}, {"role": "assistant", "content": "In Porto, 1920."}]
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "ckpt/tokenizer.json"), bos_token="<s>",
                                        eos_token="</s>", chat_template=template)
    write_hf_directory(tmp_path / "export", ours, tokenizer)
    exported = AutoTokenizer.from_pretrained(tmp_path / "export")
    # transformers 5's LlamaTokenizer (the checkpoint's tokenizer_class) rebuilds the Metaspace form whatever the
    # file says: it is the checkpoint's own tokenizer only for that form
    references = (reference, exported, AutoTokenizer.from_pretrained(tmp_path / "ckpt")) if metaspace else (
        reference, exported)
    assert [text for text in texts if tokenizer.encode(text) != reference.encode(text, add_special_tokens=False)] == []
    chat = ChatTemplate(tokenizer)
    example = chat.encode_example(messages, 512)
    for hf in references:
        expected = hf.apply_chat_template(messages, tokenize=True)
        assert example.ids + [2] == list(expected["input_ids"] if hasattr(expected, "keys") else expected)
        prompt = hf.apply_chat_template(messages[:3], tokenize=True, add_generation_prompt=True)
        assert chat.encode_prompt(messages[:3]) == list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    learned = [token for token in example.labels if token != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "In Lisbon.</s>In Porto, 1920.</s>"
    assert chat.jinja() == template


LLAMA2_TEMPLATE = (  # Llama-2-chat's format: "[INST] question [/INST] answer </s>", a space before the end of turn
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'].strip()"
    " + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")


def test_a_turn_that_ends_in_a_space_and_eos_is_learned_to_its_end(tmp_path):
    """Llama 2's chat format closes an answer with " </s>": </s> is its end of turn, and the loss covers the
    answer, that space and </s>; the ids are transformers' for the checkpoint's tokenizer.json."""
    from transformers import PreTrainedTokenizerFast

    from llmpipe.model.targets import IGNORE_INDEX
    from llmpipe.text.chat_template import ChatTemplate

    *_, tokenizer, _ = import_sentencepiece(tmp_path, LLAMA2_TEMPLATE)
    assert tokenizer.special_tokens["end_of_turn"] == "</s>"
    messages = [{"role": "user", "content": "Where was Ada born?"}, {"role": "assistant", "content": "In Lisbon."},
                {"role": "user", "content": "And Bo?"}, {"role": "assistant", "content": "In Porto."}]
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "ckpt/tokenizer.json"), bos_token="<s>",
                                        eos_token="</s>", chat_template=LLAMA2_TEMPLATE)
    expected = reference.apply_chat_template(messages, tokenize=True)
    example = ChatTemplate(tokenizer).encode_example(messages, 512)
    assert example.ids + [2] == list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    learned = [token for token in example.labels if token != IGNORE_INDEX]
    assert tokenizer.tokenizer.id_to_token(learned[-1]) == "</s>" and learned.count(2) == 2
    assert tokenizer.decode(learned) == "In Lisbon. </s> In Porto. </s>"


CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py with its conversion/ and gguf-py/ packages, extracted once from the sdist."""
    vocabulary("qwen2")  # skips where the sdist is absent
    root = SDIST.parent / f"{SDIST_NAME}-converter"
    if not (root / "convert_hf_to_gguf.py").is_file():
        prefix = f"{SDIST_NAME}/vendor/llama.cpp/"
        temp = SDIST.parent / f".{root.name}.part"
        with tarfile.open(SDIST) as archive:
            for member in archive.getmembers():
                relative = member.name[len(prefix):]
                if member.isfile() and member.name.startswith(prefix) and relative.startswith(CONVERTER_FILES):
                    (temp / relative).parent.mkdir(parents=True, exist_ok=True)
                    (temp / relative).write_bytes(archive.extractfile(member).read())
        # It imports sentencepiece before it looks for a tokenizer.model, which these checkpoints do not have.
        (temp / "stub").mkdir(exist_ok=True)
        (temp / "stub/sentencepiece.py").write_text("class SentencePieceProcessor:\n    pass\n")
        temp.rename(root)
    return root


GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


def gguf_contents(path: Path) -> tuple[dict, dict]:
    """A GGUF file's metadata ({key: (type, value)}, arrays as (element type, list)) and tensors ({name: (type,
    shape, data bytes up to the next tensor's)}), read in one pass: gguf.GGUFReader takes tens of seconds over a
    150k-token list, building a view per element."""
    import struct

    data = Path(path).read_bytes()
    position = 0

    def take(fmt: str):
        nonlocal position
        (value,) = struct.unpack_from(fmt, data, position)
        position += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal position
        length = take("<Q")
        position += length
        return data[position - length:position].decode("utf-8")

    def value(kind: int):
        if kind == GGUF_STRING:
            return string()
        if kind == GGUF_ARRAY:
            element, count = take("<I"), take("<Q")
            return element, [value(element) for _ in range(count)]
        return take(GGUF_SCALARS[kind])

    magic, version = take("<4s"), take("<I")
    assert (magic, version) == (b"GGUF", 3), f"{path}: not a GGUF v3 file"
    tensor_count, field_count = take("<Q"), take("<Q")
    fields = {}
    for _ in range(field_count):
        key, kind = string(), take("<I")
        fields[key] = (kind, value(kind))
    infos = []
    for _ in range(tensor_count):
        name, dims = string(), take("<I")
        infos.append((name, tuple(take("<Q") for _ in range(dims)), take("<I"), take("<Q")))
    alignment = fields.get("general.alignment", (4, 32))[1]
    start = position + (-position % alignment)
    ends = sorted(offset for *_, offset in infos)[1:] + [len(data) - start]
    end_of = dict(zip(sorted(offset for *_, offset in infos), ends))
    tensors = {name: (kind, shape, data[start + offset:start + end_of[offset]]) for name, shape, kind, offset in infos}
    return fields, tensors


LLAMA3_CONFIG = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "chat_template": LLAMA3_TEMPLATE}
QWEN_CONFIG = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": QWEN_TEMPLATE}
CONVERTED = {  # model_type, transformers class, the real vocabulary its family uses, tokenizer_config.json, config ids
    "llama": ("llama", "LlamaForCausalLM", "llama-bpe", LLAMA3_CONFIG, {"bos_token_id": 128000, "eos_token_id": 128001}),
    "llama-2": ("llama", "LlamaForCausalLM", "llama-spm", None, {"bos_token_id": 1, "eos_token_id": 2}),
    "mistral": ("mistral", "MistralForCausalLM", "llama-bpe", LLAMA3_CONFIG,
                {"bos_token_id": 128000, "eos_token_id": 128001, "sliding_window": None}),
    "mistral-v0.2": ("mistral", "MistralForCausalLM", "llama-spm", None,
                     {"bos_token_id": 1, "eos_token_id": 2, "sliding_window": None}),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", "qwen2", QWEN_CONFIG,
              {"bos_token_id": 151643, "eos_token_id": 151645, "tie_word_embeddings": True}),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", "qwen2", QWEN_CONFIG,
              {"bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 32}),
}
# The converter names a pre-tokenizer by hashing the ids transformers gives a test text: for our Llama 3 tokenizer.json
# (which gives llama.cpp's llama-bpe test ids, above) under transformers 5.24 that hash is the one it lists as
# "smaug-bpe", so that key alone is not compared for the llama-bpe vocabulary.
PRE_TOKENIZER_NOT_COMPARED = {"llama-bpe"}


@pytest.mark.slow  # minutes: gguf's reader parses 150k-token lists element by element
@pytest.mark.parametrize("family", CONVERTED)
def test_our_f16_gguf_is_what_llama_cpps_converter_writes(tmp_path, family):
    import subprocess
    import sys

    import torch
    import transformers

    from llmpipe.gguf.files import plan_tensors, write_gguf
    from llmpipe.hf.checkpoint import import_checkpoint

    model_type, class_name, name, tokenizer_config, ids = CONVERTED[family]
    script = converter()
    metadata, _, _ = vocabulary(name)
    checkpoint = tmp_path / "ckpt"
    if name == "llama-spm":  # tokenizer.model, tokenizer.json and tokenizer_config.json, as Llama 2 ships them
        sentencepiece_checkpoint_tokenizer(metadata, checkpoint, chat_template_file(MISTRAL_TEMPLATE))
    else:
        family_tokenizer_json(metadata, checkpoint, **VOCABULARIES[name])
        (checkpoint / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **{
        "vocab_size": len(metadata["tokens"]), "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
        "rope_theta": 500000.0, "tie_word_embeddings": False, **ids})
    model = getattr(transformers, class_name)(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:  # biases and norms random too
                parameter.normal_(1.0, 0.5)
    model.save_pretrained(checkpoint)
    reference = tmp_path / "reference.gguf"
    # The converter reads a tokenizer.model with SentencePiece itself; the byte-level checkpoints need only the stub.
    paths = ("gguf-py", ".") if name == "llama-spm" else ("gguf-py", ".", "stub")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(str(script / d) for d in paths)}
    subprocess.run([sys.executable, str(script / "convert_hf_to_gguf.py"), str(checkpoint), "--outtype", "f16",
                    "--outfile", str(reference)], check=True, env=environment, capture_output=True, timeout=600)

    imported = import_tokenizer(checkpoint, SPECIALS)
    save_tokenizer(imported.tokenizer, imported.special_tokens, tmp_path / "tok", imported.chat_template,
                   imported.sequence_tokens, imported.sentencepiece)
    tokenizer = LoadedTokenizer(tmp_path / "tok")
    ours = import_checkpoint(checkpoint, tokenizer.vocab_size)
    write_gguf(tmp_path / "ours.gguf", ours, tokenizer, plan_tensors(ours, "F16", "Q4_0", None, None), "F16", "m")
    (theirs, theirs_tensors), (mine, mine_tensors) = (gguf_contents(path) for path in (reference, tmp_path / "ours.gguf"))
    assert sorted(mine_tensors) == sorted(theirs_tensors)
    for tensor_name, tensor in theirs_tensors.items():
        assert mine_tensors[tensor_name] == tensor, tensor_name  # type, shape and bytes
    ignored = {"general.name", "general.size_label", "general.type", "general.quantization_version",
               *({"tokenizer.ggml.pre"} if name in PRE_TOKENIZER_NOT_COMPARED else ())}
    shared = (set(theirs) & set(mine)) - ignored
    assert set(theirs) - ignored <= shared  # every key the converter writes, we write
    assert {key: mine[key] for key in shared} == {key: theirs[key] for key in shared}  # types and values
