"""Figures for your own models: stages found automatically, real halving, live latency.

Prints one JSON document (strict) and writes its table to `docs/results/own-models.md`:

* ``bert6``: a 6-block BERT built from MiniLM's config with RANDOM weights (nothing downloaded),
  passed to `wb.load` as a plain user model on the same 64 evaluation sentences the embedded
  MiniLM's live view uses (as ``texts=`` with MiniLM's tokenizer, and as padded ids without a
  mask): slider-move latency (`bench latency`'s harness) next to the embedded MiniLM's in the same
  run, the tutorial method's, the tokens each runs, and the stages found;
* ``gpt2``: GPT-2 (4 blocks, from a config): SVD at ratio 0.5 on its Conv1D layers, the block
  weights before and after, and which stages a move in the last block re-runs;
* ``resnet``: a hand-written residual CNN with BatchNorm on the digits: the same for its last block.

Run: ``.venv/bin/python benchmarks/own_models.py [--moves 100]`` (2 threads, ~6 minutes at 100 moves).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

import workbench as wb
from workbench.cli.bench import latency
from workbench.data import digits_split
from workbench.engine.batching import evaluation_batches
from workbench.results import dumps
from workbench.zoo.minilm import tokenizer as minilm_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from doc_results import write_section  # noqa: E402


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResidualCNN(nn.Module):
    def __init__(self, channels: int = 32, blocks: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.blocks = nn.ModuleList(ResidualBlock(channels) for _ in range(blocks))
        self.head = nn.Linear(channels, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x.reshape(-1, 1, 8, 8)))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((2, 3)))


def block_params(model: nn.Module, prefix: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


def last_block_move(task, layer: str, rank: int) -> dict:
    engine = wb.Engine(task, freeze_gc=False)
    plan = wb.Plan({layer: wb.LayerPlan("svd", {"rank": rank})})
    result = engine.evaluate(plan)
    applied = task.evaluate(wb.apply(task.model, plan))
    return {"stages_found": engine.report()["stages_found"], "stages": len(engine.stages),
            "moved_layer": layer, "from_stage": result["from_stage"], "stages_run": result["stages_run"],
            "metric_equals_apply": abs(result["metric"] - applied) <= 1e-6 * max(1.0, abs(applied))}


def bert6(moves: int) -> dict:
    """The 6-block BERT as a user would pass it, two ways: the 64 sentences as ``texts=`` with the
    tokenizer (ids and attention mask, texts of similar length batched together and each batch
    trimmed to its longest text: `workbench.zoo.masked_text`), and as plain padded ids with no mask
    (every pad token is run through every block)."""
    minilm = wb.load("minilm")
    live = minilm.subset(minilm.live_subset)
    ids, mask = live.eval_inputs[:, 0], live.eval_inputs[:, 1]
    ids = ids[:, :int(mask.sum(1).max())]  # padded to the longest sentence, no mask
    index = torch.linspace(0, len(minilm.eval_inputs) - 1, minilm.live_subset).round().long()
    texts = [minilm.extras["sentences"][i] for i in index.tolist()]
    torch.manual_seed(0)
    config = BertConfig(**{**minilm.model.bert.config.to_dict(), "num_hidden_layers": 6})
    bert = BertModel(config).eval()
    by_texts = wb.load(bert, texts=texts, tokenizer=minilm_tokenizer(), name="bert6-texts")
    by_ids = wb.load(bert, eval_data=ids, name="bert6-ids")
    mine, embedded = latency(by_texts, moves=moves, render=False), latency("minilm", moves=moves, render=False)
    plain = latency(by_ids, moves=moves, render=False)
    batches, _ = evaluation_batches(by_texts.model, by_texts.eval_inputs, 4096)  # as the Engine groups them (its default batch_size)
    tokens = int(mask.sum())
    return {"user_p50_ms": mine["p50_ms"], "user_p95_ms": mine["p95_ms"],
            "user_tutorial_p50_ms": mine["naive_p50_ms"], "user_speedup": mine["speedup"],
            "minilm_p50_ms": embedded["p50_ms"], "minilm_p95_ms": embedded["p95_ms"],
            "minilm_speedup": embedded["speedup"],
            "p95_ratio_to_minilm": mine["p95_ms"] / embedded["p95_ms"],
            "user_batches": len(batches),
            "user_tokens_run": sum(int(b[:, 1].sum(1).max()) * len(b) for b in batches),
            "real_tokens": tokens, "padded_tokens": ids.numel(),
            "ids_p50_ms": plain["p50_ms"], "ids_p95_ms": plain["p95_ms"], "ids_speedup": plain["speedup"],
            "ids_p95_ratio_to_minilm": plain["p95_ms"] / embedded["p95_ms"],
            "metric_agrees": mine["metric_agrees"] and plain["metric_agrees"],
            "stages_found": mine["engine"]["stages_found"], "sentences": len(texts)}


def gpt2() -> dict:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=512, n_positions=64)).eval()
    ids = torch.randint(0, 512, (32, 32))
    task = wb.load(model, eval_data=ids)
    small = wb.apply(task.model, wb.recipe("svd")(task.model, ratio=0.5))
    before, after = block_params(task.model, "transformer.h."), block_params(small, "transformer.h.")
    return {"block_params_before": before, "block_params_after": after, "kept": after / before,
            "perplexity_before": task.evaluate(task.model), "perplexity_after": task.evaluate(small),
            **last_block_move(task, "transformer.h.3.mlp.c_fc", 16)}


def resnet() -> dict:
    torch.manual_seed(0)
    model = ResidualCNN().eval()
    task = wb.load(model, eval_data=digits_split().x_test)  # the test images, (360, 64)
    return last_block_move(task, "blocks.2.conv2", 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--moves", type=int, default=100, help="slider moves (default 100, as bench latency)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = {"threads": torch.get_num_threads(), "bert6": bert6(args.moves), "gpt2": gpt2(), "resnet": resnet()}
    print(dumps(result, indent=1))
    b, g, r = result["bert6"], result["gpt2"], result["resnet"]
    rows = [
        "| model | figure | value |", "|---|---|---|",
        f"| 6-block BERT (random weights), user model, texts= | slider move p50 / p95 "
        f"| {b['user_p50_ms']:.0f} / {b['user_p95_ms']:.0f} ms |",
        f"| embedded MiniLM, same run | slider move p50 / p95 | {b['minilm_p50_ms']:.0f} / {b['minilm_p95_ms']:.0f} ms |",
        f"| 6-block BERT, texts= | p95 against MiniLM's | {b['p95_ratio_to_minilm']:.2f}x |",
        f"| 6-block BERT, texts= | tutorial method p50 (speed-up) | {b['user_tutorial_p50_ms']:.0f} ms ({b['user_speedup']:.1f}x) |",
        f"| embedded MiniLM, same run | speed-up over the tutorial method | {b['minilm_speedup']:.1f}x |",
        f"| 6-block BERT, texts= | tokens run per move ({b['user_batches']} length-grouped batches) / real tokens "
        f"| {b['user_tokens_run']:,} / {b['real_tokens']:,} |",
        f"| 6-block BERT, padded ids without a mask ({b['padded_tokens']:,} tokens) | p50 / p95 (against MiniLM's "
        f"p95); speed-up | {b['ids_p50_ms']:.0f} / {b['ids_p95_ms']:.0f} ms ({b['ids_p95_ratio_to_minilm']:.2f}x); "
        f"{b['ids_speedup']:.1f}x |",
        f"| 6-block BERT | stages | {b['stages_found']} |",
        f"| GPT-2, 4 blocks | block weights kept by SVD at ratio 0.5 | {g['kept']:.3f} "
        f"({g['block_params_before']:,} -> {g['block_params_after']:,}) |",
        f"| GPT-2 | a move in the last block | from stage {g['from_stage']} of {g['stages']}, {g['stages_run']} run |",
        f"| residual CNN + BatchNorm | a move in the last block | from stage {r['from_stage']} of {r['stages']}, {r['stages_run']} run |",
    ]
    write_section("own-models", f"own-models moves={args.moves}", "\n".join(rows), title="Your own models")


if __name__ == "__main__":
    main()
