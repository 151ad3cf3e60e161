"""The pipeline on a ~1B-parameter model, stage by stage: wall time, peak memory, longest silence.

Makes a Llama-shaped checkpoint with random weights through transformers (`LlamaForCausalLM(config)
.save_pretrained`, TinyLlama's shape by default, the vocabulary of the pipeline's own tokenizer, whose
tokenizer.json goes with it: nothing is downloaded), then runs the real pipeline on it in a temporary copy of
this repository through `dvc exp run`: import (`base_model=hf`) → finetune (LoRA, then chat_tokens as a second
experiment: finetune onwards) → quantize (every default variant) → evaluate → registry, with the large-model
settings of docs/scaling.md, "A 1B model through every stage" (LARGE_MODEL below).

While DVC runs, every process of a stage is sampled twice a second: its peak resident memory (VmHWM in /proc:
file pages it maps, such as memory-mapped weights, count too) and the system load. Printed per stage: wall
seconds from DVC's "Running stage" line to the next (DVC's hashing and caching of the outputs included), peak
RSS in GiB and in multiples of the checkpoint's weights (bytes per weight × parameters), and the longest time
without an output line. Then the
disk that the weights take: DVC's cache, the workspace, MLflow's store.

    python benchmarks/scale.py                       # TinyLlama's shape, 973M parameters: ~50 GB of disk
    python benchmarks/scale.py --layers 2 --d-model 256 --ffn 512 --heads 4 --kv-heads 2   # a quick check
    python benchmarks/scale.py --pretrain-large 200  # instead: the `large` preset, 200 pretraining steps
    python benchmarks/scale.py --dtype bf16 --lora-only --set finetune.lora.base_bits=4   # bf16 kept, QLoRA
    python benchmarks/scale.py --preset llama2-7b --checkpoint /data/llama2-7b-random   # Llama 2 7B's shape

`--preset llama2-7b` is Llama 2 7B's shape (32 layers × 4,096, FFN 11,008, 32 heads, context 4,096, a 32,000-token
vocabulary; 6.74B parameters, 13.5 GB in bf16) under QLoRA, with two GGUF variants (Q8_0, Q4_K): see PRESETS.
The checkpoint's tokenizer is the pipeline's own, retrained by `tokenizers` to `--vocab` tokens on the pipeline's
text plus seeded pseudo-words (the embedded text alone gives ~2,500): a real vocabulary's size, not a real
vocabulary. `--checkpoint DIR` keeps the checkpoint there and reuses it on the next run (it is hard-linked into
the copy). The copy's DVC cache links files instead of copying them (`cache.type hardlink`): each weights file is
on disk once, in the cache, and the workspace names it (stages write new files and rename them, so nothing ever
writes into a linked file).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = "base_models/scale"
# The large-model settings (docs/scaling.md, "A 1B model through every stage"): bounded measurement, a few
# fine-tuning steps, the registry naming the weights in DVC's cache instead of copying them.
LARGE_MODEL = [
    "pretrain.eval_max_tokens=512",
    "finetune.max_steps=10", "finetune.global_batch_sequences=4", "finetune.micro_batch_sequences=4",
    "finetune.warmup_steps=2", "finetune.eval_every=10", "finetune.log_every=1", "finetune.checkpoint_every=0",
    "finetune.max_questions_per_split=10", "finetune.max_validation_examples=8", "finetune.measure_base=false",
    "finetune.pad_prompts=true", "finetune.max_new_tokens=12", "finetune.sample_answers=4",
    "evaluate.max_questions_per_split=10", "evaluate.pad_prompts=true", "evaluate.max_new_tokens=12",
    "evaluate.eval_max_tokens=256", "evaluate.kl_max_tokens=256", "evaluate.generation_tokens=4",
    "evaluate.measure_base=false", "evaluate.registry_weights=dvc_cache",
]
# Shapes people fine-tune, with the settings that fit them in 23 GiB of memory on 2 cores (13B does not yet:
# this script builds the checkpoint whole in memory, and finetune holds the merged model whole).
PRESETS = {
    "llama2-7b": {"shape": {"layers": 32, "d_model": 4096, "ffn": 11008, "heads": 32, "kv_heads": 32,
                            "context": 4096}, "vocab": 32000, "dtype": "bf16",
                  "set": ["finetune.lora.base_bits=4", "finetune.max_steps=3", "finetune.warmup_steps=1",
                          "finetune.eval_every=3", "finetune.max_questions_per_split=4",
                          "finetune.max_validation_examples=4", "quantize.variants=[Q8_0,Q4_K]", "~quantize.embeddings.Q2_K",
                          "evaluate.max_questions_per_split=4", "evaluate.eval_max_tokens=128",
                          "evaluate.kl_max_tokens=128", "evaluate.generation_tokens=4",
                          "pretrain.eval_max_tokens=128"]},
}
STAGE_SCRIPT = re.compile(r"stages/(\w+)\.py")
RUNNING = re.compile(r"Running stage '(\w+)'")


def environment(repo: Path = ROOT) -> dict:
    """The environment for running `repo`'s code: its llmpipe first on the path, no MLflow/DVC settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "LLMPIPE_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def make_repo(destination: Path) -> None:
    """The git-tracked files of this repository, committed in a fresh git repository."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    (destination / "dvc.lock").unlink(missing_ok=True)
    for command in (["init", "-q"], ["add", "-A"], ["-c", "user.name=bench", "-c", "user.email=bench@invalid",
                                                      "commit", "-qm", "benchmark copy"]):
        subprocess.run(["git", *command], cwd=destination, check=True)


def checkpoint_tokenizer(repo: str, vocab: int | None, directory: Path) -> tuple[str, int]:
    """(end-of-text token, vocabulary size) of the tokenizer.json written into `directory`: the pipeline's own
    (models/tokenizer of the copy), or with `vocab`, the same tokenizer retrained to that many tokens on the
    pipeline's text plus seeded pseudo-words (byte-level BPE keeps merging while pairs repeat)."""
    import random

    from tokenizers import Tokenizer, pre_tokenizers, trainers

    from llmpipe.text.tokenizer import LoadedTokenizer

    pipeline = LoadedTokenizer(Path(repo) / "models/tokenizer")
    tokenizer = Tokenizer.from_file(str(pipeline.directory / "tokenizer.json"))
    if vocab:
        texts = [json.loads(line)["text"] for line in
                 (Path(repo) / "data/prepared/pretrain_train.jsonl").read_text("utf-8").splitlines()]
        generator = random.Random(0)
        syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiouy"]
        words = ["".join(generator.choices(syllables, k=generator.randint(1, 5))) for _ in range(60_000)]
        texts += [" ".join(words[i:i + 50]) for i in range(0, len(words), 50)] * 3
        specials = [token for _, token in sorted(tokenizer.get_added_tokens_decoder().items())]
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[t.content for t in specials],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tokenizer.train_from_iterator(texts, trainer)
        if tokenizer.get_vocab_size() != vocab:
            raise SystemExit(f"error: the retrained tokenizer has {tokenizer.get_vocab_size()} tokens, not {vocab}")
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return pipeline.special_tokens["end_of_document"], tokenizer.get_vocab_size()


