"""fedllm's Flower ServerApp: samples nodes, merges their updates, evaluates and exports."""
