"""The ServerApp: parse the run config, run the rounds, write and export the results."""

from __future__ import annotations

import time
from logging import INFO

from flwr.app import Context
from flwr.common.logger import FLOWER_LOGGER, log
from flwr.serverapp import Grid, ServerApp

from fedllm.config import RunConfig
from fedllm.data import load_splits
from fedllm.logs import quiet_third_party
from server.loop import run_rounds
from server.model import ServerModel
from server.record import RunRecorder, output_dir_for
from server.strategy import ModelSpaceStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.perf_counter()
    quiet_third_party(FLOWER_LOGGER.handlers)
    cfg = RunConfig.from_flower(context.run_config)
    out_dir = output_dir_for(cfg)
    log(INFO, "fedllm run: outputs in %s", out_dir)
    _, test = load_splits(cfg.dataset, seed=cfg.seed, train_per_task=cfg.train_per_task,
                          test_per_task=cfg.test_per_task, test_fraction=cfg.test_fraction)
    server = ServerModel(cfg, test)
    strategy = ModelSpaceStrategy(cfg, server.layouts)
    recorder = RunRecorder(out_dir, cfg)
    global_delta = run_rounds(grid, strategy, server, recorder, cfg.num_server_rounds, cfg.round_timeout)
    adapter_error = server.export(global_delta, out_dir)
    summary = recorder.finish(adapter_truncation_error=adapter_error, wall_seconds=time.perf_counter() - started)
    log(INFO, "done: accuracy %.3f -> %.3f over %d rounds; outputs in %s",
        summary["base_accuracy"], summary["final_accuracy"], summary["rounds"], out_dir)
