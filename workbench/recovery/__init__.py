"""Recovering accuracy after compression: fine-tuning, knowledge distillation, QAT, students.

``finetune(model, task, epochs=...)`` trains what a compression left trainable on a copy and
re-packs it; ``distill_finetune`` adds the original model as teacher; ``qat`` learns quantization
steps (LSQ) from a PTQ start; ``train_student`` distils into a narrower network of equal size.
"""
from workbench.recovery.distill import Distillation, distillation_loss, soft_loss
from workbench.recovery.finetune import Recovery, distill_finetune, finetune, validation_split
from workbench.recovery.qat import FakeQuantLayer, lsq_fake_quant, qat
from workbench.recovery.student import build_student, train_student

__all__ = ["Distillation", "FakeQuantLayer", "Recovery", "build_student", "distill_finetune",
           "distillation_loss", "finetune", "lsq_fake_quant", "qat", "soft_loss", "train_student",
           "validation_split"]
