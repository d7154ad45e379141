"""Compressed layers. Each holds and computes with its factors, packed codes or kept channels."""
from workbench.layers.lowrank import LowRankConv2d, LowRankLinear

__all__ = ["LowRankConv2d", "LowRankLinear"]