def write_checkpoint(repo: str, directory: str, shape: dict, dtype: str, vocab: int | None) -> dict:
    """(in a child process) `directory`: random LlamaForCausalLM weights of `shape`, made and stored in `dtype`
    (fp32 or bf16: a 7B model is never built in fp32 first), and its tokenizer (checkpoint_tokenizer), with its
    end-of-text token as eos."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = Path(directory)
    eos, vocab_size = checkpoint_tokenizer(repo, vocab, directory)
    eos_id = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json")).convert_tokens_to_ids(eos)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=shape["d_model"],
                         intermediate_size=shape["ffn"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                         max_position_embeddings=shape["context"], rope_theta=10000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=eos_id, eos_token_id=eos_id)
    torch.manual_seed(0)
    torch.set_default_dtype({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, parameter in model.named_parameters():  # a layer at a time: transformers' initialization
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, config.initializer_range)
    model.save_pretrained(str(directory))
    PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), eos_token=eos,
                            bos_token=eos).save_pretrained(str(directory))
    return checkpoint_size(directory)


def checkpoint_size(directory: Path) -> dict:
    """Parameters and bytes of a checkpoint's safetensors files (from their headers)."""
    from safetensors import safe_open

    parameters = 0
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                parameters += math.prod(handle.get_slice(name).get_shape())
    return {"parameters": parameters, "bytes": sum(p.stat().st_size for p in directory.glob("*.safetensors"))}


