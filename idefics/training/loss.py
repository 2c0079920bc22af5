"""Next-token loss over the full logit width (base vocabulary + new tokens), plus z-loss.

For the targets t of a batch (positions whose next token has a label; see collate.py), with logits
x_t over all V + A classes (A = additional tokens, which a 32000-wide loss would silently drop — the bug of
transformers 5.x IDEFICS) and log Z_t = logsumexp(x_t):

    ce_t = log Z_t - x_t[y_t]
    z_t  = (log Z_t)^2
    loss = (sum_t ce_t + z_weight * sum_t z_t) / N

N is the number of targets in the whole optimizer step (all micro-batches, all processes), so gradient
accumulation and data parallelism give the same gradient as one big batch.

Which z-loss: PaLM's mean of squares over the target positions, not OpenFlamingo's square of the mean over
all positions. Squaring the mean lets positions with log Z above and below 0 cancel, so it does not stop
any single position's normaliser from drifting, which is what z-loss is for (keeping logits from growing
without bound, a bf16 stability issue); and padding and image positions have no target, so their logits
should not steer training. Logits are upcast to float32 before logsumexp.

With a frozen language model whose log Z sits far from 0 (SmolLM2: about 28 at every position) the term is
large from the start and its gradient asks the new blocks to shrink the frozen model's normaliser; keep the
weight small there (idefics-mini uses 1e-4 instead of the recipe's 1e-3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .collate import IGNORE_INDEX


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels aligned with the inputs → the label each position predicts (the next one's), [B, T]."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def loss_terms(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target cross-entropy and z for logits [N, V + A] and targets [N]: (ce [N], z [N]), float32."""
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1)
    ce = log_z - logits.gather(-1, targets[:, None]).squeeze(-1)
    return ce, log_z.square()


class LossModel(nn.Module):
    """The model plus its loss, as one module for DDP/FSDP to wrap. Only the positions that have a target go
    through the output layer: the vocabulary projection of the other positions would be thrown away.

    forward → (ce_sum, z_sum, n_targets) for one micro-batch; the trainer divides by the step's target count."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                pixel_values: torch.Tensor | None = None,
                image_attention_mask: torch.Tensor | None = None,
                image_class_probs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        states = None
        if image_class_probs is not None and pixel_values is not None:  # made-up classifier predictions
            states = self.model.model.encode_images(pixel_values, image_attention_mask, image_class_probs)
            pixel_values = None
        hidden, _ = self.model.model(input_ids, attention_mask, pixel_values, image_attention_mask, states)
        targets = shift_labels(labels)
        keep = targets != IGNORE_INDEX
        ce, z = loss_terms(self.model.lm_head(hidden[keep]), targets[keep])
        return ce.sum(), z.sum(), keep.sum()


def reference_loss(logits: torch.Tensor, labels: torch.Tensor, z_weight: float) -> torch.Tensor:
    """The formula above, written out on full [B, T, V + A] logits (for tests and evaluation scripts)."""
    targets = shift_labels(labels)
    keep = targets != IGNORE_INDEX
    selected = logits[keep].float()
    log_z = torch.logsumexp(selected, -1)
    ce = F.cross_entropy(selected, targets[keep], reduction="sum")
    return (ce + z_weight * log_z.square().sum()) / keep.sum()
