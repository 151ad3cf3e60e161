"""The `llmpipe` command: tools around the pipeline's models.

    llmpipe compose [key=value ...]          compose conf/ into params.yaml (what `dvc exp run -S` does)
    llmpipe next-token "TEXT"                the most likely next tokens and their probabilities
    llmpipe generate "TEXT"                  continue a text (streams tokens)
    llmpipe model-size model=llama2_7b       parameters and memory of a preset, without allocating it
    llmpipe chat ["QUESTION"]                chat with the fine-tuned model (interactive without a question)

next-token and generate default to the pretrain stage's output (models/pretrained), chat to the
finetune stage's (models/finetuned); the tokenizer to models/tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys

from llmpipe.pipeline import layout
from llmpipe.pipeline.errors import PipelineError

DEFAULT_MODEL = str(layout.PRETRAINED)
DEFAULT_CHAT_MODEL = str(layout.FINETUNED)
DEFAULT_TOKENIZER = str(layout.TOKENIZER)


def cmd_compose(args: argparse.Namespace) -> None:
    from llmpipe.pipeline.compose import compose, write_params

    params = compose(args.overrides, args.config_dir)
    write_params(params, args.output)
    print(f"wrote {args.output} from {args.config_dir}/" + (f" with {' '.join(args.overrides)}" if args.overrides else ""))


def _load(args: argparse.Namespace):
    from llmpipe.model_io import load_model
    from llmpipe.tokenizer import LoadedTokenizer

    tokenizer = LoadedTokenizer(args.tokenizer)
    model, _ = load_model(args.model)
    if model.config.vocab_size != tokenizer.vocab_size:
        raise PipelineError(f"{args.model} has a {model.config.vocab_size}-token vocabulary but {args.tokenizer} "
                            f"has {tokenizer.vocab_size}; pass the matching --tokenizer")
    return model, tokenizer


def _prompt_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text)
    if not ids:
        raise PipelineError("the prompt is empty")
    return ids


def cmd_next_token(args: argparse.Namespace) -> None:
    from llmpipe.generate import top_next_tokens

    model, tokenizer = _load(args)
    ranked = top_next_tokens(model, _prompt_ids(tokenizer, args.text), args.top_k)
    print(f"{args.text!r} →")
    for token_id, probability in ranked:
        piece = tokenizer.decode([token_id])
        print(f"  {probability * 100:6.2f}%  {piece!r}  (id {token_id})")


def _sampling(args: argparse.Namespace):
    from llmpipe.generate import SamplingSettings

    return SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def cmd_generate(args: argparse.Namespace) -> None:
    from llmpipe.generate import Engine, StreamingDecoder

    model, tokenizer = _load(args)
    engine = Engine(model, stop_ids={tokenizer.end_of_document_id, tokenizer.special_ids["end_of_turn"]})
    decoder = StreamingDecoder(tokenizer)
    sys.stdout.write(args.text)
    for token in engine.stream(_prompt_ids(tokenizer, args.text), _sampling(args)):
        sys.stdout.write(decoder.push(token))
        sys.stdout.flush()
    sys.stdout.write("\n")


def stream_answer(model, tokenizer, template, messages: list[dict], settings) -> str:
    """Generate the assistant's turn for `messages`, printing it as it comes; returns its text."""
    from llmpipe.generate import Engine, StreamingDecoder

    prompt = template.encode_prompt(messages)
    while len(prompt) >= model.config.context_length and len(messages) > 1:  # forget the oldest turns
        messages = messages[2:] if messages[0]["role"] != "system" else messages[:1] + messages[3:]
        prompt = template.encode_prompt(messages)
    prompt = prompt[-(model.config.context_length - 1):]
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
    from llmpipe.chat_template import ChatTemplate

    model, tokenizer = _load(args)
    template = ChatTemplate(tokenizer)
    settings = _sampling(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    if args.text:
        stream_answer(model, tokenizer, template, history + [{"role": "user", "content": args.text}], settings)
        return
    print(f"Chatting with {args.model} (empty line or Ctrl-D to quit).")
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            print()
            return
        if not question:
            return
        turn = history + [{"role": "user", "content": question}]
        sys.stdout.write("model> ")
        answer = stream_answer(model, tokenizer, template, turn, settings)
        if args.history:
            history = turn + [{"role": "assistant", "content": answer}]


def cmd_model_size(args: argparse.Namespace) -> None:
    from llmpipe.model_size import human_bytes, size_report
    from llmpipe.pipeline.compose import compose
    from llmpipe.pipeline.params import StageParams
    from llmpipe.train.settings import model_config

    composed = compose(args.overrides, args.config_dir)
    params = StageParams("model-size", composed, ["model", "tokenizer.vocab_size"])
    vocab = params.get("model.vocab_size") or params.int("tokenizer.vocab_size", min=1)
    config = model_config(params, vocab)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmpipe", description="Tools around the llmpipe pipeline's models.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    compose = commands.add_parser("compose", help="compose conf/ into params.yaml")
    compose.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=local_files tokenizer.vocab_size=2048")
    compose.add_argument("--config-dir", default="conf")
    compose.add_argument("--output", default="params.yaml")
    compose.set_defaults(handler=cmd_compose)

    def model_options(command: argparse.ArgumentParser) -> None:
        command.add_argument("text", help="the prompt")
        command.add_argument("--model", default=DEFAULT_MODEL, help=f"model directory (default {DEFAULT_MODEL})")
        command.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help=f"tokenizer directory (default {DEFAULT_TOKENIZER})")

    next_token = commands.add_parser("next-token", help="most likely next tokens with probabilities")
    model_options(next_token)
    next_token.add_argument("--top-k", type=int, default=10, help="how many tokens to show")
    next_token.set_defaults(handler=cmd_next_token)

    generate = commands.add_parser("generate", help="continue a text")
    model_options(generate)
    generate.add_argument("--max-new-tokens", type=int, default=60)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    generate.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0 = all)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(handler=cmd_generate)

    chat = commands.add_parser("chat", help="chat with the fine-tuned model")
    chat.add_argument("text", nargs="?", help="a question to answer once (omit for an interactive session)")
    chat.add_argument("--model", default=DEFAULT_CHAT_MODEL, help=f"model directory (default {DEFAULT_CHAT_MODEL})")
    chat.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help=f"tokenizer directory (default {DEFAULT_TOKENIZER})")
    chat.add_argument("--system", help="a system message opening the conversation")
    chat.add_argument("--history", action="store_true",
                      help="keep earlier turns in the prompt (off by default: the default model is fine-tuned "
                           "on single questions)")
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    chat.add_argument("--top-k", type=int, default=0)
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--seed", type=int, default=0)
    chat.set_defaults(handler=cmd_chat)

    size = commands.add_parser("model-size", help="parameter count and memory of a model preset")
    size.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=llama2_7b or model.n_layer=8")
    size.add_argument("--config-dir", default="conf")
    size.add_argument("--json", action="store_true", help="print JSON")
    size.set_defaults(handler=cmd_model_size)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
