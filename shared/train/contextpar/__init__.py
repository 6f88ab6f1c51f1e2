"""Context parallelism: one sequence (or neat-packed row) split across N processes.

Each training row is cut into N contiguous shards, one per process of a context-parallel group of
N consecutive ranks; the world is data-parallel x N. Everything a token does on its own (embeddings,
norms, MLPs, experts, the output layer and the loss) runs on the shard; only attention needs the
other shards, and gets them one of two ways:

- Ulysses (attention.py): all-to-alls turn the sequence-sharded queries, keys and values into
  head-sharded ones over the whole row, the row's attention runs as lmforge's per-example sdpa
  (packedattn), and a fourth all-to-all shards its output by sequence again. Needs the query
  heads, and the key/value heads or a repeat of them, to divide among the N processes.
- ring (ring.py, blocks.py): key/value shards travel around the group; each process attends its
  own queries to each shard in turn and merges the partial results by their log-sum-exp. Any
  head count.

Causal masking, neat packing and sliding windows are exact: the attention functions read the
whole row's position ids (gathered once per forward), so every query sees exactly the keys of its
own example, before it and inside the window, whichever shard holds them. Rotary embeddings are
computed by the model from each shard's own position ids, so they are exact too.

Modules: checks (the setups that are refused, before anything loads), layout (process groups),
comm (collectives with their gradients), shard (batches cut into shards, loaders regrouped),
attention (installing the attention functions on a model; Ulysses), ring and blocks (ring
attention and its tiles), losses (sequence-level sums for preference and reward losses, the MoE
balancing loss), trainer (a Trainer mixin: loaders regrouped, the evaluation loss of whole rows).
"""
