"""MiniLLM's loss (``losses.policy.minillm_loss``) follows the loss contract: sums over tokens, and the count.

Its value and gradient are tested against the exact reverse KL in test_methods_minillm_distillm.py;
here only that it is a sum (so a method hands it to the loop without rescaling it).
"""

from __future__ import annotations

import pytest
import torch

from lmdistill.losses.policy import minillm_loss


def test_minillm_loss_and_its_stats_are_sums_over_the_rows():
    """Without whitening (the only statistic across rows) every term is per token, so the batch's loss
    and statistics are the sums of the rows' ones, and stats["tokens"] counts the response tokens."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    teacher = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 1, 6], [-100, 2, 0, -100, -100]])
    kw = dict(mix_alpha=0.2, whiten_advantages=False)
    loss, stats = minillm_loss(student, teacher, labels, **kw)
    rows = [minillm_loss(student[i : i + 1], teacher[i : i + 1], labels[i : i + 1], **kw) for i in range(2)]
    torch.testing.assert_close(loss, rows[0][0] + rows[1][0])
    assert stats["tokens"] == 5.0
    for key in stats:
        assert stats[key] == pytest.approx(rows[0][1][key] + rows[1][1][key], rel=1e-12, abs=1e-12)
