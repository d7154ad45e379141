"""Recovering accuracy after compression: fine-tuning, knowledge distillation, QAT, students.

``finetune(model, task, epochs=...)`` trains what a compression left trainable on a copy and
re-packs it; ``distill_finetune`` adds the original model as teacher; ``qat`` learns quantization
steps (LSQ) from a PTQ start; ``train_student`` distils into a narrower network of equal size;
``iterative_pruning`` / ``l1_regularised_pruning`` prune while training;
``reconstruct_blocks`` tunes a compressed model block by block to reproduce the original's
activations on calibration inputs (no labels: for encoders such as MiniLM);
``refit_projections`` refits the output projections of head / FFN-pruned blocks by least squares;
``distill_embeddings`` fine-tunes a compressed encoder end to end on 1 - cosine to the original's outputs.
"""
from workbench.recovery.blockwise import BlockwiseResult, reconstruct_blocks
from workbench.recovery.distill import Distillation, distillation_loss, soft_loss
from workbench.recovery.embedding_distill import EmbeddingDistillResult, distill_embeddings
from workbench.recovery.finetune import Recovery, distill_finetune, finetune, qat, validation_split
from workbench.recovery.lsq import FakeQuantLayer, lsq_fake_quant
from workbench.recovery.refit import refit_projections
from workbench.recovery.pruning_train import PruningRun, iterative_pruning, l1_regularised_pruning
from workbench.recovery.student import build_student, train_student

__all__ = ["BlockwiseResult", "Distillation", "FakeQuantLayer", "PruningRun", "Recovery", "EmbeddingDistillResult", "build_student",
           "distill_embeddings", "distill_finetune", "distillation_loss", "finetune", "iterative_pruning", "l1_regularised_pruning",
           "lsq_fake_quant", "qat", "reconstruct_blocks", "refit_projections", "soft_loss", "train_student", "validation_split"]