class Watcher:
    """Samples the processes under `pid` twice a second: per stage (by its script), the peak resident memory of
    its largest process and the largest sum over its processes; the load average; and the output lines' times."""

    def __init__(self, pid: int):
        self.pid, self.peaks, self.sums, self.loads, self.lines = pid, {}, {}, [], []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        import psutil

        root = psutil.Process(self.pid)
        while not self.done.wait(0.5):
            self.loads.append(os.getloadavg()[0])
            totals: dict[str, int] = {}
            try:
                processes = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for process in processes:
                try:
                    found = STAGE_SCRIPT.search(" ".join(process.cmdline()))
                    status = Path(f"/proc/{process.pid}/status").read_text()
                except (psutil.NoSuchProcess, OSError):
                    continue
                name = found.group(1) if found else ("dvc" if process.pid == self.pid else None)
                if name is None:
                    continue
                peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
                self.peaks[name] = max(self.peaks.get(name, 0), peak)
                totals[name] = totals.get(name, 0) + int(status.split("VmRSS:")[1].split()[0]) * 1024
            for name, total in totals.items():
                self.sums[name] = max(self.sums.get(name, 0), total)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def dvc_executable(repo: Path) -> str:
    """The `dvc` beside this Python (a venv's) or else on PATH."""
    return shutil.which("dvc", path=environment(repo)["PATH"]) or "dvc"


def dvc_exp_run(repo: Path, overrides: list[str], targets: list[str] = ()) -> dict:
    """`dvc exp run -S ...` with its output passed through (each line with the seconds since the start);
    returns the stages that ran, with wall seconds, peak RSS and the longest silence, and the load average."""
    command = [dvc_executable(repo), "exp", "run", *[a for o in overrides for a in ("-S", o)],
               *targets]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=repo, env=environment(repo), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1)
    watcher = Watcher(process.pid)
    stages: list[dict] = []
    last = start
    for line in process.stdout:
        now = time.perf_counter()
        if stages:
            stages[-1]["silence"] = max(stages[-1]["silence"], now - last)
        last = now
        print(f"[{now - start:7.1f}s] {line}", end="", flush=True)
        found = RUNNING.search(line)
        if found:
            if stages:
                stages[-1]["seconds"] = now - stages[-1]["start"]
            stages.append({"stage": found.group(1), "start": now, "silence": 0.0})
    code = process.wait()
    end = time.perf_counter()
    watcher.stop()
    if stages:
        stages[-1]["seconds"] = end - stages[-1]["start"]
        stages[-1]["silence"] = max(stages[-1]["silence"], end - last)
    if code:
        raise SystemExit(f"error: {' '.join(command)} exited {code}")
    script = {"tokenize": "tokenize_text"}
    for row in stages:
        name = script.get(row["stage"], row["stage"])
        row.update(peak_rss=watcher.peaks.get(name, 0), summed_rss=watcher.sums.get(name, 0))
    loads = watcher.loads or [os.getloadavg()[0]]
    return {"stages": stages, "seconds": end - start, "dvc_peak_rss": watcher.peaks.get("dvc", 0),
            "load_mean": sum(loads) / len(loads), "load_max": max(loads)}


