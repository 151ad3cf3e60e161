"""What pretraining alone makes answerable: QA accuracy in mixed training's plain form, no chat template.

The embedded world's pretraining text holds the fine-tuning people's questions and answers as plain lines
("Question: ... Answer: ...", llmpipe.data.world.PLAIN_QA). This asks every QA split's questions in that
form, greedy, and scores the answer's first line by exact match, as the finetune stage scores chat answers.
With the pretrained model, the held-out people's number is what pretraining made extractable; the
finetune stage's held-out accuracy (chat format) can be set against it (docs/seeds.md). Run it from the
repository root after `dvc repro finetune`, or after `dvc exp apply <experiment>` and `dvc checkout`:

    python benchmarks/plain_qa.py                     # the pretrained model
    python benchmarks/plain_qa.py --model finetuned   # the fine-tuned one, asked the plain way
"""

from __future__ import annotations

import argparse

from llmpipe.config import layout
from llmpipe.data.jsonl import read_rows
from llmpipe.data.world import PLAIN_QA
from llmpipe.eval.qa import score_answers
from llmpipe.model.generation import Engine, SamplingSettings
from llmpipe.model.weights import load_model
from llmpipe.text.tokenizer import LoadedTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pretrained", choices=["pretrained", "finetuned"])
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    tokenizer = LoadedTokenizer(layout.TOKENIZER)
    model, _ = load_model(layout.PRETRAINED if args.model == "pretrained" else layout.FINETUNED, tokenizer=tokenizer)
    engine = Engine(model.eval(), stop_ids={tokenizer.end_of_document_id})
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens)
    for split, path in layout.QA_FILES.items():
        pairs = read_rows(path)
        prompts = [tokenizer.encode(PLAIN_QA.format(question=p["question"], answer="").rstrip()) for p in pairs]
        answers = [tokenizer.decode(ids).split("\n")[0] for ids in engine.generate(prompts, settings)]
        metrics, _ = score_answers(pairs, answers, split)
        per_attribute = ", ".join(f"{key.removeprefix(split + '_')} {value:.3f}" for key, value in metrics.items()
                                  if key != split)
        print(f"{split}: {args.model} model, plain form, {len(pairs)} questions: {metrics[split]:.3f} "
              f"({per_attribute})")


if __name__ == "__main__":
    main()
