"""What the local tuning stage trains: a block (what a strategy changed) and the original layers
it stands for (calibrate/reconstruct.py; convert/strategy_blocks.py builds them per strategy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class Block:
    name: str  # e.g. "layers 12-13"
    layers: list[nn.Module]  # the layers whose weights train (or carry LoRA)
    student: Callable[[torch.Tensor], torch.Tensor]  # x [b, T, d] -> s [b, T, d], differentiable
    original: Callable[[torch.Tensor], torch.Tensor]  # x -> y, the original layers in sequence
    after: Callable[[torch.Tensor], torch.Tensor]  # s -> the next block's input (layers between)
    passes: int = 0  # layers run by original, student and after together (one window each)


@dataclass
class Blocks:
    model: nn.Module  # the model the blocks train; all else in it stays frozen
    first_input: Callable[[torch.Tensor], torch.Tensor]  # ids [b, T] -> the first block's x
    blocks: list[Block]
    prefix: int = 0  # layers first_input runs

    def layer_passes(self) -> int:
        """Layers the stage runs per cached window without gradients, roughly: the prefix, and
        for each block its passes plus two more of its own layers (the error and the end pass)
        plus about as much again for the closed form's Gram matrix."""
        return self.prefix + sum(b.passes + 3 * len(b.layers) for b in self.blocks)



def cache_energy(x: torch.Tensor, y: torch.Tensor) -> float:
    """Σ‖y − x‖², the energy of the original blocks' deltas on the cache."""
    return max(sum(float((yb - xb).pow(2).sum()) for xb, yb in
                   zip(x.split(16), y.split(16), strict=True)), 1e-30)