def disk_bytes(path: Path, seen: set | None = None) -> int:
    """Bytes of the files under `path`, each inode once (hard links to DVC's cache are not counted twice), and
    none already in `seen` (pass one set to count several folders' files once in all)."""
    seen, total = set() if seen is None else seen, 0
    for file in [path] if path.is_file() else path.rglob("*"):
        if file.is_file() and not file.is_symlink():
            status = file.stat()
            if (status.st_dev, status.st_ino) not in seen:
                seen.add((status.st_dev, status.st_ino))
                total += status.st_size
    return total


def table(runs: list[tuple[str, dict]], weight_bytes: int) -> str:
    lines = ["| experiment | stage | wall s | peak RSS GiB | × the weights | longest silence s | load (mean / max) |",
             "|---|---|---:|---:|---:|---:|---|"]
    for label, run in runs:
        for row in run["stages"]:
            lines.append(f"| {label} | {row['stage']} | {row['seconds']:.0f} | {row['peak_rss'] / 2**30:.2f} | "
                         f"{row['peak_rss'] / weight_bytes:.2f} | {row['silence']:.0f} | "
                         f"{run['load_mean']:.1f} / {run['load_max']:.1f} |")
        lines.append(f"| {label} | **all** (dvc exp run) | **{run['seconds']:.0f}** | dvc itself: "
                     f"{run['dvc_peak_rss'] / 2**30:.2f} | | | |")
    return "\n".join(lines)


def in_child(function: str, *arguments) -> dict:
    """Run one function of this script in a fresh process (its memory is gone before anything is measured)."""
    done = subprocess.run([sys.executable, __file__, "--job", json.dumps([function, *arguments])],
                          capture_output=True, text=True, env=environment())
    if done.returncode:
        raise SystemExit(f"error: {function} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> str:
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, {memory:.0f} GiB; "
            f"{time.strftime('%Y-%m-%d %H:%M')}; uptime: {uptime}")


def scale_recipe(repo: Path, args) -> None:
    subprocess.run([dvc_executable(repo), "config", "cache.type", "hardlink"], cwd=repo, env=environment(repo),
                   check=True)
    subprocess.run([dvc_executable(repo), "repro", "train_tokenizer"], cwd=repo, env=environment(repo), check=True)
    shape = {"layers": args.layers, "d_model": args.d_model, "ffn": args.ffn, "heads": args.heads,
             "kv_heads": args.kv_heads, "context": args.context}
    kept = args.checkpoint
    start = time.perf_counter()
    if kept and (kept / "config.json").is_file():
        checkpoint = checkpoint_size(kept)
        print(f"checkpoint: reusing {kept}", flush=True)
    else:
        checkpoint = in_child("write_checkpoint", str(repo), str(kept or repo / CHECKPOINT), shape, args.dtype,
                              args.vocab)
    if kept:  # linked into the copy: no second copy on disk
        (repo / CHECKPOINT).mkdir(parents=True)
        for file in kept.iterdir():
            os.link(file, repo / CHECKPOINT / file.name)
    print(f"checkpoint: {checkpoint['parameters']:,} parameters, {checkpoint['bytes'] / 1e9:.2f} GB safetensors, "
          f"ready in {time.perf_counter() - start:.0f} s", flush=True)
    weight_bytes = {"fp32": 4, "bf16": 2}[args.dtype] * checkpoint["parameters"]
    base = ["base_model=hf", f"base_model.path={CHECKPOINT}", *LARGE_MODEL, *args.set]
    runs = []
    for method in ["lora"] + ([] if args.lora_only else ["chat_tokens"]):  # the second: finetune onwards
        runs.append((method, dvc_exp_run(repo, [*base, f"finetune.method={method}"])))
        disk = {name: disk_bytes(repo / name) for name in (".dvc/cache", "models", ".mlflow", CHECKPOINT)}
        everything: set = set()
        disk["all of these, each file once"] = sum(disk_bytes(repo / name, everything)
                                                   for name in (".dvc/cache", "models", ".mlflow", CHECKPOINT))
        print(f"\n{machine()}\nmodel: {checkpoint['parameters']:,} parameters, {args.dtype} weights "
              f"{weight_bytes / 2**30:.2f} GiB\n\n{table(runs, weight_bytes)}\n\ndisk (GiB, each file once): "
              + ", ".join(f"{name} {size / 2**30:.2f}" for name, size in disk.items()), flush=True)
    sizes = json.loads((repo / "reports/quantize/sizes.json").read_text())["variants"]
    print("bits per weight: " + ", ".join(f"{name} {row['bits_per_weight']:.2f}" for name, row in sizes.items()))
    for path in ("reports/pretrain/metrics.json", "reports/finetune/metrics.json", "reports/evaluate/metrics.json"):
        print(f"{path}: {(repo / path).read_text().strip()}")


