"""Cooperation across models: client models of any family teach the server LLM, and it teaches
them back, by token distributions on public prompts (FedMKT, Fan et al., COLING 2025, arXiv 2406.02224).

- `knowledge`: a model's greedy answers to public prompts with the top-k of each token's
  distribution; what crosses the network, checked like any update;
- `align`: such answers carried into another tokenizer's tokens (exact when the tokenizers match);
- `distill`: training an adapter towards aligned targets;
- `settings`: the run-config keys.
"""
