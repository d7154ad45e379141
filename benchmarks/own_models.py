"""Figures for your own models: stages found automatically, real halving, live latency.

Prints one JSON document (strict) and writes its table to `docs/results/own-models.md`:

* ``bert6``: a 6-block BERT built from MiniLM's config with RANDOM weights (nothing downloaded),
  passed to `wb.load` as a plain user model on the ids of the same 64 evaluation sentences the
  embedded MiniLM's live view uses: slider-move latency (`bench latency`'s harness) next to the
  embedded MiniLM's in the same run, the tutorial method's, and the stages found;
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
from workbench.results import dumps

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
    minilm = wb.load("minilm")
    live = minilm.subset(minilm.live_subset)
    ids, mask = live.eval_inputs[:, 0], live.eval_inputs[:, 1]
    ids = ids[:, :int(mask.sum(1).max())]  # padded to the longest sentence, no mask: a plain user's ids
    torch.manual_seed(0)
    config = BertConfig(**{**minilm.model.bert.config.to_dict(), "num_hidden_layers": 6})
    user = wb.load(BertModel(config).eval(), eval_data=ids)
    mine, embedded = latency(user, moves=moves, render=False), latency("minilm", moves=moves, render=False)
    return {"user_p50_ms": mine["p50_ms"], "user_p95_ms": mine["p95_ms"],
            "user_tutorial_p50_ms": mine["naive_p50_ms"], "user_speedup": mine["speedup"],
            "minilm_p50_ms": embedded["p50_ms"], "minilm_p95_ms": embedded["p95_ms"],
            "p95_ratio_to_minilm": mine["p95_ms"] / embedded["p95_ms"],
            # the same 64 sentences: the user's padded ids run every pad token through every block,
            # MiniLM packs only the real tokens into rows (`workbench.zoo.minilm.pack_rows`)
            "user_tokens": ids.numel(), "minilm_tokens": int(mask.sum()),
            "p95_per_token_ratio": (mine["p95_ms"] / ids.numel()) / (embedded["p95_ms"] / int(mask.sum())),
            "minilm_speedup": embedded["speedup"],
            "stages_found": mine["engine"]["stages_found"], "sentences": len(ids)}


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
        f"| 6-block BERT (random weights), user model | slider move p50 / p95 | {b['user_p50_ms']:.0f} / {b['user_p95_ms']:.0f} ms |",
        f"| embedded MiniLM, same run | slider move p50 / p95 | {b['minilm_p50_ms']:.0f} / {b['minilm_p95_ms']:.0f} ms |",
        f"| 6-block BERT | p95 against MiniLM's | {b['p95_ratio_to_minilm']:.2f}x |",
        f"| 6-block BERT | tokens run per move (padded ids) against MiniLM's (packed) | {b['user_tokens']:,} / {b['minilm_tokens']:,} |",
        f"| 6-block BERT | p95 per token against MiniLM's | {b['p95_per_token_ratio']:.2f}x |",
        f"| 6-block BERT | tutorial method p50 (speed-up) | {b['user_tutorial_p50_ms']:.0f} ms ({b['user_speedup']:.1f}x) |",
        f"| embedded MiniLM, same run | speed-up over the tutorial method | {b['minilm_speedup']:.1f}x |",
        f"| 6-block BERT | stages | {b['stages_found']} |",
        f"| GPT-2, 4 blocks | block weights kept by SVD at ratio 0.5 | {g['kept']:.3f} ({g['block_params_before']:,} -> {g['block_params_after']:,}) |",
        f"| GPT-2 | a move in the last block | from stage {g['from_stage']} of {g['stages']}, {g['stages_run']} run |",
        f"| residual CNN + BatchNorm | a move in the last block | from stage {r['from_stage']} of {r['stages']}, {r['stages_run']} run |",
    ]
    write_section("own-models", f"own-models moves={args.moves}", "\n".join(rows), title="Your own models")


if __name__ == "__main__":
    main()