def pretrain_large(repo: Path, args) -> None:
    overrides = ["model=large", f"pretrain.max_steps={args.pretrain_large}", "pretrain.global_batch_sequences=4",
                 "pretrain.micro_batch_sequences=4", "model.context_length=256", "pretrain.warmup_steps=20",
                 f"pretrain.eval_every={args.pretrain_large}", "pretrain.checkpoint_every=0",
                 "pretrain.eval_max_tokens=8192", *args.set]
    run = dvc_exp_run(repo, overrides, ["pretrain"])
    timings = json.loads((repo / "reports/pretrain/timings.json").read_text())
    details = json.loads((repo / "reports/pretrain/details.json").read_text())
    row = next(r for r in run["stages"] if r["stage"] == "pretrain")
    print(f"\n{machine()}\n{' '.join(overrides)}\nlarge preset: {details['parameters']:,} parameters, "
          f"{args.pretrain_large} steps of {4 * 256} tokens in {row['seconds']:.0f} s (stage wall, with import and "
          f"evaluation): {row['seconds'] / args.pretrain_large:.2f} s per step; {timings['tokens_per_second']:,.0f} "
          f"tokens/s while training; peak RSS {row['peak_rss'] / 2**30:.2f} GiB; longest silence "
          f"{row['silence']:.0f} s; load mean {run['load_mean']:.1f}, max {run['load_max']:.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="the checkpoint's weights, kept by "
                        "every stage")
    parser.add_argument("--lora-only", action="store_true", help="leave out the chat_tokens experiment")
    parser.add_argument("--pretrain-large", type=int, metavar="STEPS", help="pretrain the large preset instead")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more `dvc exp run -S` overrides")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a shape people fine-tune, with the settings that "
                        "fit it (PRESETS); implies --lora-only")
    parser.add_argument("--vocab", type=int, help="the checkpoint's vocabulary size (default: the pipeline's own "
                        "tokenizer's)")
    parser.add_argument("--checkpoint", type=Path, help="write the checkpoint here, or reuse the one found here")
    parser.add_argument("--workdir", type=Path, default=None, help="where the repository copy goes (default: /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the repository copy")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        name, *rest = json.loads(args.job)
        print(json.dumps({"write_checkpoint": write_checkpoint}[name](*rest)))
        return
    if args.preset:
        preset = PRESETS[args.preset]
        for key, value in preset["shape"].items():
            setattr(args, key, value)
        args.vocab, args.dtype, args.lora_only = args.vocab or preset["vocab"], preset["dtype"], True
        args.set = [*preset["set"], *args.set]
    workdir = Path(tempfile.mkdtemp(prefix="llmpipe-scale-", dir=args.workdir))
    try:
        repo = workdir / "repo"
        repo.mkdir()
        make_repo(repo)
        (pretrain_large if args.pretrain_large else scale_recipe)(repo, args)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
