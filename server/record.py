"""What a run leaves behind: metrics.jsonl (one line per round), summary.json, accuracy.png."""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedllm.config import RunConfig
from fedllm.core.aggregator import Aggregator
from fedllm.outputs import append_private, claim_output_folder, write_private
from fedllm.privacy.central import ServerDp


Traffic = tuple[Counter, Counter]  # bytes sent to and received from each node (`MeteredGrid.take_counts`)


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
    startup_seconds: dict[int, float] = field(default_factory=dict)  # partition -> its ClientApp process's start-up
    overhead_seconds: dict[int, float] = field(default_factory=dict)  # partition -> its message's time outside training
    extra: dict[str, Any] = field(default_factory=dict)  # more fields for the row (cooperation's)


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

    def record(self, server_round: int, **fields: Any) -> dict[str, Any]:
        row = {"round": server_round, **fields, "time": time.time()}
        self.rounds.append(row)
        append_private(self.metrics_path, json.dumps(row) + "\n")
        return row

    def record_round(self, server_round: int, evaluation: dict[str, Any], result: RoundResult, aggregator: Aggregator,
                     traffic: Traffic, evaluation_traffic: Traffic, round_seconds: float) -> dict[str, Any]:
        """A trained round's row: the evaluation's fields (none on a round not scored), the round's
        result, bytes per partition, the aggregator's notes, timings and (DP) privacy spent."""
        partitions = aggregator.nodes.partition_of()
        sent, received = traffic
        upload, download = ({partitions[n]: size for n, size in counts.items() if n in partitions}
                            for counts in (received, sent))
        return self.record(
            server_round, **evaluation, **self.evaluation_traffic(evaluation_traffic), train_loss=result.train_loss, clients=result.clients, rejected=len(result.rejected),
            rejected_reasons=result.rejected, timed_out=result.timed_out, bounded=aggregator.bounded,
            upload_bytes=sum(upload.values()), download_bytes=sum(download.values()),
            client_upload_bytes=upload, client_download_bytes=download,
            refactor_error={str(r): s.relative_error for r, s in aggregator.sent.items()},
            client_processes=result.client_processes, round_seconds=round_seconds,
            client_train_seconds=result.train_seconds, client_startup_seconds=result.startup_seconds,
            client_overhead_seconds=result.overhead_seconds,
            refactor_seconds=aggregator.refactor_seconds,
            aggregate_seconds=result.aggregate_seconds,
            **self.privacy_fields(aggregator.dp), **result.extra,
        )

    @staticmethod
    def evaluation_traffic(traffic: Traffic) -> dict[str, int]:
        """Bytes of the evaluation messages (none when the server evaluates alone)."""
        sent, received = traffic
        return {"evaluate_upload_bytes": sum(received.values()), "evaluate_download_bytes": sum(sent.values())} if sent else {}

    @staticmethod
    def privacy_fields(dp: ServerDp | None) -> dict[str, float]:
        """ε spent so far, the last round's noise multiplier and the clip norm the next round uses (DP runs only)."""
        if dp is None:
            return {}
        last = {"dp_noise_multiplier": dp.releases[-1]} if dp.releases else {}
        return {"epsilon": dp.epsilon(), **last, "dp_clip_norm": dp.clip_norm}

    def finish(self, **fields: Any) -> dict[str, Any]:
        """summary.json (the base and final scores are those of the first and last rounds scored) and the plot."""
        scored = [row for row in self.rounds if "accuracy" in row]
        first, last = scored[0], scored[-1]
        summary = {
            "metric": self.cfg.metric,
            "base_accuracy": first["accuracy"],
            "final_accuracy": last["accuracy"],
            "per_task_accuracy": last["per_task_accuracy"],
            "base_per_task_accuracy": first["per_task_accuracy"],
            "final_metrics": last.get("metrics"),  # rows of runs before fedllm recorded every metric lack it
            **{key: last[key] for key in ("client_accuracy", "server_accuracy") if key in last},
            **({"final_validation_accuracy": last["validation_accuracy"]} if "validation_accuracy" in last else {}),
            "final_round_scored": last["round"],
            "rounds": self.rounds[-1]["round"],
            "upload_bytes": sum(r.get("upload_bytes", 0) for r in self.rounds),
            "download_bytes": sum(r.get("download_bytes", 0) for r in self.rounds),
            **({"epsilon": self.rounds[-1]["epsilon"], "dp_delta": self.cfg.dp_delta} if "epsilon" in last else {}),
            **({"stop_reason": self.stop_reason} if self.stop_reason else {}),
            **fields,
            "config": self.cfg.as_dict(),
        }
        write_private(self.out_dir / "summary.json", json.dumps(summary, indent=2).encode())
        write_private(self.out_dir / "accuracy.png", plot_accuracy(self.rounds, self.cfg.metric))
        return summary


def plot_accuracy(rounds: list[dict[str, Any]], metric: str) -> bytes:
    """The headline metric, mean and per task, over the rounds scored, and the clients' train loss, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rounds if "accuracy" in r]
    xs = [r["round"] for r in scored]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for task in dict.fromkeys(t for r in scored for t in r["per_task_accuracy"]):
        acc_ax.plot(xs, [r["per_task_accuracy"].get(task, math.nan) for r in scored], alpha=0.6, linewidth=1, label=task)
    acc_ax.plot(xs, [r["accuracy"] for r in scored], color="black", linewidth=2.5, label="mean")
    where = "clients' held-out splits" if "client_examples" in scored[0] else "server's test split"
    acc_ax.set(xlabel="round", ylabel=metric, ylim=(-0.02, 1.02), title=f"global model, {where}")
    acc_ax.legend(fontsize=8, ncol=2)
    trained = [r for r in rounds if r.get("train_loss") is not None]
    loss_ax.plot([r["round"] for r in trained], [r["train_loss"] for r in trained], marker="o")
    loss_ax.set(xlabel="round", ylabel="mean client train loss", title="local training")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    return image.getvalue()
