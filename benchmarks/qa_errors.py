"""Where a fine-tuned model's wrong answers come from: a namesake's fact, someone else's, or no one's.

Answers the questions of one QA split (held-out people by default) with the workspace's fine-tuned model
and sorts the wrong answers by whose fact they are (llmpipe.eval.qa.namesake_answers). Run it from the
repository root after `dvc repro finetune`, or after `dvc exp apply <experiment>` and `dvc checkout` to
look at one experiment of a sweep:

    python benchmarks/qa_errors.py
    python benchmarks/qa_errors.py --split validation_people
"""

from __future__ import annotations

import argparse
import json

from llmpipe.config import layout
from llmpipe.data.jsonl import read_rows
from llmpipe.eval.qa import namesake_answers, qa_accuracy
from llmpipe.model.weights import load_model
from llmpipe.text.chat_template import ChatTemplate
from llmpipe.text.tokenizer import LoadedTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="heldout_people", choices=sorted(layout.QA_FILES))
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    tokenizer = LoadedTokenizer(layout.TOKENIZER)
    model, _ = load_model(layout.FINETUNED, tokenizer=tokenizer)
    pairs = read_rows(layout.QA_FILES[args.split])
    people = json.loads(layout.WORLD.read_text("utf-8"))
    metrics, results = qa_accuracy(model, ChatTemplate(tokenizer), pairs, args.max_new_tokens, args.split)
    counts = namesake_answers(results, pairs, people)
    print(f"{args.split}: {len(pairs)} questions, accuracy {metrics[args.split]:.3f}, {counts['wrong']} wrong")
    sources = {"same_last_name": "a person with the same last name", "same_first_name": "a person with the same "
               "first name (another last name)", "someone_else": "someone else", "no_one": "no one"}
    for source, label in sources.items():
        print(f"  the fact of {label}: {counts[source]}")


if __name__ == "__main__":
    main()
