"""Next-token cross-entropy on answer tokens only, computing logits only where there is something to predict.

The language-model head is a 576 x 49k matmul per token; on a CPU it is a large share of a step when logits are
computed for image and prompt tokens whose labels are masked anyway. `logits_to_keep` (supported by transformers'
causal LMs and VLMs) takes the positions whose next token is an answer token in any row of the batch, so loss
and gradients are exactly those of the full computation, for a fraction of the head's cost.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # the label of tokens that are not predicted (prompt, image, padding); the data encoder writes it

# a loss over one batch: (model, batch) -> (mean loss, number of answer tokens); `answer_loss` is training's
LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int]]


def answer_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions whose next token is an answer token in some row (batch x positions x vocab), and the
    labels they predict (batch x positions, IGNORE_INDEX where that row has no answer token there)."""
    targets = batch["labels"][:, 1:]
    positions = (targets != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    return model(**inputs, logits_to_keep=positions).logits, targets[:, positions]


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over answer tokens, and how many answer tokens the batch had."""
    logits, picked = answer_logits(model, batch)
    count = int((picked != IGNORE_INDEX).sum())
    loss = F.cross_entropy(logits.float().flatten(0, 1), picked.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / max(count, 1), count
