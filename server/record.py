"""What a run leaves behind: metrics.jsonl (one line per round), summary.json, accuracy.png."""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedllm.config import RunConfig
from fedllm.core.aggregator import Aggregator
from fedllm.outputs import append_private, claim_output_folder, write_private
from fedllm.privacy.central import ServerDp
from fedllm.train import mean_accuracy
from server.grid import MeteredGrid


@dataclass
class RoundResult:
    """What a round of any kind gives the loop to record (the new ΔW_g is the aggregator's)."""

    clients: int  # updates that entered the merge (secure: clients in the sum)
    timed_out: int  # sampled nodes that did not reply in time
    train_loss: float | None = None  # weighted mean of the clients' (None: withheld under DP)
    rejected: list[str] = field(default_factory=list)  # why each rejected reply was
    client_processes: list = field(default_factory=list)  # (pid, model builds) of the client processes
    train_seconds: dict[int, float] = field(default_factory=dict)  # partition -> its client's local training time
    aggregate_seconds: float = 0.0  # the server's merge (plain rounds; a secure round's sum is the protocol's)
    min_survivors: int | None = None  # secure rounds: the fewest clients the sum could have completed with


def weighted_loss(losses: dict[int, float], weights: dict[int, float]) -> float:
    """The clients' train losses weighted as they were merged."""
    return float(sum(losses[n] * w for n, w in weights.items()) / sum(weights.values()))


def output_dir_for(cfg: RunConfig) -> Path:
    """`output-dir`, else the `resume-from` folder, else outputs/<timestamp>: absolute, private, and
    refused (untouched) if it holds an earlier run this one does not resume or overwrite."""
    chosen = cfg.output_dir or cfg.resume_from or os.path.join("outputs", time.strftime("%Y%m%d-%H%M%S"))
    path = Path(chosen).expanduser().resolve()
    return claim_output_folder(path, resuming=cfg.resumes(path), overwrite=cfg.overwrite)


class RunRecorder:
    """Appends one JSON object per round and writes the summary and plot at the end."""

    def __init__(self, out_dir: Path, cfg: RunConfig) -> None:
        self.out_dir = out_dir
        self.cfg = cfg
        self.rounds: list[dict[str, Any]] = []
        self.stop_reason = ""  # why the run ended before num-server-rounds ('' if it did not)
        self.metrics_path = out_dir / "metrics.jsonl"
        write_private(self.metrics_path, b"")

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """Continue from a resumed run's rows (metrics.jsonl is rewritten to exactly those)."""
        self.rounds = list(rows)
        write_private(self.metrics_path, "".join(json.dumps(row) + "\n" for row in rows).encode())

    def record(self, server_round: int, per_task: dict[str, float], **fields: Any) -> dict[str, Any]:
        row = {"round": server_round, "accuracy": mean_accuracy(per_task), "per_task_accuracy": per_task, **fields,
               "time": time.time()}
        self.rounds.append(row)
        append_private(self.metrics_path, json.dumps(row) + "\n")
        return row

    def record_round(self, server_round: int, per_task: dict[str, float], scores: dict[str, Any], result: RoundResult,
                     aggregator: Aggregator, grid: MeteredGrid, evaluate_seconds: float, round_seconds: float) -> dict[str, Any]:
        """A trained round's row: accuracy and the server method's scores, the round's result,
        bytes per partition, the aggregator's notes, timings and (DP) privacy spent."""
        partitions = aggregator.nodes.partition_of()
        upload, download = ({partitions[n]: size for n, size in counts.items() if n in partitions}
                            for counts in (grid.received, grid.sent))
        return self.record(
            server_round, per_task, train_loss=result.train_loss, clients=result.clients, rejected=len(result.rejected),
            rejected_reasons=result.rejected, timed_out=result.timed_out, bounded=aggregator.bounded,
            upload_bytes=sum(upload.values()), download_bytes=sum(download.values()),
            client_upload_bytes=upload, client_download_bytes=download,
            refactor_error={str(r): s.relative_error for r, s in aggregator.sent.items()},
            client_processes=result.client_processes, round_seconds=round_seconds,
            client_train_seconds=result.train_seconds, refactor_seconds=aggregator.refactor_seconds,
            aggregate_seconds=result.aggregate_seconds, evaluate_seconds=evaluate_seconds, **scores,
            **self.privacy_fields(aggregator.dp),
        )

    @staticmethod
    def privacy_fields(dp: ServerDp | None) -> dict[str, float]:
        """ε spent so far, the last round's noise multiplier and the clip norm the next round uses (DP runs only)."""
        if dp is None:
            return {}
        last = {"dp_noise_multiplier": dp.releases[-1]} if dp.releases else {}
        return {"epsilon": dp.epsilon(), **last, "dp_clip_norm": dp.clip_norm}

    def finish(self, **fields: Any) -> dict[str, Any]:
        first, last = self.rounds[0], self.rounds[-1]
        summary = {
            "base_accuracy": first["accuracy"],
            "final_accuracy": last["accuracy"],
            "per_task_accuracy": last["per_task_accuracy"],
            "base_per_task_accuracy": first["per_task_accuracy"],
            "rounds": last["round"],
            "upload_bytes": sum(r.get("upload_bytes", 0) for r in self.rounds),
            "download_bytes": sum(r.get("download_bytes", 0) for r in self.rounds),
            **({"epsilon": last["epsilon"], "dp_delta": self.cfg.dp_delta} if "epsilon" in last else {}),
            **({"stop_reason": self.stop_reason} if self.stop_reason else {}),
            **fields,
            "config": self.cfg.as_dict(),
        }
        write_private(self.out_dir / "summary.json", json.dumps(summary, indent=2).encode())
        write_private(self.out_dir / "accuracy.png", plot_accuracy(self.rounds))
        return summary


def plot_accuracy(rounds: list[dict[str, Any]]) -> bytes:
    """Mean and per-task accuracy per round, and the clients' train loss, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["round"] for r in rounds]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for task in rounds[0]["per_task_accuracy"]:
        acc_ax.plot(xs, [r["per_task_accuracy"][task] for r in rounds], alpha=0.6, linewidth=1, label=task)
    acc_ax.plot(xs, [r["accuracy"] for r in rounds], color="black", linewidth=2.5, label="mean")
    acc_ax.set(xlabel="round", ylabel="exact-match accuracy", ylim=(-0.02, 1.02), title="server model, test split")
    acc_ax.legend(fontsize=8, ncol=2)
    trained = [r for r in rounds if r.get("train_loss") is not None]
    loss_ax.plot([r["round"] for r in trained], [r["train_loss"] for r in trained], marker="o")
    loss_ax.set(xlabel="round", ylabel="mean client train loss", title="local training")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    return image.getvalue()
