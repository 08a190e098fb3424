"""The ServerApp: parse the run config, run the rounds, write and export the results."""

from __future__ import annotations

import time
from dataclasses import asdict
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import FLOWER_LOGGER, log
from flwr.serverapp import Grid, ServerApp

from fedllm.checkpoint import RunState, load_state
from fedllm.config import RunConfig
from fedllm.core.aggregator import Aggregator
from fedllm.core.local import run_splits
from fedllm.core.server_model import ServerModel
from fedllm.logs import quiet_third_party
from fedllm.models import builtin_weights_digest
from fedllm.outputs import earlier_run, make_private, private_folder
from server.cooperation import Cooperation
from server.emulators import EmulatorFleet
from server.grid import MeteredGrid
from server.loop import Run, run_rounds
from server.record import RunRecorder, output_dir_for

app = ServerApp()


def resumed_state(cfg: RunConfig, out_dir: Path) -> RunState | None:
    """The state to continue from (`resume-from`, or `output-dir` with `resume`; the newest
    checkpoint or that of `resume-round`), else None."""
    if cfg.resume_from:
        return load_state(Path(cfg.resume_from).expanduser().resolve(), cfg.as_dict(), cfg.digest(), cfg.resume_round)
    if cfg.resume and earlier_run(out_dir):
        return load_state(out_dir, cfg.as_dict(), cfg.digest(), cfg.resume_round)
    if cfg.resume:
        log(INFO, "resume = true but %s has no run state yet: starting from round 0", out_dir)
    return None


def export(server: ServerModel, final_update, out_dir: Path) -> float:  # noqa: ANN001 - a Delta
    """`model/` and `adapter/` written by transformers and peft into private folders (never
    through a link), tightened to 0700 / 0600 after."""
    names = ("model", "adapter") if server.method.merges_into_weights else ("adapter",)
    folders = [private_folder(out_dir / name) for name in names]
    error = server.export(final_update, out_dir)
    for folder in folders:
        make_private(folder)
    return error


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.perf_counter()
    quiet_third_party(FLOWER_LOGGER.handlers)
    cfg = RunConfig.from_flower(context.run_config)
    out_dir = output_dir_for(cfg)
    log(INFO, "fedllm run: outputs in %s", out_dir)
    # with evaluation = 'clients' the server reads no data at all
    _, validation, test = ([], [], []) if cfg.evaluation == "clients" else run_splits(cfg)
    resumed = resumed_state(cfg, out_dir)
    server = ServerModel(cfg, test, validation=validation)
    aggregator = Aggregator(cfg, server.method)
    for note in aggregator.dp.describe() if aggregator.dp is not None else []:
        log(WARNING, "%s", note)
    # nodes may train on emulators (the run's client-model, or their own); built before any update is installed
    emulators = EmulatorFleet(cfg, server) if cfg.emulator_refusal() is None else None
    # nodes may train other models, which teach the server model through their answers on public prompts
    cooperation = Cooperation(cfg, server, aggregator.nodes, test) if cfg.cooperation != "none" else None
    grid = MeteredGrid(grid, Path(cfg.audit_dir).expanduser() if cfg.audit_dir else None)
    recorder = RunRecorder(out_dir, cfg)
    run_rounds(Run(grid, context, aggregator, server, recorder, emulators, cooperation), cfg.num_server_rounds,
               cfg.round_timeout, resumed)
    final = aggregator.server_method.final_update(aggregator)
    adapter_error = export(server, final, out_dir) if final is not None else None
    summary = recorder.finish(
        adapter_truncation_error=adapter_error,
        refactor_error=recorder.rounds[-1].get("refactor_error", {}),
        nodes=sorted((asdict(info) for info in aggregator.nodes.nodes.values()), key=lambda n: n["partition_id"]),
        refused_nodes={str(node): reason for node, reason in sorted(aggregator.nodes.refused.items())},
        wall_seconds=time.perf_counter() - started,
        base_weights=builtin_weights_digest(cfg.model),
        **({"emulators": emulators.report()} if emulators is not None else {}),
    )
    log(INFO, "done: %s %.3f -> %.3f over %d rounds; outputs in %s", summary["metric"],
        summary["base_accuracy"], summary["final_accuracy"], summary["rounds"], out_dir)
