"""Pruning and quantization figures on digits-mlp, and CPU latency of sparse and int8 layers.

Prints tables and a final JSON line:
- accuracy and saved bytes at 50% / 80% unstructured sparsity (per-layer and global), structured 50%;
- 4-bit uniform vs k-means accuracy and bytes (must be <= 0.2 of fp32), weight MSE, output error;
- int8 latency vs fp32 on digits-mlp and on one 1536x384 Linear at batch 64;
- sparse vs dense latency of a 1536x384 Linear across sparsities (CSR and bitmap storage).
Run: .venv/bin/python benchmarks/pruning_quant.py   (timings: median of --repeats runs, current threads)
"""
import argparse
import json
import warnings

import torch
from doc_results import markdown_table, write_section
from torch import nn

import workbench as wb
from workbench.kernels.prune import mask_by_ratio
from workbench.layers.quantized import Int8Linear
from workbench.layers.sparse import SparseLinear
from workbench.measure import latency_ms, saved_bytes
from workbench.methods.quantization import quantization_errors
from workbench.registry import get_recipe


def model_row(task, label, plan, fp32_bytes):
    model = wb.apply(task.model, plan)
    return model, {"setting": label, "accuracy": round(task.evaluate(model), 4), "bytes": saved_bytes(model),
                   "bytes_fraction": round(saved_bytes(model) / fp32_bytes, 4)}


def pruning_rows(task, fp32_bytes):
    rows = []
    for ratio in (0.5, 0.2):
        for scope in ("layer", "global"):
            plan = get_recipe("prune")(task.model, ratio=ratio, scope=scope)
            rows.append(model_row(task, f"{1 - ratio:.0%} sparse, {scope}", plan, fp32_bytes)[1])
    plan = get_recipe("prune")(task.model, task=task, ratio=0.5, structured=True)
    rows.append(model_row(task, "structured, 50% of neurons of fc1/fc2", plan, fp32_bytes)[1])
    return rows


def quant_rows(task, fp32_bytes):
    rows = []
    for scheme in ("uniform", "kmeans"):
        for per_channel in (False, True):
            plan = get_recipe("quant")(task.model, bits=4, scheme=scheme, per_channel=per_channel)
            model, row = model_row(task, f"4-bit {scheme}{' per-channel' if per_channel else ''}", plan, fp32_bytes)
            errors = quantization_errors(task.model, model, task.calibration_inputs())
            row["weight_mse"] = {e["name"]: float(f"{e['weight_mse']:.3g}") for e in errors}
            row["output_rel_error"] = {e["name"]: round(e["output_rel_error"], 4) for e in errors}
            rows.append(row)
    model, row = model_row(task, "int8 (dynamic activations)", get_recipe("int8")(task.model), fp32_bytes)
    rows.append(row)
    return rows


def int8_latency(task, repeats):
    int8 = wb.apply(task.model, get_recipe("int8")(task.model))
    out = {}
    for batch in (1, 256):
        x = task.eval_inputs[:batch]
        out[f"digits-mlp batch {batch}"] = {"fp32_ms": latency_ms(task.model, x, repeats),
                                            "int8_ms": latency_ms(int8, x, repeats)}
    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(384, 1536)).eval()
    big_int8 = nn.Sequential(Int8Linear.from_linear(big[0])).eval()
    x = torch.randn(64, 384)
    out["Linear 384->1536 batch 64"] = {"fp32_ms": latency_ms(big, x, repeats), "int8_ms": latency_ms(big_int8, x, repeats)}
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_  # noqa: PLC0415 - optional, not installed by default
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ao = nn.Sequential(nn.Linear(384, 1536)).eval()
            ao.load_state_dict(big.state_dict())
            quantize_(ao, Int8DynamicActivationInt8WeightConfig())
            out["Linear 384->1536 batch 64"]["torchao_int8_ms"] = latency_ms(ao, x, repeats)
    except Exception as exc:  # torchao absent or without a CPU kernel here
        out["Linear 384->1536 batch 64"]["torchao_int8_ms"] = f"unavailable: {type(exc).__name__}"
    for row in out.values():
        row.update({k: round(v, 4) for k, v in row.items() if isinstance(v, float)})
        row["int8_speedup"] = round(row["fp32_ms"] / row["int8_ms"], 2)
    return out


