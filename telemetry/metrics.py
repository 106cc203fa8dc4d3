"""Every Slipstream metric, defined once, on one isolated registry (never prometheus_client's global one).

Names: `slipstream_` prefix, base units (seconds, bytes, ratios in 0..1), `_total` for counters, histograms for
latencies and staleness. Labels stay low-cardinality: the node id is a process constant exposed once through
`slipstream_node_info`, never as a label on other series. Import the objects by name:

    from telemetry.metrics import LEARNER_DROPPED_SAMPLES, set_node_info
    set_node_info("learner-0", "learner")
    LEARNER_DROPPED_SAMPLES.labels(reason="stale").inc(3)

| metric                                                | type      | labels                 |
|-------------------------------------------------------|-----------|------------------------|
| slipstream_node_info                                  | info      | node_id, role, version |
| slipstream_bus_messages_total                         | counter   | stream, event          |
| slipstream_bus_reconnects_total                       | counter   | transport              |
| slipstream_bus_stream_length                          | gauge     | stream                 |
| slipstream_bus_pending_messages                       | gauge     | stream, group          |
| slipstream_bus_backpressure_wait_seconds_total        | counter   | stream                 |
| slipstream_learner_step                               | gauge     |                        |
| slipstream_learner_policy_version                     | gauge     |                        |
| slipstream_learner_trained_tokens_total               | counter   |                        |
| slipstream_learner_trained_samples_total              | counter   |                        |
| slipstream_learner_tokens_per_second                  | gauge     |                        |
| slipstream_learner_loss                               | gauge     |                        |
| slipstream_learner_reward_mean                        | gauge     |                        |
| slipstream_learner_reward_std                         | gauge     |                        |
| slipstream_learner_kl                                 | gauge     |                        |
| slipstream_learner_entropy                            | gauge     |                        |
| slipstream_learner_clip_ratio                         | gauge     | side                   |
| slipstream_learner_importance_weight_mean             | gauge     |                        |
| slipstream_learner_importance_weight_max              | gauge     |                        |
| slipstream_learner_masked_tokens_ratio                | gauge     |                        |
| slipstream_learner_sample_staleness_versions          | histogram |                        |
| slipstream_learner_dropped_samples_total              | counter   | reason                 |
| slipstream_learner_nonfinite_steps_total              | counter   |                        |
| slipstream_learner_step_duration_seconds              | histogram |                        |
| slipstream_learner_last_step_timestamp_seconds        | gauge     |                        |
| slipstream_learner_checkpoint_duration_seconds        | histogram |                        |
| slipstream_learner_eval_accuracy_ratio                | gauge     |                        |
| slipstream_weight_broadcast_duration_seconds          | histogram |                        |
| slipstream_weight_broadcast_bytes_total               | counter   |                        |
| slipstream_weight_broadcast_peers                     | gauge     |                        |
| slipstream_weight_broadcast_peer_removals_total       | counter   | reason                 |
| slipstream_rollout_tasks_consumed_total               | counter   |                        |
| slipstream_rollout_samples_generated_total            | counter   |                        |
| slipstream_rollout_tokens_generated_total             | counter   |                        |
| slipstream_rollout_generation_duration_seconds        | histogram |                        |
| slipstream_rollout_reward                             | histogram |                        |
| slipstream_rollout_policy_version                     | gauge     |                        |
| slipstream_rollout_weight_load_duration_seconds       | histogram |                        |
| slipstream_rollout_engine_errors_total                | counter   | reason                 |
| slipstream_rollout_reward_errors_total                | counter   | function               |
| slipstream_rollout_proxy_sessions_total               | counter   | outcome                |
| slipstream_rollout_heartbeats_sent_total              | counter   |                        |
| slipstream_admission_tasks_published_total            | counter   |                        |
| slipstream_admission_inflight_samples                 | gauge     |                        |
| slipstream_trajectories_published_total               | counter   |                        |

Accounting: every published trajectory ends up in `slipstream_learner_trained_samples_total` or in
`slipstream_learner_dropped_samples_total{reason}`; `slipstream_admission_inflight_samples` is the difference the
learner still expects.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

REGISTRY = CollectorRegistry(auto_describe=True)

# One bucket layout for every duration, 1 ms .. ~17 min: a bus hop, a generate call, a step and a checkpoint all fit.
DURATION_BUCKETS_SECONDS: tuple[float, ...] = (
    *(round(mantissa * 10.0**exponent, 4) for exponent in range(-3, 3) for mantissa in (1.0, 2.5, 5.0)),
    1000.0,
)
# Staleness is an integer count of policy versions; one bucket per version up to 16, beyond that only +Inf.
STALENESS_BUCKETS_VERSIONS: tuple[float, ...] = tuple(float(v) for v in range(17))
# Rewards are mostly 0/1 (verifiers) but shaped rewards can be negative or exceed 1.
REWARD_BUCKETS: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 2.0, 5.0)

# Known label values, created up front so that their series exist (at 0) before the first event: rate() and
# alerts on a series that appears only on the first drop would miss that drop.
DROP_REASONS: tuple[str, ...] = (
    "duplicate",
    "zero_variance",
    "stale",
    "future_version",
    "incomplete_group",
    "nonfinite_gradient",
    "invalid",
    "poison",
)
CLIP_SIDES: tuple[str, ...] = ("low", "high")

# --- node identity ---------------------------------------------------------------------------------------------
NODE_INFO = Info(
    "slipstream_node", "This process: node id, role (learner, rollout, ...) and Slipstream version.", registry=REGISTRY
)


def set_node_info(node_id: str, role: str, slipstream_version: str | None = None) -> None:
    """Expose `slipstream_node_info{node_id, role, version} 1`; the version defaults to the installed package's."""
    if slipstream_version is None:
        try:
            slipstream_version = version("slipstream")
        except PackageNotFoundError:  # running from a source tree that was never installed
            slipstream_version = "unknown"
    NODE_INFO.info({"node_id": node_id, "role": role, "version": slipstream_version})


