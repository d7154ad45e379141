"""Recovering accuracy on digits-mlp: compression -> fine-tuning -> distillation; QAT vs PTQ; a
scratch-trained student of equal size. Prints tables (and ``--json`` the raw numbers).

    python benchmarks/recovery.py [--epochs 30] [--threads 1] [--json]

Accuracy is on the held-out test split; early stopping uses the model's held-out validation split
(never trained on). Same seed (0) everywhere. The 2-bit compression takes its range from the
largest weight (``clip="max"``, heavy damage); QAT starts at 2 bits from both ranges. Runs in a few
minutes on one CPU thread.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from doc_results import markdown_table, write_section

import workbench as wb
from workbench.measure import count_params, saved_bytes
from workbench.recovery import distill_finetune, finetune, qat, train_student
from workbench.registry import get_recipe
from workbench.select._allocate import allocate

MODEL = "digits-mlp"
WITHIN = 0.02  # "within 2 points of the uncompressed accuracy"
#: (bits, clip) of the QAT starting grids: 2 bits from the largest weight and from the mse range.
QAT_GRIDS = ((2, "max"), (2, "mse"), (3, "mse"), (4, "mse"))


def compressions(task) -> dict:
    """``{label: plan}`` of the compressions compared (one per family, heavy enough to lose accuracy)."""
    model = task.model
    return {
        "SVD 10%/layer (fc3 rank 1)": get_recipe("svd")(model, ratio=0.1),
        "SVD 10% total, fc3 dense": get_recipe("svd")(model, ranks={"fc1": 4, "fc2": 8}),
        "SVD 10% total, greedy ranks": allocate(task, 0.1, "params", "greedy", progress=False).plan,
        "prune 80% (per layer)": get_recipe("prune")(model, ratio=0.2),
        "quant 2-bit (per tensor, clip=max)": get_recipe("quant")(model, bits=2, clip="max"),
    }


def run(epochs: int) -> dict:
    task = wb.load(MODEL)
    base = task.evaluate()
    base_params, base_bytes = count_params(task.model), saved_bytes(task.model)
    out = {"model": MODEL, "uncompressed": {"accuracy": base, "params": base_params, "bytes": base_bytes},
           "epochs": epochs, "recovery": [], "qat": [], "students": []}

    for label, plan in compressions(task).items():
        small = wb.apply(task.model, plan)
        started = time.perf_counter()
        ft = finetune(small, task, epochs=epochs, lr=2e-3, progress=False)
        kd = distill_finetune(small, task, epochs=epochs, lr=2e-3, temperature=4.0, alpha=0.9, progress=False)
        out["recovery"].append({
            "compression": label, "params": count_params(small), "bytes": saved_bytes(small),
            "compressed": task.evaluate(small), "finetuned": task.evaluate(ft.model),
            "distilled": task.evaluate(kd.model), "ft_epochs": len(ft.history), "kd_epochs": len(kd.history),
            "recovered_params": count_params(kd.model), "seconds": time.perf_counter() - started})

    for bits, clip in QAT_GRIDS:
        ptq = wb.apply(task.model, get_recipe("qat")(task.model, bits=bits, clip=clip))
        fixed = finetune(ptq, task, epochs=epochs, lr=2e-3, progress=False)
        learned = qat(ptq, task, epochs=epochs, lr=2e-3, progress=False)
        out["qat"].append({"bits": bits, "clip": clip, "bytes": saved_bytes(learned.model), "ptq": task.evaluate(ptq),
                           "ste_fixed_steps": task.evaluate(fixed.model), "qat_lsq": task.evaluate(learned.model)})

    budget = count_params(wb.apply(task.model, compressions(task)["SVD 10% total, fc3 dense"]))
    for distill in (False, True):
        student = train_student(task, budget, epochs=max(2 * epochs, 40), distill=distill, progress=False)
        out["students"].append({"student": f"64-{student.model.fc1.out_features}-"
                                           f"{student.model.fc2.out_features}-10 from scratch, "
                                           + ("distilled (T=4, alpha=0.9)" if distill else "labels only"),
                                "params": count_params(student.model), "accuracy": task.evaluate(student.model)})
    return out


def verdict(acc: float, base: float) -> str:
    """``acc - base`` in points (negative: below the uncompressed model) and whether it is within 2."""
    change = (acc - base) * 100
    return f"{change:+.1f} pt " + ("ok" if -change <= WITHIN * 100 else "NOT within 2 pt")


def print_tables(r: dict) -> None:
    base = r["uncompressed"]["accuracy"]
    print(f"{r['model']}: uncompressed test accuracy {base:.4f}, {r['uncompressed']['params']} weights, "
          f"{r['uncompressed']['bytes']} bytes; recovery up to {r['epochs']} epochs, Adam lr 2e-3, seed 0\n")
    print(f"{'compression':34s} {'weights':>8s} {'bytes':>7s} {'compressed':>10s} {'fine-tuned':>10s} "
          f"{'distilled':>10s}  best - uncompressed")
    for row in r["recovery"]:
        best = max(row["finetuned"], row["distilled"])
        print(f"{row['compression']:34s} {row['params']:8d} {row['bytes']:7d} {row['compressed']:10.4f} "
              f"{row['finetuned']:10.4f} {row['distilled']:10.4f}  {verdict(best, base)}")
    print(f"\n{'bits':>4s} {'clip':>4s} {'bytes':>7s} {'PTQ':>8s} {'STE, PTQ steps':>15s} {'QAT (LSQ steps)':>16s}  QAT - uncompressed")
    for row in r["qat"]:
        print(f"{row['bits']:4d} {row['clip']:>4s} {row['bytes']:7d} {row['ptq']:8.4f} {row['ste_fixed_steps']:15.4f} "
              f"{row['qat_lsq']:16.4f}  {verdict(row['qat_lsq'], base)}")
    print(f"\n{'equal-size model':52s} {'weights':>8s} {'accuracy':>9s}")
    for svd in (row for row in r["recovery"] if row["compression"].startswith("SVD 10% total")):
        print(f"{svd['compression'] + ' + fine-tuning':52s} {svd['params']:8d} {svd['finetuned']:9.4f}")
        print(f"{svd['compression'] + ' + distillation':52s} {svd['params']:8d} {svd['distilled']:9.4f}")
    for row in r["students"]:
        print(f"{row['student']:52s} {row['params']:8d} {row['accuracy']:9.4f}")


def doc_tables(r: dict) -> str:
    """The three tables of `print_tables` in markdown, for ``docs/results/recovery.md``."""
    base = r["uncompressed"]["accuracy"]
    intro = (f"`{r['model']}`: uncompressed test accuracy {base:.4f}, {r['uncompressed']['params']:,} weights, "
             f"{r['uncompressed']['bytes']:,} bytes; recovery up to {r['epochs']} epochs, Adam lr 2e-3, seed 0.")
    recovery = markdown_table(
        ["compression", "weights", "bytes", "compressed", "fine-tuned", "distilled", "best - uncompressed"],
        [[row["compression"], row["params"], row["bytes"], f"{row['compressed']:.4f}", f"{row['finetuned']:.4f}",
          f"{row['distilled']:.4f}", verdict(max(row["finetuned"], row["distilled"]), base)]
         for row in r["recovery"]])
    qat_rows = markdown_table(
        ["bits", "clip", "bytes", "PTQ", "STE, PTQ steps", "QAT (LSQ steps)", "QAT - uncompressed"],
        [[row["bits"], row["clip"], row["bytes"], f"{row['ptq']:.4f}", f"{row['ste_fixed_steps']:.4f}", f"{row['qat_lsq']:.4f}",
          verdict(row["qat_lsq"], base)] for row in r["qat"]])
    equal = [[f"{svd['compression']} + {how}", svd["params"], f"{svd[key]:.4f}"]
             for svd in r["recovery"] if svd["compression"].startswith("SVD 10% total")
             for how, key in (("fine-tuning", "finetuned"), ("distillation", "distilled"))]
    equal += [[row["student"], row["params"], f"{row['accuracy']:.4f}"] for row in r["students"]]
    return "\n\n".join([intro, recovery, qat_rows, markdown_table(["equal-size model", "weights", "accuracy"], equal)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.epochs)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_tables(result)
    write_section("recovery", f"recovery.py epochs={args.epochs}", doc_tables(result),
                  title=f"benchmarks/recovery.py --epochs {args.epochs}")


if __name__ == "__main__":
    main()
