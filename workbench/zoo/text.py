"""``text-gru``: a GRU classifier over token sequences from a synthetic topic grammar (no downloads).

The grammar: each sentence is ``DET [ADJ] NOUN VERB DET [ADJ] NOUN [CONJ DET NOUN VERB]`` padded
to ``SEQ_LEN`` tokens. Each of the ``TOPICS`` draws its nouns and verbs mostly (``TOPIC_BIAS``)
from its own word list and otherwise from the shared lists; the label is the topic. The corpus is
generated from a seeded ``torch.Generator``, so every machine builds the same data.
"""
from __future__ import annotations

import torch
from torch import nn

from workbench.data import accuracy
from workbench.zoo import cache
from workbench.zoo.task import Task
from workbench.zoo.training import Recipe, train_classifier

TOPICS = ("sport", "food", "tech", "weather")
SEQ_LEN = 12
TOPIC_BIAS = 0.6
SEED = 0
N_TRAIN, N_TEST = 2000, 500

_SHARED_NOUNS = ["thing", "day", "man", "woman", "friend", "city", "plan", "story"]
_SHARED_VERBS = ["sees", "likes", "makes", "wants", "gets", "finds"]
_TOPIC_WORDS = {
    "sport": (["ball", "team", "goal", "coach", "match", "league"], ["kicks", "scores", "wins", "passes"]),
    "food": (["bread", "soup", "chef", "pasta", "salad", "spice"], ["cooks", "bakes", "tastes", "eats"]),
    "tech": (["chip", "code", "robot", "server", "app", "laptop"], ["runs", "builds", "codes", "boots"]),
    "weather": (["rain", "storm", "cloud", "wind", "snow", "sun"], ["blows", "falls", "shines", "pours"]),
}
_DETS = ["the", "a", "this", "every"]
_ADJS = ["big", "small", "new", "old", "red", "quick"]
_CONJ = ["and", "but"]


def vocabulary() -> list[str]:
    """Token strings; index 0 is padding ``<pad>``."""
    words = ["<pad>"] + _DETS + _ADJS + _CONJ + _SHARED_NOUNS + _SHARED_VERBS
    for nouns, verbs in _TOPIC_WORDS.values():
        words += nouns + verbs
    return words


def _choice(items: list[str], g: torch.Generator) -> str:
    return items[int(torch.randint(len(items), (1,), generator=g))]


def _sentence(topic: str, g: torch.Generator) -> list[str]:
    nouns, verbs = _TOPIC_WORDS[topic]

    def noun():
        return _choice(nouns if torch.rand(1, generator=g) < TOPIC_BIAS else _SHARED_NOUNS, g)

    def verb():
        return _choice(verbs if torch.rand(1, generator=g) < TOPIC_BIAS else _SHARED_VERBS, g)

    def phrase():
        adj = [_choice(_ADJS, g)] if torch.rand(1, generator=g) < 0.5 else []
        return [_choice(_DETS, g), *adj, noun()]

    words = phrase() + [verb()] + phrase()
    if torch.rand(1, generator=g) < 0.5:
        words += [_choice(_CONJ, g), _choice(_DETS, g), noun(), verb()]
    return words[:SEQ_LEN]


def synthetic_corpus(n: int, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
    """``(tokens (n, SEQ_LEN) int64, labels (n,) int64, sentences)`` from the grammar, seeded."""
    g = torch.Generator().manual_seed(seed)
    index = {w: i for i, w in enumerate(vocabulary())}
    tokens = torch.zeros(n, SEQ_LEN, dtype=torch.long)
    labels = torch.randint(len(TOPICS), (n,), generator=g)
    sentences = []
    for row, label in enumerate(labels.tolist()):
        words = _sentence(TOPICS[label], g)
        sentences.append(words)
        tokens[row, SEQ_LEN - len(words):] = torch.tensor([index[w] for w in words])  # left padding
    return tokens, labels, sentences


class TextGRU(nn.Module):
    """``tokens (n, T) int64 -> embed (n, T, E) -> GRU (hidden H) -> last state -> logits (n, topics)``."""

    def __init__(self, vocab: int, embed_dim: int = 16, hidden: int = 32, classes: int = len(TOPICS)):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed_dim)
        self.rnn = nn.GRU(embed_dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out[:, -1])


TEXT_RECIPE = Recipe(epochs=15, lr=5e-3)
DESCRIPTION = "embedding (16) + GRU (hidden 32) topic classifier on a synthetic grammar (12 tokens)"


def build_text_task(name: str = "text-gru") -> Task:
    """Train (or load from cache) ``text-gru`` and wrap it in a `Task` (test split: a second seed)."""
    x_train, y_train, _ = synthetic_corpus(N_TRAIN, SEED)
    x_test, y_test, _ = synthetic_corpus(N_TEST, SEED + 1)
    torch.manual_seed(TEXT_RECIPE.seed)
    model = TextGRU(len(vocabulary()))
    key = {"model": name, "architecture": repr(model), "grammar": [TOPICS, SEQ_LEN, TOPIC_BIAS, N_TRAIN],
           **TEXT_RECIPE.as_dict()}
    path = cache.cached_weights_path(name, key)
    if not cache.try_load(model, path):
        train_classifier(model, x_train, y_train, TEXT_RECIPE, desc=f"training {name}")
        cache.store(model, path)
    model.eval()
    return Task(name=name, model=model, eval_inputs=x_test, eval_targets=y_test, metric=accuracy,
                metric_name="accuracy", train_inputs=x_train, train_targets=y_train, description=DESCRIPTION,
                extras={"vocabulary": vocabulary()})
