"""Stage `quantize`: the fine-tuned model as GGUF files (F16, Q8_0, Q4_K, Q4_1, Q4_0, Q2_K) and a Hugging Face export.

Each GGUF file loads in llama.cpp (`llama-cli -m models/gguf/llmpipe-Q4_0.gguf`), Ollama or LM Studio.
Tensors whose rows are not whole blocks of a variant's format take `quantize.fallback` instead, as
llama.cpp's own quantizer does (K-quants need rows that are multiples of 256; every preset's rows are;
the size table's tensor-type column shows what each file holds).
Params: quantize.variants, quantize.fallback, quantize.embeddings, quantize.output, quantize.model_name.
Output: models/gguf/ (one file per variant + manifest.json), models/hf/ (transformers),
reports/quantize/sizes.json (every variant's size; read by evaluate) and sizes.md (the table).
Run: `dvc repro quantize`.
"""

import time
from collections import Counter

from llmpipe import atomic
from llmpipe.config import layout
from llmpipe.config.params import StageParams
from llmpipe.gguf.files import QuantizeSettings, plan_tensors, size_row, write_gguf
from llmpipe.hf.export import write_hf_directory
from llmpipe.model.transformer import count_parameters
from llmpipe.model.weights import WEIGHTS_FILE, load_model
from llmpipe.report.markdown import size_table
from llmpipe.runner.stage import stage
from llmpipe.text.tokenizer import LoadedTokenizer
from llmpipe.tracking.stage_run import StageRun


def read_settings(params: StageParams) -> QuantizeSettings:
    return params.read(QuantizeSettings)


@stage("quantize", read_settings)
def quantize(settings: QuantizeSettings, params: StageParams, run: StageRun) -> None:
    name = settings.model_name
    tokenizer = LoadedTokenizer(layout.TOKENIZER)
    model, _ = load_model(layout.FINETUNED, tokenizer=tokenizer)
    parameters = count_parameters(model)

    rows, manifest = [], {}
    with atomic.atomic_path(layout.GGUF, directory=True) as temp:
        for variant in settings.variants:
            plans = plan_tensors(model, variant, settings.fallback, settings.embeddings.get(variant),
                                 settings.output.get(variant))
            file = temp / layout.gguf_file_name(name, variant)
            start = time.perf_counter()
            tensor_bytes = write_gguf(file, model, tokenizer, plans, variant, name)
            rows.append(size_row(variant, parameters, tensor_bytes, file.stat().st_size,
                                 dict(Counter(p.type_name for p in plans))))
            manifest[file.name] = {p.gguf_name: p.type_name for p in plans}
            print(f"quantize: {file.name}: {rows[-1]['bits_per_weight']:.2f} bits/weight, {file.stat().st_size:,} bytes "
                  f"in {time.perf_counter() - start:.1f} s", flush=True)
        (temp / "manifest.json").write_text(atomic.json_text(manifest, indent=1), encoding="utf-8")
    with atomic.atomic_path(layout.HF_EXPORT, directory=True) as temp:
        write_hf_directory(temp, model, tokenizer, layout.FINETUNED / WEIGHTS_FILE)

    table = size_table(rows, parameters)
    sizes = {"parameters": parameters, "variants": {row["format"]: {k: v for k, v in row.items() if k != "tensor_types"}
                                                   for row in rows}}
    atomic.write_json(layout.SIZES_JSON, sizes)
    atomic.write_text(layout.SIZES_TABLE, table)
    for row in rows:
        run.log_metrics({f"{row['format']}_bits_per_weight": row["bits_per_weight"],
                         f"{row['format']}_file_bytes": row["file_bytes"],
                         f"{row['format']}_ratio_to_fp32": row["ratio_to_fp32"]})
    run.log_text(table, layout.SIZES_TABLE.name)
    print(table)


if __name__ == "__main__":
    quantize()
