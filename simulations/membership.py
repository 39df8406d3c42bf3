"""Membership inference: threshold attacks telling every site's training records from its
held-out records, scored by the ROC AUC (0.5 is chance) with its standard error, so a small
AUC can be told from noise.

The attacks score a record by its loss, by its loss calibrated against the base model, and by
the loss of its hardest tokens (Min-K%).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import TensorDataset

from privatune.common.examples import labelled_predictions, next_token_losses
from privatune.simulations.audit_sites import SiteSplit

# Min-K% Prob's default share of a record's tokens (Shi et al. 2024).
MIN_K_FRACTION = 0.2


def roc_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """Area under the ROC curve of "higher score = member": the Mann-Whitney U statistic,
    P(member > non-member) with ties counting half. 0.5 is chance, 1.0 a perfect attack."""
    if not member_scores or not nonmember_scores:
        raise ValueError("AUC needs at least one member and one non-member score")
    pooled = sorted([(float(s), 1) for s in member_scores] + [(float(s), 0) for s in nonmember_scores])
    rank_sum, position = 0.0, 0
    while position < len(pooled):
        end = position
        while end < len(pooled) and pooled[end][0] == pooled[position][0]:
            end += 1
        average_rank = (position + 1 + end) / 2.0  # 1-based ranks position+1 .. end
        rank_sum += average_rank * sum(label for _, label in pooled[position:end])
        position = end
    members, nonmembers = len(member_scores), len(nonmember_scores)
    u_statistic = rank_sum - members * (members + 1) / 2.0
    return u_statistic / (members * nonmembers)


def auc_standard_error(auc: float, members: int, nonmembers: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUC: how far from 0.5 is still noise."""
    if members < 1 or nonmembers < 1:
        raise ValueError("the standard error needs at least one member and one non-member")
    q1, q2 = auc / (2.0 - auc), 2.0 * auc * auc / (1.0 + auc)
    variance = (auc * (1.0 - auc) + (members - 1) * (q1 - auc * auc)
                + (nonmembers - 1) * (q2 - auc * auc)) / (members * nonmembers)
    return math.sqrt(max(variance, 0.0))


@torch.no_grad()
def record_token_losses(model: torch.nn.Module, dataset: TensorDataset,
                        batch_size: int) -> list[torch.Tensor]:
    """Every example's next-token losses (nats) at its labelled positions, one tensor each."""
    model.eval()
    losses: list[torch.Tensor] = []
    device = next(model.parameters()).device
    input_ids, labels, mask = dataset.tensors
    for start in range(0, len(input_ids), batch_size):
        stop = start + batch_size
        batch_labels = labels[start:stop]
        logits = model(input_ids=input_ids[start:stop].to(device),
                       attention_mask=mask[start:stop].to(device)).logits
        token_loss = next_token_losses(logits, batch_labels.to(device)).cpu()
        labelled = labelled_predictions(batch_labels)
        losses.extend(row[keep] for row, keep in zip(token_loss, labelled))
    return losses


def min_k_loss(token_losses: torch.Tensor, fraction: float = MIN_K_FRACTION) -> float:
    """Mean loss of a record's hardest ``fraction`` of tokens (Min-K% Prob, Shi et al. 2024).

    Notes share templates that any fine-tuned model predicts well, members or not; the tokens
    it still finds hard are the record's own details, where memorization shows.
    """
    if token_losses.numel() == 0:
        raise ValueError("a record with no labelled tokens cannot be scored")
    count = max(1, math.ceil(fraction * token_losses.numel()))
    return float(token_losses.topk(count).values.mean())


@dataclass(frozen=True)
class MembershipAttack:
    """A threshold attack: ``score`` (from a record's token losses under the audited model and
    under the base model) is high where it guesses "member"."""

    label: str
    score: Callable[[torch.Tensor, torch.Tensor], float]


# *loss* scores a record by its mean loss; *loss vs base model* by how much that fell from the
# base model's, which discounts records that are simply easy (Watson et al. 2022); *min_k* by
# the loss of its hardest tokens.
ATTACKS = {
    "loss": MembershipAttack("loss", lambda own, base: -float(own.mean())),
    "loss_vs_base": MembershipAttack("loss vs base model",
                                     lambda own, base: float(base.mean()) - float(own.mean())),
    "min_k": MembershipAttack(f"Min-K% ({MIN_K_FRACTION:.0%} hardest tokens)",
                              lambda own, base: -min_k_loss(own)),
}


@dataclass
class MembershipLosses:
    """Token losses of every site's training records (canaries excluded) and held-out records."""

    members: list[torch.Tensor]
    heldout: list[torch.Tensor]


def membership_losses(model: torch.nn.Module, splits: Sequence[SiteSplit],
                      batch_size: int) -> MembershipLosses:
    """The membership game's records, pooled over the sites in ``splits`` order."""
    losses = MembershipLosses([], [])
    for split in splits:
        if split.members is None or split.heldout is None:
            raise ValueError(f"{split.name}: records are not encoded yet")
        losses.members += record_token_losses(model, split.members, batch_size)
        losses.heldout += record_token_losses(model, split.heldout, batch_size)
    return losses


def membership_attacks(losses: MembershipLosses, reference: MembershipLosses) -> dict[str, Any]:
    """AUC and standard error of each attack in ATTACKS on the pooled records; ``reference``
    holds the same records' losses under the base model."""
    members, nonmembers = len(losses.members), len(losses.heldout)
    attacks = {}
    for key, attack in ATTACKS.items():
        auc = roc_auc([attack.score(o, b) for o, b in zip(losses.members, reference.members)],
                      [attack.score(o, b) for o, b in zip(losses.heldout, reference.heldout)])
        attacks[key] = {"auc": auc, "standard_error": auc_standard_error(auc, members, nonmembers)}
    return attacks


def strongest_attack(run: dict[str, Any]) -> float:
    """The highest membership AUC of a run's attacks: what the best of them achieved."""
    return max(attack["auc"] for attack in run["mia"]["attacks"].values())
