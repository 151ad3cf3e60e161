"""Our quantizers against llama.cpp's own, side by side in one run, on the same F32 GGUF.

A seeded random model (default TinyLlama's shape, 1.1B weights) is written as F32 GGUF by our writer. Per
type, each in its own process (seconds, peak RSS): llama.cpp's `llama_model_quantize` (`pure`: every matrix
in the type; a thread per core); ours: gguf's reader (memory-mapped), each matrix quantized by
`llmpipe.gguf.formats` and streamed out with gguf's writer; gguf.quants (Q8_0, Q4_0: numpy, not written).
Every quantized tensor of ours is compared byte for byte with llama.cpp's. A process with an empty numba
cache times the kernels' compile (paid once per fresh clone).

    python benchmarks/quantize_speed.py                          # 1.1B: ~4.4 GB F32 file + outputs
    python benchmarks/quantize_speed.py --layers 2 --vocab 4096  # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TYPES = ("Q8_0", "Q4_0", "Q4_K", "Q2_K")
GGUF_QUANTS_TYPES = ("Q8_0", "Q4_0")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def anonymous_rss_mib() -> float:
    """Resident memory that is not a mapped file (the F32 input's pages are): this process's own arrays."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("RssAnon:")[1].split()[0]) / 1024


def build_model(workdir: Path, shape: dict):
    """The seeded random model of `shape` and a small tokenizer (trained once into `workdir`)."""
    import torch

    from llmpipe.data.world import WorldConfig, build_world
    from llmpipe.model.transformer import ModelConfig, Transformer
    from llmpipe.text.tokenizer import LoadedTokenizer, save_tokenizer, train_bpe

    if not (workdir / "tokenizer").exists():
        specials = {"end_of_document": "<|endoftext|>", "system": "<|system|>", "user": "<|user|>",
                    "assistant": "<|assistant|>", "end_of_turn": "<|end|>"}
        texts = build_world(WorldConfig(num_people=20, paraphrases=2))["pretrain_train"]
        save_tokenizer(train_bpe(texts, 512, 2, specials), specials, workdir / "tokenizer")
    torch.manual_seed(0)
    with torch.no_grad():
        model = Transformer(ModelConfig(vocab_size=shape["vocab"], context_length=2048, n_layer=shape["layers"],
                                        d_model=shape["d_model"], n_head=32, n_kv_head=4, ffn_hidden=shape["ffn"],
                                        tie_embeddings=False)).eval()
    return model, LoadedTokenizer(workdir / "tokenizer")


def run_write_gguf(destination: str, shape: dict, type_name: str) -> dict:
    """Our writer (llmpipe.gguf.files.write_gguf) from the model in memory; F32 for the input file."""
    from llmpipe.gguf.files import plan_tensors, write_gguf
    from llmpipe.gguf.formats import FORMATS

    model, tokenizer = build_model(Path(destination).parent, shape)
    if type_name in FORMATS:
        FORMATS[type_name].quantize(np.zeros((1, FORMATS[type_name].block_size), np.float32))   # load the kernel
    start = time.perf_counter()
    write_gguf(destination, model, tokenizer, plan_tensors(model, type_name, type_name, None, None), type_name,
               "quantize-speed")
    return {"seconds": time.perf_counter() - start, "weights": sum(p.numel() for p in model.parameters())}


def run_llama_cpp(source: str, destination: str, type_name: str, threads: int) -> dict:
    import llama_cpp

    from llmpipe.gguf.files import (
        FILE_TYPES,  # llama.cpp's ftype numbers (Q4_K: Q4_K_S)
    )

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[type_name]
    params.nthread = threads
    params.pure = True                       # every matrix in `ftype`, no mixing of types
    start = time.perf_counter()
    if llama_cpp.llama_model_quantize(source.encode(), destination.encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {type_name}")
    return {"seconds": time.perf_counter() - start}


def run_ours(source: str, destination: str, type_name: str) -> dict:
    """Read the F32 file (memory-mapped), quantize each matrix, stream it into `destination`."""
    import gguf

    from llmpipe.gguf.formats import FORMATS

    fmt = FORMATS[type_name]
    start = time.perf_counter()
    fmt.quantize(np.zeros((1, fmt.block_size), np.float32))        # numba: load the compiled kernel
    jit_load = time.perf_counter() - start
    start = time.perf_counter()
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(destination, arch="llama")
    for tensor in reader.tensors:            # every tensor's place first: the data then goes out one by one
        quantized = tensor.data.ndim == 2
        shape = (tensor.data.shape[0], tensor.data.shape[1] // fmt.block_size * fmt.block_bytes) if quantized \
            else tensor.data.shape
        writer.add_tensor_info(tensor.name, shape, np.dtype(np.uint8) if quantized else tensor.data.dtype,
                               int(np.prod(shape)) * (1 if quantized else tensor.data.itemsize),
                               gguf.GGMLQuantizationType(fmt.ggml_type) if quantized else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    quantize_seconds, anonymous = 0.0, 0.0
    for tensor in reader.tensors:
        if tensor.data.ndim == 2:
            tick = time.perf_counter()
            data = fmt.quantize(tensor.data)
            quantize_seconds += time.perf_counter() - tick
        else:
            data = np.array(tensor.data)
        anonymous = max(anonymous, anonymous_rss_mib())
        writer.write_tensor_data(data)
    writer.close()
    return {"seconds": time.perf_counter() - start, "quantize_seconds": quantize_seconds, "jit_load_seconds": jit_load,
            "anonymous_rss_mib": anonymous}


def run_gguf_quants(source: str, type_name: str) -> dict:
    import gguf

    reader = gguf.GGUFReader(source)
    start = time.perf_counter()
    for tensor in reader.tensors:
        if tensor.data.ndim == 2:
            gguf.quants.quantize(tensor.data, gguf.GGMLQuantizationType[type_name])
    return {"seconds": time.perf_counter() - start}


def run_compile() -> dict:
    """First call of each kernel, in a process whose numba cache is empty."""
    start = time.perf_counter()
    from llmpipe.gguf.formats import FORMATS

    seconds = {"import": time.perf_counter() - start}
    for name, fmt in FORMATS.items():
        tick = time.perf_counter()
        fmt.quantize(np.ones((1, fmt.block_size), np.float32))
        seconds[name] = time.perf_counter() - tick
    return seconds


def in_child(job: list[str], env: dict | None = None) -> dict:
    """Run one job of this script in a fresh process; its result and peak RSS (MiB)."""
    done = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    if done.returncode:
        raise RuntimeError(f"{job[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_bytes(ours: Path, theirs: Path) -> tuple[int, int]:
    """(tensors whose bytes equal, tensors compared): each quantized tensor of ours against llama.cpp's."""
    import gguf

    their_tensors = {t.name: t for t in gguf.GGUFReader(str(theirs)).tensors}
    equal = compared = 0
    for tensor in gguf.GGUFReader(str(ours)).tensors:
        if tensor.data.ndim == 2 and tensor.tensor_type not in (gguf.GGMLQuantizationType.F32,):
            other = their_tensors[tensor.name]
            compared += 1
            equal += int(other.tensor_type == tensor.tensor_type and np.array_equal(other.data, tensor.data))
    return equal, compared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="llama.cpp's nthread")
    parser.add_argument("--workdir", type=Path, default=None, help="where the GGUF files go (default: a temp dir)")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        name, *rest = json.loads(args.job)
        jobs = {"write_gguf": run_write_gguf, "llama.cpp": run_llama_cpp, "ours": run_ours,
                "gguf.quants": run_gguf_quants, "compile": run_compile}
        result = jobs[name](*rest)
        print(json.dumps({**result, "peak_rss_mib": peak_rss_mib()}))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        measure(Path(workdir), args)


def measure(workdir: Path, args) -> None:
    source = workdir / "model-f32.gguf"
    shape = {"layers": args.layers, "vocab": args.vocab, "d_model": args.d_model, "ffn": args.ffn}
    written = in_child(["write_gguf", str(source), shape, "F32"])   # its memory is gone before anything is timed
    print(f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores; model: {args.layers} "
          f"layers, d_model {args.d_model}, ffn {args.ffn}, vocab {args.vocab}: {written['weights'] / 1e9:.3f}B "
          "weights, "
          f"F32 GGUF {source.stat().st_size / 2**30:.2f} GiB")
    with tempfile.TemporaryDirectory() as cache:
        compiled = in_child(["compile"], env={"NUMBA_CACHE_DIR": cache})
    print("numba compile, empty cache (s): " + ", ".join(f"{k} {v:.2f}" for k, v in compiled.items()
                                                          if k != "peak_rss_mib"))
    print("\n| type | llama.cpp s | ours s | ours / llama.cpp | ours: quantize only s | gguf.quants s | bytes equal "
          "| write_gguf from the model s | peak RSS MiB: llama.cpp / ours (not the mapped input) / write_gguf |\n"
          + "|---" * 9 + "|")
    loads = []
    for type_name in args.types:
        theirs, ours = workdir / f"llama-{type_name}.gguf", workdir / f"ours-{type_name}.gguf"
        llama = in_child(["llama.cpp", str(source), str(theirs), type_name, args.threads])
        mine = in_child(["ours", str(source), str(ours), type_name])
        reference = in_child(["gguf.quants", str(source), type_name]) if type_name in GGUF_QUANTS_TYPES else None
        equal, compared = same_bytes(ours, theirs)
        theirs.unlink()
        ours.unlink()
        whole = in_child(["write_gguf", str(ours), shape, type_name])
        ours.unlink()
        gguf_quants = "-" if reference is None else f"{reference['seconds']:.1f}"
        print(f"| {type_name} | {llama['seconds']:.1f} | {mine['seconds']:.1f} | {mine['seconds'] / llama['seconds']:.2f} "
              f"| {mine['quantize_seconds']:.1f} | {gguf_quants} | {equal}/{compared} | {whole['seconds']:.1f} "
              f"| {llama['peak_rss_mib']:,.0f} / {mine['peak_rss_mib']:,.0f} ({mine['anonymous_rss_mib']:,.0f}) "
              f"/ {whole['peak_rss_mib']:,.0f} |", flush=True)
        loads.append(mine["jit_load_seconds"])
    print(f"\nours: loading the cached kernel took {min(loads):.2f}-{max(loads):.2f} s per process (not in the times)")


if __name__ == "__main__":
    main()