# --- bus -------------------------------------------------------------------------------------------------------
BUS_MESSAGES = Counter(
    "slipstream_bus_messages_total",
    "Messages by stream and event: published, consumed, acked, redelivered, dead_lettered, duplicate.",
    ["stream", "event"],
    registry=REGISTRY,
)
BUS_RECONNECTS = Counter(
    "slipstream_bus_reconnects_total",
    "Reconnections to the bus after a lost connection.",
    ["transport"],
    registry=REGISTRY,
)
BUS_STREAM_LENGTH = Gauge(
    "slipstream_bus_stream_length", "Entries in a stream, as last observed.", ["stream"], registry=REGISTRY
)
BUS_PENDING = Gauge(
    "slipstream_bus_pending_messages",
    "Delivered but not yet acked entries of a consumer group (lag).",
    ["stream", "group"],
    registry=REGISTRY,
)
BUS_BACKPRESSURE_WAIT = Counter(
    "slipstream_bus_backpressure_wait_seconds_total",
    "Time producers waited because a stream was full.",
    ["stream"],
    registry=REGISTRY,
)

# --- learner ---------------------------------------------------------------------------------------------------
LEARNER_STEP = Gauge("slipstream_learner_step", "Optimizer steps taken.", registry=REGISTRY)
LEARNER_POLICY_VERSION = Gauge(
    "slipstream_learner_policy_version", "Policy version the learner's weights are at.", registry=REGISTRY
)
LEARNER_TRAINED_TOKENS = Counter(
    "slipstream_learner_trained_tokens_total",
    "Loss tokens (response tokens not masked out) trained on.",
    registry=REGISTRY,
)
LEARNER_TRAINED_SAMPLES = Counter(
    "slipstream_learner_trained_samples_total", "Trajectories trained on (each one at most once).", registry=REGISTRY
)
LEARNER_TOKENS_PER_SECOND = Gauge(
    "slipstream_learner_tokens_per_second", "Trained tokens per second over the last step.", registry=REGISTRY
)
LEARNER_LOSS = Gauge("slipstream_learner_loss", "Loss of the last step.", registry=REGISTRY)
LEARNER_REWARD_MEAN = Gauge(
    "slipstream_learner_reward_mean", "Mean reward of the samples in the last step.", registry=REGISTRY
)
LEARNER_REWARD_STD = Gauge(
    "slipstream_learner_reward_std", "Standard deviation of the rewards in the last step.", registry=REGISTRY
)
LEARNER_KL = Gauge(
    "slipstream_learner_kl", "KL divergence to the reference policy in the last step.", registry=REGISTRY
)
LEARNER_ENTROPY = Gauge("slipstream_learner_entropy", "Mean token entropy in the last step (nats).", registry=REGISTRY)
LEARNER_CLIP_RATIO = Gauge(
    "slipstream_learner_clip_ratio",
    "Fraction of loss tokens whose ratio was clipped in the last step, by side (low: 1-eps, high: 1+eps_high).",
    ["side"],
    registry=REGISTRY,
)
LEARNER_IMPORTANCE_WEIGHT_MEAN = Gauge(
    "slipstream_learner_importance_weight_mean",
    "Mean off-policy importance weight pi_prox/pi_behav over loss tokens in the last step, before truncation.",
    registry=REGISTRY,
)
LEARNER_IMPORTANCE_WEIGHT_MAX = Gauge(
    "slipstream_learner_importance_weight_max",
    "Largest off-policy importance weight pi_prox/pi_behav in the last step, before truncation.",
    registry=REGISTRY,
)
LEARNER_MASKED_TOKENS_RATIO = Gauge(
    "slipstream_learner_masked_tokens_ratio",
    "Fraction of loss tokens masked out by importance-weight masking (MIS/IcePop) in the last step.",
    registry=REGISTRY,
)
LEARNER_STALENESS = Histogram(
    "slipstream_learner_sample_staleness_versions",
    "Policy versions between the version a sample was generated with and the version that trained on it.",
    buckets=STALENESS_BUCKETS_VERSIONS,
    registry=REGISTRY,
)
LEARNER_NONFINITE_STEPS = Counter(
    "slipstream_learner_nonfinite_steps_total",
    "Steps whose gradient was NaN or infinite: not applied, their batch dead-lettered (reason nonfinite_gradient).",
    registry=REGISTRY,
)
LEARNER_DROPPED_SAMPLES = Counter(
    "slipstream_learner_dropped_samples_total",
    "Trajectories not trained on, by reason (stale, duplicate, invalid, ...); each is also on the dead stream.",
    ["reason"],
    registry=REGISTRY,
)
LEARNER_STEP_DURATION = Histogram(
    "slipstream_learner_step_duration_seconds",
    "Duration of one optimizer step, from its first batch to the weights updated.",
    buckets=DURATION_BUCKETS_SECONDS,
    registry=REGISTRY,
)
LEARNER_LAST_STEP_TIMESTAMP = Gauge(
    "slipstream_learner_last_step_timestamp_seconds", "Unix time of the last finished step.", registry=REGISTRY
)
LEARNER_CHECKPOINT_DURATION = Histogram(
    "slipstream_learner_checkpoint_duration_seconds",
    "Duration of writing one checkpoint.",
    buckets=DURATION_BUCKETS_SECONDS,
    registry=REGISTRY,
)
LEARNER_EVAL_ACCURACY = Gauge(
    "slipstream_learner_eval_accuracy_ratio",
    "Greedy accuracy on the eval set at the last evaluation.",
    registry=REGISTRY,
)

