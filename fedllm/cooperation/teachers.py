"""Which client model teaches the server a public prompt, when several answered it.

Without labels, agreement is the signal: clients that learned a task give the same answer, and
those that did not scatter. So the answer most clients give wins, and among them the most
confident client teaches (its token distributions are the target). When every answer differs,
as with two clients that hold different tasks, this is FedMKT's "greater" rule alone: the most
confident client (highest mean log-probability of its own answer). An example weighs as much as
the share of clients that agree with it, so a lone answer counts less than a shared one."""

from __future__ import annotations

from collections import Counter


def choose_teacher(texts: dict[int, str], confidences: dict[int, float]) -> tuple[int, float]:
    """The node (a key of `texts`) whose answer is learned, ties to the lower node id; and the
    share of nodes that gave its answer, which weighs the example in distillation."""
    votes = Counter(texts.values())
    most = max(votes.values())
    agreeing = [node for node in sorted(texts) if votes[texts[node]] == most]
    return max(agreeing, key=lambda node: confidences[node]), most / len(texts)
