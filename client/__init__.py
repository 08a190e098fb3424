"""fedllm's Flower ClientApp: trains adapters on the node's private data."""