def sparse_latency(repeats):
    torch.manual_seed(0)
    dense = nn.Linear(384, 1536).eval()
    x = torch.randn(64, 384)
    rows = [{"sparsity": 0.0, "format": "dense", "ms": round(latency_ms(dense, x, repeats), 4),
             "bytes": saved_bytes(nn.Sequential(dense))}]
    for sparsity in (0.5, 0.8, 0.9, 0.95, 0.98, 0.99):
        mask = mask_by_ratio(dense.weight, 1 - sparsity)
        for fmt in ("bitmap", "csr"):
            layer = SparseLinear.from_linear(dense, mask, format=fmt)
            rows.append({"sparsity": sparsity, "format": fmt, "ms": round(latency_ms(layer, x, repeats), 4),
                         "bytes": saved_bytes(nn.Sequential(layer))})
    return rows


def doc_tables(result: dict, repeats: int) -> str:
    """The printed tables in markdown, for ``docs/results/pruning-quant.md``."""
    fp32 = result["fp32"]
    sizes = markdown_table(["setting", "accuracy", "bytes", "of fp32"],
                           [["fp32", f"{fp32['accuracy']:.4f}", fp32["bytes"], "1.000"]]
                           + [[row["setting"], f"{row['accuracy']:.4f}", row["bytes"], f"{row['bytes_fraction']:.3f}"]
                              for row in result["pruning"] + result["quantization"]])
    int8 = markdown_table(["case", "fp32 ms", "int8 ms (fbgemm)", "speed-up", "torchao int8 ms"],
                          [[label, row["fp32_ms"], row["int8_ms"], f"{row['int8_speedup']}x",
                            row.get("torchao_int8_ms", "")] for label, row in result["int8_latency"].items()])
    dense_ms = result["sparse_latency"][0]["ms"]
    sparse = markdown_table(["sparsity", "format", "ms", "bytes", "against dense"],
                            [[f"{row['sparsity']:.0%}", row["format"], row["ms"], row["bytes"],
                              "" if row["format"] == "dense" else "slower" if row["ms"] > dense_ms else "faster"]
                             for row in result["sparse_latency"]])
    return (f"`digits-mlp`, median of {repeats} runs, {torch.get_num_threads()} torch threads.\n\n{sizes}\n\n"
            f"int8 against fp32 latency:\n\n{int8}\n\nSparse Linear 384->1536 at batch 64:\n\n{sparse}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    task = wb.load("digits-mlp")
    fp32_bytes = saved_bytes(task.model)
    print(f"digits-mlp fp32: accuracy {task.evaluate():.4f}, {fp32_bytes} bytes, torch threads {torch.get_num_threads()}")
    result = {"fp32": {"accuracy": round(task.evaluate(), 4), "bytes": fp32_bytes}}
    result["pruning"] = pruning_rows(task, fp32_bytes)
    result["quantization"] = quant_rows(task, fp32_bytes)
    print(f"\n{'setting':<40} {'accuracy':>8} {'bytes':>8} {'of fp32':>8}")
    for row in result["pruning"] + result["quantization"]:
        print(f"{row['setting']:<40} {row['accuracy']:>8.4f} {row['bytes']:>8} {row['bytes_fraction']:>8.3f}")
    result["int8_latency"] = int8_latency(task, args.repeats)
    print("\nint8 vs fp32 latency (median ms)")
    for label, row in result["int8_latency"].items():
        extra = f", torchao {row['torchao_int8_ms']}" if "torchao_int8_ms" in row else ""
        print(f"  {label:<28} fp32 {row['fp32_ms']:.4f}  int8 {row['int8_ms']:.4f}  ({row['int8_speedup']}x){extra}")
    result["sparse_latency"] = sparse_latency(args.repeats)
    dense_ms = result["sparse_latency"][0]["ms"]
    print(f"\nsparse Linear 384->1536, batch 64 (dense {dense_ms:.4f} ms)")
    for row in result["sparse_latency"][1:]:
        verdict = "slower" if row["ms"] > dense_ms else "FASTER"
        print(f"  {row['sparsity']:.0%} {row['format']:<6} {row['ms']:.4f} ms  {row['bytes']:>8} bytes  {verdict} than dense")
    print(json.dumps(result))
    write_section("pruning-quant", f"pruning_quant.py --repeats {args.repeats}", doc_tables(result, args.repeats),
                  title=f"benchmarks/pruning_quant.py --repeats {args.repeats}")


if __name__ == "__main__":
    main()
