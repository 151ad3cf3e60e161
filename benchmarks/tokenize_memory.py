"""Peak memory and speed of prepare → train_tokenizer → tokenize on corpora of growing size.

For each size (in GB) it writes a synthetic text corpus (paragraphs of sentences drawn from a Zipf-weighted
list of made-up words with a seeded generator: varied text, not one repeated line) as .txt files into a
temporary copy of this repository (the git-tracked files, `data=local_files`), runs the three stage scripts
there as a user would (`python stages/<stage>.py`, each in a fresh process), and prints per size: the
documents and tokens written, seconds, tokens per second of tokenize, and the peak resident memory (RSS)
of each stage. Flat RSS across sizes is the point: prepare and tokenize stream, train_tokenizer reads
a bounded sample (tokenizer.train_sample_bytes).

    python benchmarks/tokenize_memory.py                        # 0.25, 0.5 and 1 GB (about 2 GB of disk)
    python benchmarks/tokenize_memory.py --sizes 0.01 0.02      # a quick check
    python benchmarks/tokenize_memory.py --workdir /big/disk --keep

Peak RSS is `getrusage(RUSAGE_CHILDREN).ru_maxrss` of a small wrapper process that runs one stage: the
largest resident set of the stage's process (and of any child it waits for).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "train_tokenizer", "tokenize_text")
FILE_BYTES = 64 * 1000 * 1000  # corpus file size
WORDS_PER_CHUNK = 1 << 20
MEASURE = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[2:]).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=open(sys.argv[1], "w"))
sys.exit(code)
"""


def word_list(rng: np.random.Generator, count: int = 20000) -> list[str]:
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    words = {"".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(count * 2)}
    return sorted(words)[:count]


def write_corpus(directory: Path, total_bytes: int, seed: int) -> int:
    """Text files of paragraphs (documents) of sentences; returns the bytes written."""
    rng = np.random.default_rng(seed)
    words = word_list(rng)
    # Each word as itself, ending a sentence, or ending a sentence and a paragraph.
    forms = np.array(words + [w + "." for w in words] + [w + ".\n\n" for w in words], dtype=object)
    probabilities = 1.0 / np.arange(1, len(words) + 1)
    probabilities /= probabilities.sum()
    directory.mkdir(parents=True, exist_ok=True)
    written, part = 0, 0
    while written < total_bytes:
        with open(directory / f"part-{part:04d}.txt", "w", encoding="utf-8") as handle:
            file_bytes = 0
            while file_bytes < min(FILE_BYTES, total_bytes - written):
                index = rng.choice(len(words), size=WORDS_PER_CHUNK, p=probabilities)
                ends = rng.random(WORDS_PER_CHUNK)
                kind = (ends < 1 / 12).astype(np.int64) + (ends < 1 / 12 / 8)  # ~12 words a sentence, ~8 a paragraph
                text = " ".join(forms[index + kind * len(words)].tolist()).replace("\n\n ", "\n\n")
                handle.write(text + " ")
                file_bytes += len(text) + 1
        written += file_bytes
        part += 1
    return written


def make_repo(destination: Path, corpus_glob: str) -> None:
    """The git-tracked files, configured for local files (as `dvc exp run -S data=local_files` would)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    subprocess.run([sys.executable, "-m", "llmpipe.cli", "compose", "data=local_files", f"data.paths=[{corpus_glob}]"],
                   cwd=destination, env=environment(destination), check=True, capture_output=True)
    for command in (["init", "-q"], ["add", "-A"], ["-c", "user.name=bench", "-c", "user.email=bench@invalid",
                                                      "commit", "-qm", "benchmark copy"]):
        subprocess.run(["git", *command], cwd=destination, check=True)


def environment(repo: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "LLMPIPE_"))}
    env["PYTHONPATH"] = str(repo)
    return env


def run_stage(repo: Path, stage: str) -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of one stage script in a fresh process."""
    rss_file = repo / f".rss-{stage}"
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", MEASURE, str(rss_file), sys.executable, f"stages/{stage}.py"],
                            cwd=repo, env=environment(repo), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"error: stages/{stage}.py failed:\n{result.stderr[-3000:]}")
    return seconds, int(rss_file.read_text()) * 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="corpus sizes in GB")
    parser.add_argument("--workdir", type=Path, default=None, help="where the repository copy goes (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the copy and its outputs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="llmpipe-bench-", dir=args.workdir))
    repo = workdir / "repo"
    make_repo(repo, "user_data/bench/*.txt")
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPU cores, Python "
          f"{platform.python_version()}; repository copy in {repo}", flush=True)
    header = (f"{'corpus GB':>9} {'documents':>10} {'tokens':>12} {'prepare s':>9} {'prepare RSS':>11} "
              f"{'tokenizer s':>11} {'tokenizer RSS':>13} {'tokenize s':>10} {'tokens/s':>10} {'tokenize RSS':>12}")
    rows = []
    try:
        for size in args.sizes:
            corpus = repo / "user_data" / "bench"
            shutil.rmtree(corpus, ignore_errors=True)
            written = write_corpus(corpus, int(size * 1e9), args.seed)
            results = {stage: run_stage(repo, stage) for stage in STAGES}
            meta = json.loads((repo / "data/tokens/meta.json").read_text())
            tokens = sum(split["tokens"] for split in meta["splits"].values())
            documents = sum(split["documents"] for split in meta["splits"].values())
            (prep_s, prep_rss), (tok_s, tok_rss), (enc_s, enc_rss) = (results[s] for s in STAGES)
            rows.append(f"{written / 1e9:>9.3f} {documents:>10,} {tokens:>12,} {prep_s:>9.1f} {prep_rss / 2**20:>8.0f} MiB "
                        f"{tok_s:>11.1f} {tok_rss / 2**20:>10.0f} MiB {enc_s:>10.1f} {tokens / enc_s:>10,.0f} "
                        f"{enc_rss / 2**20:>9.0f} MiB")
            print(header if len(rows) == 1 else "", rows[-1], sep="\n" if len(rows) == 1 else "", flush=True)
            sample = json.loads((repo / "reports/tokenizer_details.json").read_text())
            print(f"#   tokenizer sample: {sample['train_sample_documents']:,} documents, "
                  f"{sample['train_sample_bytes']:,} bytes, whole corpus: {sample['train_sample_whole_corpus']}; "
                  f"shards: " + ", ".join(f"{name} {len(split['shards'])}" for name, split in meta["splits"].items()),
                  flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
