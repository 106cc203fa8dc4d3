"""Weight broadcast: learner rank 0 sends every new policy version to the inference engines (docs/weight-broadcast.md).

- `weight_broadcast.config`: `BroadcastConfig` ([broadcast], learner) and `ReceiverConfig` ([weights], rollout node);
  torch-free.
- `weight_broadcast.sender.WeightSender`: hosts the rendezvous store, forms the groups, sends updates.
- `weight_broadcast.receiver.WeightReceiver`: the torch engine's end (store-triggered, verifies, loads atomically).
- `weight_broadcast.links`: the per-engine hook (`EngineLink`; `StoreLink`, `HttpLink` for SGLang's HTTP routes).
- `weight_broadcast.http_receiver`: SGLang's weight-update routes for `serve-engine` (`weight_routes`).

Nothing is imported here, so `import weight_broadcast.config` stays torch-free.
"""
