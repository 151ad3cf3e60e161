"""The quantization size table: format, bits per weight, bytes, ratio to fp32 and fp16, measured on
the files the quantize stage wrote."""

from __future__ import annotations


def size_row(variant: str, parameters: int, tensor_bytes: int, file_bytes: int, type_counts: dict[str, int]) -> dict:
    return {
        "format": variant,
        "bits_per_weight": 8 * tensor_bytes / parameters,
        "tensor_bytes": tensor_bytes,
        "file_bytes": file_bytes,
        "ratio_to_fp32": tensor_bytes / (4 * parameters),
        "ratio_to_fp16": tensor_bytes / (2 * parameters),
        "tensor_types": type_counts,
    }


def markdown_table(rows: list[dict], parameters: int) -> str:
    lines = [f"# Quantization: sizes of the fine-tuned model ({parameters:,} parameters)", "",
             "Bits per weight and ratios count the weights' bytes; file bytes add the metadata and tokenizer "
             "(about the same for every variant, large next to a model this small).", "",
             "| format | bits/weight | weight bytes | file bytes | vs fp32 | vs fp16 | tensor types |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        types = ", ".join(f"{name}×{count}" for name, count in sorted(row["tensor_types"].items()))
        lines.append(f"| {row['format']} | {row['bits_per_weight']:.3f} | {row['tensor_bytes']:,} | {row['file_bytes']:,} | "
                     f"{row['ratio_to_fp32']:.3f} | {row['ratio_to_fp16']:.3f} | {types} |")
    return "\n".join(lines) + "\n"