# --- weight broadcast (learner rank 0 side) --------------------------------------------------------------------
WEIGHT_BROADCAST_DURATION = Histogram(
    "slipstream_weight_broadcast_duration_seconds",
    "Duration of one weight update, from the announcement to every live engine having loaded it.",
    buckets=DURATION_BUCKETS_SECONDS,
    registry=REGISTRY,
)
WEIGHT_BROADCAST_BYTES = Counter(
    "slipstream_weight_broadcast_bytes_total", "Bytes of weights sent to the engines.", registry=REGISTRY
)
WEIGHT_BROADCAST_PEERS = Gauge(
    "slipstream_weight_broadcast_peers", "Engines currently in the weight broadcast group.", registry=REGISTRY
)
WEIGHT_BROADCAST_PEER_REMOVALS = Counter(
    "slipstream_weight_broadcast_peer_removals_total",
    "Engines removed from the broadcast group (and told to rejoin), by reason (timeout, error).",
    ["reason"],
    registry=REGISTRY,
)

# --- rollout ---------------------------------------------------------------------------------------------------
ROLLOUT_TASKS_CONSUMED = Counter(
    "slipstream_rollout_tasks_consumed_total", "Tasks taken from the tasks stream.", registry=REGISTRY
)
ROLLOUT_SAMPLES_GENERATED = Counter(
    "slipstream_rollout_samples_generated_total", "Trajectories generated (n per task).", registry=REGISTRY
)
ROLLOUT_TOKENS_GENERATED = Counter(
    "slipstream_rollout_tokens_generated_total", "Response tokens generated.", registry=REGISTRY
)
ROLLOUT_GENERATION_DURATION = Histogram(
    "slipstream_rollout_generation_duration_seconds",
    "Latency of generating one task's group of samples, from the engine call to its last token.",
    buckets=DURATION_BUCKETS_SECONDS,
    registry=REGISTRY,
)
ROLLOUT_REWARD = Histogram(
    "slipstream_rollout_reward", "Reward of each generated sample.", buckets=REWARD_BUCKETS, registry=REGISTRY
)
ROLLOUT_POLICY_VERSION = Gauge(
    "slipstream_rollout_policy_version", "Policy version the engine is generating with.", registry=REGISTRY
)
ROLLOUT_WEIGHT_LOAD_DURATION = Histogram(
    "slipstream_rollout_weight_load_duration_seconds",
    "Duration of receiving and loading one weight update into the engine.",
    buckets=DURATION_BUCKETS_SECONDS,
    registry=REGISTRY,
)
ROLLOUT_ENGINE_ERRORS = Counter(
    "slipstream_rollout_engine_errors_total",
    "Failed engine calls, by reason (timeout, http, oom, crashed, ...).",
    ["reason"],
    registry=REGISTRY,
)
ROLLOUT_REWARD_ERRORS = Counter(
    "slipstream_rollout_reward_errors_total",
    "Reward function calls that raised or timed out, by reward function name.",
    ["function"],
    registry=REGISTRY,
)
ROLLOUT_PROXY_SESSIONS = Counter(
    "slipstream_rollout_proxy_sessions_total",
    "Agent proxy sessions, by outcome (published, abandoned, rejected, error).",
    ["outcome"],
    registry=REGISTRY,
)
ROLLOUT_HEARTBEATS_SENT = Counter(
    "slipstream_rollout_heartbeats_sent_total", "Heartbeats sent on the control stream.", registry=REGISTRY
)

# --- admission and accounting ----------------------------------------------------------------------------------
ADMISSION_TASKS_PUBLISHED = Counter(
    "slipstream_admission_tasks_published_total",
    "Prompt tasks the learner's admission published.",
    registry=REGISTRY,
)
ADMISSION_INFLIGHT_SAMPLES = Gauge(
    "slipstream_admission_inflight_samples",
    "Samples admitted (published as tasks) and not yet trained on or dropped.",
    registry=REGISTRY,
)
TRAJECTORIES_PUBLISHED = Counter(
    "slipstream_trajectories_published_total",
    "Trajectories published on the trajectories stream (rollout nodes, agent proxy and producer SDK).",
    registry=REGISTRY,
)

for _reason in DROP_REASONS:
    LEARNER_DROPPED_SAMPLES.labels(reason=_reason)
for _side in CLIP_SIDES:
    LEARNER_CLIP_RATIO.labels(side=_side)
