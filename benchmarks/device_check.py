"""GPU check: the main paths run on the model's device and give the CPU's numbers.

On a machine with CUDA, runs on ``cuda`` and on the CPU, for the embedded digits-mlp (given to
`wb.load` as a user model moved to the device, its data left on the CPU) and a small random
BertModel built from a config (nothing downloaded):

* ``Engine(task).evaluate`` of an svd move (a cheap view of the cached factors);
* ``wb.apply`` with svd / svd_aware / prune / quant, the built model judged by the task;
* one epoch of fine-tuning; ``wb.measure`` latency (CUDA synchronized before each clock read).

Asserts that every built layer's parameters and buffers are on the device and that each metric
equals the CPU run's (inference within ``TOLERANCE``, one sample for accuracy; fine-tuning, whose
reductions run in another order, within ``FINETUNE_TOLERANCE``), then prints one JSON document of
the figures (metrics, times in ms on each device). Without CUDA it says so and exits 0.

Run: ``.venv/bin/python benchmarks/device_check.py`` (under a minute on one GPU).
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time

import torch
from transformers import BertConfig, BertModel

import workbench as wb
from workbench.device import model_device, synchronize

TOLERANCE = 1e-3
FINETUNE_TOLERANCE = 0.03
MLP_PLANS = {"svd": {"fc2": wb.LayerPlan("svd", {"rank": 16})},
             "svd_aware": {"fc2": wb.LayerPlan("svd_aware", {"rank": 16})},
             "prune": {"fc1": wb.LayerPlan("prune", {"ratio": 0.3})},
             "quant": {"fc2": wb.LayerPlan("quant", {"bits": 4})}}
BERT_LAYER = "encoder.layer.1.intermediate.dense"


def digits_task(device: str) -> wb.Task:
    """digits-mlp as a user model on ``device``; its evaluation and training data stay on the CPU."""
    base = wb.load("digits-mlp")
    return wb.load(copy.deepcopy(base.model).to(device), eval_data=(base.eval_inputs, base.eval_targets),
                   train_data=(base.train_inputs, base.train_targets), metric=base.metric, metric_name="accuracy",
                   name="digits-mlp")


def bert_task(device: str) -> wb.Task:
    """A 2-block BertModel with random weights (seed 0) on ``device``; metric: output fidelity."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=32)
    ids = torch.randint(0, 200, (48, 16), generator=torch.Generator().manual_seed(0))
    return wb.load(BertModel(config).eval().to(device), eval_data=ids, name="bert-tiny")


def check_on(model: torch.nn.Module, device: str, what: str) -> None:
    wrong = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != device]
    assert not wrong, f"{what}: tensors {wrong[:5]} are not on {device}"


def timed(run, device: torch.device) -> tuple:
    synchronize(device)
    start = time.perf_counter()
    value = run()
    synchronize(device)
    return value, (time.perf_counter() - start) * 1e3


def run(device: str) -> dict:
    """``{figure: value}`` of the main paths on ``device`` (``"cpu"`` or ``"cuda"``)."""
    figures: dict = {}
    mlp, bert = digits_task(device), bert_task(device)
    for task, layer in ((mlp, "fc2"), (bert, BERT_LAYER)):
        engine, build_ms = timed(lambda: wb.Engine(task, freeze_gc=False), model_device(task.model))
        check_on(engine.working, device, f"{task.name} engine")
        result = engine.evaluate(wb.Plan({layer: wb.LayerPlan("svd", {"rank": 8})}))
        assert engine.factors.get(layer).u.device.type == device, f"{task.name}: SVD factors not on {device}"
        figures[f"{task.name}/engine_setup_ms"] = build_ms
        figures[f"{task.name}/engine_svd_metric"], figures[f"{task.name}/engine_svd_ms"] = result["metric"], result["compute_ms"]
    plans = {**{f"digits-mlp/{k}": (mlp, wb.Plan(v)) for k, v in MLP_PLANS.items()},
             "bert-tiny/svd_aware": (bert, wb.Plan({BERT_LAYER: wb.LayerPlan("svd_aware", {"rank": 8})}))}
    for key, (task, plan) in plans.items():
        model, ms = timed(lambda: wb.apply(task.model, plan, calibration_inputs=task.calibration_inputs()),
                          model_device(task.model))
        check_on(model, device, key)
        figures[f"{key}/metric"], figures[f"{key}/apply_ms"] = task.evaluate(model), ms
    small = wb.apply(mlp.model, wb.Plan(MLP_PLANS["svd"]))
    recovery = wb.finetune(small, mlp, epochs=1, progress=False)
    check_on(recovery.model, device, "fine-tuned model")
    figures["digits-mlp/finetune_metric"] = recovery.history[-1]["metric"]
    figures["digits-mlp/finetune_epoch_ms"] = recovery.history[-1]["seconds"] * 1e3
    figures["digits-mlp/latency_ms"] = wb.measure(small, mlp)["latency_ms"]
    figures["bert-tiny/latency_ms"] = wb.measure(bert.model, bert)["latency_ms"]
    return figures


def compare(gpu: dict, cpu: dict, samples: int) -> list[str]:
    """The metrics of ``gpu`` that differ from ``cpu`` beyond the tolerances."""
    bad = []
    for key, value in gpu.items():
        if "metric" not in key:
            continue
        allowed = FINETUNE_TOLERANCE if "finetune" in key else TOLERANCE
        if key.startswith("digits-mlp/"):
            allowed = max(allowed, 1.0 / samples + 1e-9)  # one sample's argmax flipping
        if not math.isclose(value, cpu[key], abs_tol=allowed):
            bad.append(f"{key}: {value} on the GPU, {cpu[key]} on the CPU (allowed {allowed:g})")
    return bad


def main() -> int:
    if not torch.cuda.is_available():
        print("device_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 as on the CPU
    gpu, cpu = run("cuda"), run("cpu")
    bad = compare(gpu, cpu, len(wb.load("digits-mlp").eval_inputs))
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "figures": {key: {"cuda": gpu[key], "cpu": cpu[key]} for key in gpu},
                      "mismatches": bad}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
