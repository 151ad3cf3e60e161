"""The `llmpipe` command: tools around the pipeline's models.

    llmpipe compose [key=value ...]          write conf/, params.yaml (with overrides), dvc.yaml, docs/params.md
    llmpipe compose --check                  fail naming any of them that is stale
    llmpipe next-token "TEXT"                the most likely next tokens and their probabilities
    llmpipe generate "TEXT"                  continue a text (streams tokens)
    llmpipe model-size model=llama2_7b       parameters and memory of a preset, without allocating it
    llmpipe model-size --checkpoint DIR      the same for a Hugging Face checkpoint, from its config.json
    llmpipe chat ["QUESTION"]                chat with the fine-tuned model (interactive without a question)
    llmpipe sweep run NAME --seeds 1 2 3     the pipeline over seeds: each headline metric's mean / min / max

next-token and generate default to the pretrain stage's output (models/pretrained), chat to the
finetune stage's (models/finetuned); the tokenizer to models/tokenizer.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from llmpipe.config import layout
from llmpipe.config.compose import compose, write_params
from llmpipe.config.params import StageParams
from llmpipe.errors import PipelineError
from llmpipe.sweep import commands as sweep_commands

# Deferred imports: the commands that load a model import its modules inside themselves. Those import torch
# (~1.1 s) and the tokenizers library, which `llmpipe --help`, compose and sweep do without (~0.1 s to start).

DEFAULT_MODEL = str(layout.PRETRAINED)
DEFAULT_CHAT_MODEL = str(layout.FINETUNED)
DEFAULT_TOKENIZER = str(layout.TOKENIZER)


def cmd_compose(args: argparse.Namespace) -> None:
    # deferred: the stage table imports every settings module, torch with them (1.1 s); --help needs none
    from llmpipe.generate.derived import COMMAND, stale_files, write_derived_files

    root = Path.cwd()
    if args.params_only:
        write_params(compose(args.overrides, root / "conf"), root / "params.yaml")
        print("wrote params.yaml from conf/ as it is" + (f" with {' '.join(args.overrides)}" if args.overrides else ""))
        return
    if args.check:
        stale = stale_files(root)
        if stale:
            raise PipelineError(f"{', '.join(map(str, stale))}: stale, not what the settings dataclasses and the "
                                f"stage table give; run `{COMMAND}` and commit the result")
        print("conf/, params.yaml, dvc.yaml and docs/params.md are up to date")
        return
    changed = write_derived_files(root, args.overrides)
    print(f"wrote {', '.join(map(str, changed))}" if changed else "conf/, params.yaml, dvc.yaml and docs/params.md "
          "were up to date" + (f" (params.yaml with {' '.join(args.overrides)})" if args.overrides else ""))


def load_any_model(path: Path, tokenizer):
    """A model in any form the pipeline writes: a model directory (config.json + model.safetensors), a
    Hugging Face export (models/hf), or a GGUF file; checked to match the tokenizer."""
    # deferred: torch (top comment)
    from llmpipe.gguf.files import read_gguf_model
    from llmpipe.hf.checkpoint import read_hf_directory
    from llmpipe.model.weights import CONFIG_FILE, check_tokenizer, load_model

    if path.is_file() and path.suffix == ".gguf":
        return read_gguf_model(path, tokenizer)
    config = path / CONFIG_FILE
    if path.is_dir() and config.is_file():
        try:
            kind = json.loads(config.read_text("utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise PipelineError(f"{config}: not valid JSON ({exc})".splitlines()[0]) from None
        if isinstance(kind, dict) and "model" in kind:
            return load_model(path, tokenizer=tokenizer)[0]
        if isinstance(kind, dict) and "model_type" in kind:
            model = read_hf_directory(path)
            check_tokenizer(model.config, None, path, tokenizer)  # the vocabulary size, at least
            if (path / "tokenizer.json").is_file():  # an export carries its tokenizer: it must be this one
                from tokenizers import Tokenizer  # deferred (top comment)

                exported = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab(with_added_tokens=True)
                if exported != tokenizer.tokenizer.get_vocab(with_added_tokens=True):
                    raise PipelineError(f"{path} does not match {tokenizer.directory}: its tokenizer.json has another "
                                        "vocabulary; pass the matching --tokenizer")
            return model
    raise PipelineError(f"{path}: not a model the pipeline writes (a directory with config.json and "
                        "model.safetensors, a Hugging Face export such as models/hf, or a .gguf file)")


def _existing(path: str, flag: str, default: str) -> Path:
    if Path(path).exists():
        return Path(path)
    if path == default:
        raise PipelineError(f"{flag} {path}: not found; run llmpipe from the repository root after `dvc repro`, "
                            f"or pass {flag}")
    raise PipelineError(f"{flag} {path}: no such file or directory")


def _load(args: argparse.Namespace, default_model: str = DEFAULT_MODEL):
    from llmpipe.text.tokenizer import LoadedTokenizer  # deferred (top comment)

    tokenizer = LoadedTokenizer(_existing(args.tokenizer, "--tokenizer", DEFAULT_TOKENIZER))
    return load_any_model(_existing(args.model, "--model", default_model), tokenizer), tokenizer


def utf8_text(text: str, what: str) -> str:
    """A command-line argument or a line read from stdin, refused unless it is UTF-8 text (Python hands undecodable
    bytes over as lone surrogates, which no tokenizer takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = len(text[:exc.start].encode("utf-8", "surrogateescape"))
        raise PipelineError(f"{what} is not valid UTF-8 (byte {byte}); pass UTF-8 text") from None
    return text


def _prompt_ids(model, tokenizer, text: str, max_new_tokens: int = 1) -> list[int]:
    """The prompt's token ids; a long prompt keeps its end, leaving room for the answer (said on stderr)."""
    from llmpipe.model.generation import fit_prompt  # deferred: torch (top comment)

    if not utf8_text(text, "the prompt").strip():
        raise PipelineError("the prompt is empty (or only white space)")
    ids = tokenizer.encode(text)
    fitted = fit_prompt(ids, model.config.context_length, max_new_tokens)
    if len(fitted) < len(ids):
        print(f"note: the prompt is {len(ids)} tokens; the model reads at most {model.config.context_length}, "
              f"so only its last {len(fitted)} are used", file=sys.stderr)
    return fitted


def cmd_next_token(args: argparse.Namespace) -> None:
    from llmpipe.model.generation import (
        top_next_tokens,  # deferred: torch (top comment)
    )

    model, tokenizer = _load(args)
    ranked = top_next_tokens(model, _prompt_ids(model, tokenizer, args.text), args.top_k)
    print(f"{args.text!r} →")
    for token_id, probability in ranked:
        piece = tokenizer.token_strings([token_id])[0]
        print(f"  {probability * 100:6.2f}%  {piece!r}  (id {token_id})")


def _sampling(args: argparse.Namespace):
    from llmpipe.model.generation import (
        SamplingSettings,  # deferred: torch (top comment)
    )

    return SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def cmd_generate(args: argparse.Namespace) -> None:
    from llmpipe.model.generation import (  # deferred: torch (top comment)
        Engine,
        StreamingDecoder,
    )

    model, tokenizer = _load(args)
    engine = Engine(model, stop_ids={tokenizer.end_of_document_id, tokenizer.special_ids["end_of_turn"]})
    decoder = StreamingDecoder(tokenizer)
    prompt = _prompt_ids(model, tokenizer, args.text, args.max_new_tokens)
    sys.stdout.write(args.text)
    for token in engine.stream(prompt, _sampling(args)):
        sys.stdout.write(decoder.push(token))
        sys.stdout.flush()
    sys.stdout.write("\n")


def within_context(template, messages: list[dict], limit: int) -> tuple[list[dict], list[int]]:
    """The conversation without its oldest turns (a system message stays) until its prompt fits in `limit` tokens,
    or down to the last message; and that prompt."""
    prompt = template.encode_prompt(messages)
    while len(prompt) > limit and len(messages) > 1:  # forget the oldest turns
        messages = messages[2:] if messages[0]["role"] != "system" else messages[:1] + messages[3:]
        prompt = template.encode_prompt(messages)
    return messages, prompt


def stream_answer(model, tokenizer, template, messages: list[dict], settings) -> str:
    """Generate the assistant's turn for `messages`, printing it as it comes; returns its text."""
    from llmpipe.model.generation import (  # deferred: torch (top comment)
        Engine,
        StreamingDecoder,
        prompt_limit,
    )

    limit = prompt_limit(model.config.context_length, settings.max_new_tokens)
    messages, prompt = within_context(template, messages, limit)
    if len(prompt) > limit:
        print(f"note: the question is {len(prompt)} tokens; the model reads at most {model.config.context_length}, "
              f"so only its last {limit} are used", file=sys.stderr)
    decoder = StreamingDecoder(tokenizer)
    pieces = []
    engine = Engine(model, stop_ids={template.end_of_turn, tokenizer.end_of_document_id})
    for token in engine.stream(prompt, settings):
        piece = decoder.push(token)
        if not pieces:
            piece = piece.lstrip()  # the template puts one space after the role token
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(pieces)


def cmd_chat(args: argparse.Namespace) -> None:
    # deferred: torch (top comment)
    from llmpipe.model.generation import prompt_limit
    from llmpipe.text.chat_template import ChatTemplate

    if args.text is not None and not utf8_text(args.text, "the question").strip():
        raise PipelineError("the question is empty (or only white space); omit it for an interactive chat")
    model, tokenizer = _load(args, DEFAULT_CHAT_MODEL)
    template = ChatTemplate(tokenizer)
    settings = _sampling(args)
    history = [{"role": "system", "content": utf8_text(args.system, "--system")}] if args.system else []
    if args.text is not None:
        stream_answer(model, tokenizer, template, history + [{"role": "user", "content": args.text}], settings)
        return
    print(f"Chatting with {args.model} (empty line or Ctrl-D to quit).")
    history_limit = prompt_limit(model.config.context_length, settings.max_new_tokens)
    told = False
    for number in itertools.count(1):
        try:
            question = utf8_text(input("you> "), f"input line {number}").strip()
        except EOFError:
            print()
            return
        except UnicodeDecodeError as exc:
            raise PipelineError(f"input line {number} is not valid UTF-8 (byte {exc.start}); pass UTF-8 text") from None
        if not question:
            return
        turn = history + [{"role": "user", "content": question}]
        sys.stdout.write("model> ")
        answer = stream_answer(model, tokenizer, template, turn, settings)
        if args.history:  # kept within the context: the oldest turns go (said once)
            history = within_context(template, turn + [{"role": "assistant", "content": answer}], history_limit)[0]
            if len(history) < len(turn) + 1 and not told:
                told = True
                print(f"note: the conversation is longer than the model's {model.config.context_length}-token "
                      "context; its oldest turns are dropped as new ones come", file=sys.stderr)


def cmd_model_size(args: argparse.Namespace) -> None:
    # deferred: torch (top comment)
    from llmpipe.model.size import human_bytes, size_report
    from llmpipe.text.tokenizer import TokenizerSettings
    from llmpipe.train.settings import model_config

    if args.checkpoint:  # a Hugging Face checkpoint's config.json alone: no weights are read
        from llmpipe.hf.checkpoint import (
            read_hf_config,  # deferred: torch (top comment)
        )

        config = read_hf_config(args.checkpoint)
    else:
        composed = compose(args.overrides, args.config_dir)
        params = StageParams("model-size", composed, ["model", "tokenizer"],
                             source=f"{args.config_dir}/ with {' '.join(args.overrides) or 'no overrides'}")
        config = model_config(params, params.read(TokenizerSettings).vocab_size, preset_wins=True)
    report = size_report(config)
    if args.json:
        print(json.dumps({"model": config.to_dict(), **report}, indent=2))
        return
    print(f"{report['parameters']:,} parameters "
          f"({config.n_layer} layers, d_model {config.d_model}, {config.n_head} heads / {config.n_kv_head} KV heads, "
          f"vocabulary {config.vocab_size:,}, context {config.context_length:,})")
    print("weights:")
    for name, size in report["weights_bytes"].items():
        print(f"  {name:<12} {human_bytes(size):>12}")
    print(f"training with AdamW in fp32 (weights, gradients, 2 moments; no activations): "
          f"{human_bytes(report['training_adamw_fp32_bytes'])}")
    print(f"KV cache in bf16: {human_bytes(report['kv_cache_bf16_bytes_per_token'])} per token, "
          f"{human_bytes(report['kv_cache_bf16_bytes_per_token'] * config.context_length)} for the full context")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: llmpipe generate: argument --top-p: expected ...`, exit 2."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def number(kind: type, minimum=None, maximum=None, above=None):
    """An argparse type: an int or float within a range, with the range in the message."""
    words = " and ".join(w for w in (f">= {minimum}" if minimum is not None else "", f"> {above}" if above is not None
                                     else "", f"<= {maximum}" if maximum is not None else "") if w)
    expected = ("an integer" if kind is int else "a number") + (f" {words}" if words else "")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value != value or (minimum is not None and value < minimum) or (above is not None and value <= above) \
                or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value
    return parse


def sampling_options(command: argparse.ArgumentParser, max_new_tokens: int) -> None:
    command.add_argument("--max-new-tokens", type=number(int, minimum=1), default=max_new_tokens)
    command.add_argument("--temperature", type=number(float, minimum=0.0), default=0.0, help="0 = greedy (default)")
    command.add_argument("--top-k", type=number(int, minimum=0), default=0,
                         help="sample among the k most likely (0 = all)")
    command.add_argument("--top-p", type=number(float, above=0.0, maximum=1.0), default=1.0,
                         help="nucleus sampling mass (1 = off)")
    command.add_argument("--seed", type=int, default=0)


def model_options(command: argparse.ArgumentParser, default_model: str) -> None:
    command.add_argument("--model", default=default_model,
                         help=f"model directory, Hugging Face export or .gguf file (default {default_model})")
    command.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help=f"tokenizer directory (default {DEFAULT_TOKENIZER})")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="llmpipe", description="Tools around the llmpipe pipeline's models.",
                    formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    compose = commands.add_parser("compose", help="write conf/, params.yaml, dvc.yaml and docs/params.md from the "
                                                  "settings dataclasses and the stage table")
    compose.add_argument("overrides", nargs="*", help="Hydra overrides for params.yaml, e.g. data=local_files "
                                                      "tokenizer.vocab_size=2048")
    compose.add_argument("--check", action="store_true", help="write nothing; fail naming any stale file")
    compose.add_argument("--params-only", action="store_true", help="compose conf/ as it is into params.yaml, as "
                                                                   "`dvc exp run` does (after editing conf/ by hand)")
    compose.set_defaults(handler=cmd_compose)

    next_token = commands.add_parser("next-token", help="most likely next tokens with probabilities")
    next_token.add_argument("text", help="the prompt")
    model_options(next_token, DEFAULT_MODEL)
    next_token.add_argument("--top-k", type=number(int, minimum=1), default=10, help="how many tokens to show")
    next_token.set_defaults(handler=cmd_next_token)

    generate = commands.add_parser("generate", help="continue a text")
    generate.add_argument("text", help="the prompt")
    model_options(generate, DEFAULT_MODEL)
    sampling_options(generate, max_new_tokens=60)
    generate.set_defaults(handler=cmd_generate)

    chat = commands.add_parser("chat", help="chat with the fine-tuned model")
    chat.add_argument("text", nargs="?", help="a question to answer once (omit for an interactive session)")
    model_options(chat, DEFAULT_CHAT_MODEL)
    chat.add_argument("--system", help="a system message opening the conversation")
    chat.add_argument("--history", action="store_true",
                      help="keep earlier turns in the prompt (off by default: the default model is fine-tuned "
                           "on single questions)")
    sampling_options(chat, max_new_tokens=64)
    chat.set_defaults(handler=cmd_chat)

    size = commands.add_parser("model-size", help="parameter count and memory of a model preset")
    size.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=llama2_7b or model.n_layer=8")
    size.add_argument("--config-dir", default="conf")
    size.add_argument("--checkpoint", help="a Hugging Face checkpoint directory: size from its config.json")
    size.add_argument("--json", action="store_true", help="print JSON")
    size.set_defaults(handler=cmd_model_size)

    sweep = commands.add_parser("sweep", help="run the pipeline over seeds (DVC's queue) and summarise",
                                description=sweep_commands.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep_commands.add_sweep_commands(sweep)
    sweep.set_defaults(handler=cmd_sweep)
    return parser


def cmd_sweep(args: argparse.Namespace) -> None:
    sweep_commands.SWEEP_COMMANDS[args.sweep_command](args)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
