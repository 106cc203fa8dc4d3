"""The codec: round trips of every kind, every validation rule (decode and validate name the same field and
rule), hostile msgpack input, and peek_id."""

from __future__ import annotations

import importlib.util
import math
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import msgspec
import numpy as np
import pytest

from bus.codec import DEFAULT_LIMITS, Limits, decode, encode, peek, peek_id, validate
from bus.schema import (
    LOGPROB_TOLERANCE,
    Group,
    Heartbeat,
    Join,
    Leave,
    Message,
    MessageError,
    Preference,
    Sampling,
    Task,
    TensorSpec,
    Trajectory,
    Weights,
)

CREATED_AT = 1_700_000_000.25


def trajectory(index: int = 0, group_id: str = "g1", tokens: int = 6) -> Trajectory:
    rng = np.random.default_rng(index)
    return Trajectory(
        id=f"g1-{index}",
        group_id=group_id,
        producer="rollout-0",
        prompt_ids=rng.integers(0, 1000, 4, dtype=np.int32),
        response_ids=rng.integers(0, 1000, tokens, dtype=np.int32),
        behavior_logprobs=-rng.random(tokens, dtype=np.float32),
        loss_mask=np.array([1, 1, 0, 0, 1, 1][:tokens], np.uint8),
        reward=1.0,
        rewards={"correct": 1.0, "format": 0.0},
        policy_version=4,
        version_ranges=[(0, 2, 3), (2, tokens, 4)],
        finish_reason="stop",
        created_at=CREATED_AT,
        meta={"task": "arith", "answer": "42", "turns": [1, 2]},
    )


def examples() -> dict[str, Message]:
    """kind -> a valid message exercising every optional field."""
    return {
        "task": Task(
            id="task-1",
            prompt="What is 6 * 7?",
            n=4,
            sampling=Sampling(
                temperature=0.7, top_p=0.9, top_k=50, max_new_tokens=16, stop=["\n"], stop_token_ids=[2], seed=11
            ),  # fmt: skip
            meta={"answer": "42"},
            min_version=2,
            created_at=CREATED_AT,
        ),
        "trajectory": trajectory(),
        "group": Group(
            id="g1",
            producer="rollout-0",
            trajectories=[trajectory(i) for i in range(3)],
            task_id="task-1",
            created_at=CREATED_AT,
            meta={"n": 3},
        ),  # fmt: skip
        "preference": Preference(
            id="pref-1",
            producer="labeler",
            prompt_ids=np.array([5, 6], np.int32),
            chosen_ids=np.array([7, 8, 9], np.int32),
            rejected_ids=np.array([10], np.int32),
            ref_chosen_logp=-3.5,
            ref_rejected_logp=-1.25,
            created_at=CREATED_AT,
            meta={"source": "human"},
        ),
        "weights": Weights(
            version=7,
            tensors=[
                TensorSpec("embed.weight", "bfloat16", [10, 4]),
                TensorSpec("norm.weight", "float32", [4]),
                TensorSpec("head.weight", "bfloat16", [4, 10]),
            ],  # fmt: skip
            buckets=[[0, 2], [1]],
            bucket_bytes=[160, 16],
            checksum="crc32:1a2b3c4d,5e6f7a8b",
            group="slipstream-weights",
            created_at=CREATED_AT,
        ),
        "join": Join("rollout-0", "rollout", 3, CREATED_AT, {"gpus": 1}, address="10.0.0.2:30000"),
        "leave": Leave("rollout-0", "rollout", 3, CREATED_AT, {"reason": "shutdown"}),
        "heartbeat": Heartbeat("learner-0", "learner", 8, CREATED_AT, {}),
    }


def assert_same(actual: Any, expected: Any, path: str = "message") -> None:
    """Equal field by field; arrays must have equal values and the wire dtype of the expected array."""
    if isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray), f"{path}: {type(actual)} is not an array"
        assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}"
        assert np.array_equal(actual, expected), f"{path}: {actual} != {expected}"
    elif isinstance(expected, msgspec.Struct):
        assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
        for name in expected.__struct_fields__:
            assert_same(getattr(actual, name), getattr(expected, name), f"{path}.{name}")
    elif isinstance(expected, list | tuple):
        assert type(actual) is type(expected) and len(actual) == len(expected), f"{path}: {actual!r} != {expected!r}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{path}[{i}]")
    else:
        assert actual == expected and type(actual) is type(expected), f"{path}: {actual!r} != {expected!r}"


def wire_of(msg: Message) -> dict[str, Any]:
    return msgpack.unpackb(encode(msg))


def decode_error(data: bytes, limits: Limits = DEFAULT_LIMITS) -> MessageError:
    with pytest.raises(MessageError) as info:
        decode(data, limits)
    return info.value


# ------------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("kind", list(examples()))
def test_every_kind_round_trips(kind: str) -> None:
    msg = examples()[kind]
    data = encode(msg)
    assert msgpack.unpackb(data)["kind"] == kind and msgpack.unpackb(data)["v"] == 1
    assert_same(decode(data), msg)


def bins_to_lists(value: Any, key: str = "") -> Any:
    """A wire map with every array field written as a msgpack array of numbers instead of bin."""
    if isinstance(value, bytes):
        dtype = {"behavior_logprobs": np.float32, "loss_mask": np.uint8}.get(key, np.int32)
        return np.frombuffer(value, dtype).tolist()
    if isinstance(value, dict):
        return {k: bins_to_lists(v, k) for k, v in value.items()}
    return [bins_to_lists(v, key) for v in value] if isinstance(value, list) else value


@pytest.mark.parametrize("kind", list(examples()))
def test_plain_lists_decode_like_bins(kind: str) -> None:
    """A producer in any language may write arrays as msgpack arrays of numbers."""
    msg = examples()[kind]
    assert_same(decode(msgpack.packb(bins_to_lists(wire_of(msg)))), msg)


def test_group_members_need_no_kind_and_optional_fields_may_be_nil_or_absent() -> None:
    group = examples()["group"]
    wire = wire_of(group)
    for member in wire["trajectories"]:
        del member["kind"], member["v"]
        member["loss_mask"] = None
        del member["version_ranges"], member["rewards"]
    wire["task_id"] = None
    del wire["meta"]
    wire["future_field"] = "ignored"  # unknown keys are ignored within a schema version
    decoded = decode(msgpack.packb(wire))
    assert isinstance(decoded, Group) and decoded.task_id is None and decoded.meta == {}
    member = decoded.trajectories[1]
    assert member.loss_mask is None and member.version_ranges is None and member.rewards == {}
    assert_same(member.response_ids, group.trajectories[1].response_ids)


def test_task_with_token_prompt_and_default_sampling() -> None:
    wire = {"kind": "task", "v": 1, "id": "t", "prompt": [1, 2, 3], "created_at": 5.0, "sampling": {"top_k": 5}}
    task = decode(msgpack.packb(wire))
    assert isinstance(task, Task) and task.n == 1 and task.min_version == 0
    assert task.sampling == Sampling(top_k=5)
    assert_same(task.prompt, np.array([1, 2, 3], np.int32))


def test_decoded_arrays_are_views_of_their_own_bin_copies() -> None:
    data = encode(examples()["trajectory"])
    traj, again = decode(data), decode(data)
    for array in (traj.prompt_ids, traj.response_ids, traj.behavior_logprobs, traj.loss_mask):
        assert isinstance(array.base.obj, bytearray) and array.flags.writeable  # writable: argmin/argmax twice as fast
    traj.response_ids[0] += 1  # each decode owns its arrays: writing one changes no other message
    assert again.response_ids[0] == traj.response_ids[0] - 1
    dtypes = [traj.prompt_ids.dtype, traj.response_ids.dtype, traj.behavior_logprobs.dtype, traj.loss_mask.dtype]
    assert dtypes == [np.int32, np.int32, np.float32, np.uint8]


def test_encode_converts_lists_and_other_dtypes_exactly() -> None:
    expected = examples()["trajectory"]
    loose = msgspec.structs.replace(
        expected,
        prompt_ids=expected.prompt_ids.tolist(),
        response_ids=expected.response_ids.astype(np.int64),
        behavior_logprobs=expected.behavior_logprobs.astype(np.float64),
        loss_mask=expected.loss_mask.astype(bool),
        reward=np.float32(1.0),
        policy_version=np.int64(4),
    )
    validate(loose)
    assert_same(decode(encode(loose)), expected)


def test_encode_rejects_int64_ids_beyond_int32() -> None:
    msg = msgspec.structs.replace(examples()["trajectory"], prompt_ids=np.array([1, 2**31], np.int64))
    with pytest.raises(MessageError, match=r"^prompt_ids: value 2147483648 out of int32 range$"):
        encode(msg)


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = encode(examples()["heartbeat"])
    assert decode(bytearray(data)) == decode(memoryview(data)) == examples()["heartbeat"]


def test_logprobs_within_tolerance_of_zero_are_accepted() -> None:
    msg = examples()["trajectory"]
    msg.behavior_logprobs[:2] = [0.0, LOGPROB_TOLERANCE / 2]
    validate(msg)


# ---------------------------------------------------------------------------------------------- validation rules
# Each case breaks one rule on the message object. validate() must name the field and the rule, and so must decode()
# of the same message encoded without validation: the two directions share one set of checks.

Mutation = Callable[[Any], None]


def set_field(path: str, value: Any) -> Mutation:
    """Mutation setting a dotted attribute path; a part like `trajectories.1` indexes a list."""

    def mutate(msg: Any) -> None:
        *parents, last = path.split(".")
        for part in parents:
            msg = msg[int(part)] if part.isdigit() else getattr(msg, part)
        setattr(msg, last, value)

    return mutate


def set_item(path: str, index: int, value: Any) -> Mutation:
    def mutate(msg: Any) -> None:
        target = msg
        for part in path.split("."):
            target = target[int(part)] if part.isdigit() else getattr(target, part)
        target[index] = value

    return mutate


T = "trajectory"
RULE_CASES: list[tuple[str, str, Mutation, str, str, Limits]] = [
    # (case, kind, mutation, field, rule fragment, limits)
    ("empty id", T, set_field("id", ""), "id", "must not be empty", DEFAULT_LIMITS),
    ("id too long", T, set_field("id", "x" * 300), "id", "300 characters > 256", DEFAULT_LIMITS),
    ("id wrong type", T, set_field("id", 5), "id", "must be a string (got int)", DEFAULT_LIMITS),
    ("empty group_id", T, set_field("group_id", ""), "group_id", "must not be empty", DEFAULT_LIMITS),
    ("empty producer", T, set_field("producer", ""), "producer", "must not be empty", DEFAULT_LIMITS),
    ("logprobs length", T, set_field("behavior_logprobs", np.full(5, -1, np.float32)), "response_ids",
     "length 6 != behavior_logprobs length 5", DEFAULT_LIMITS),
    ("mask length", T, set_field("loss_mask", np.ones(7, np.uint8)), "response_ids",
     "length 6 != loss_mask length 7", DEFAULT_LIMITS),
    ("mask values", T, set_item("loss_mask", 3, 2), "loss_mask", "values must be 0 or 1 (got 2 at position 3)",
     DEFAULT_LIMITS),
    ("nan logprob", T, set_item("behavior_logprobs", 2, np.nan), "behavior_logprobs",
     "must be finite (got nan at position 2)", DEFAULT_LIMITS),
    ("-inf logprob", T, set_item("behavior_logprobs", 0, -np.inf), "behavior_logprobs",
     "must be finite (got -inf at position 0)", DEFAULT_LIMITS),
    ("+inf logprob", T, set_item("behavior_logprobs", 5, np.inf), "behavior_logprobs",
     "must be finite (got inf at position 5)", DEFAULT_LIMITS),
    ("positive logprob", T, set_item("behavior_logprobs", 4, 0.5), "behavior_logprobs",
     "log-probability 0.5 > 0 at position 4", DEFAULT_LIMITS),
    ("nan reward", T, set_field("reward", math.nan), "reward", "must be finite (got nan)", DEFAULT_LIMITS),
    ("reward wrong type", T, set_field("reward", "high"), "reward", "must be a number (got str)", DEFAULT_LIMITS),
    ("bool reward", T, set_field("reward", True), "reward", "must be a number (got bool)", DEFAULT_LIMITS),
    ("inf named reward", T, set_field("rewards", {"format": math.inf}), "rewards.format", "must be finite (got inf)",
     DEFAULT_LIMITS),
    ("negative prompt id", T, set_item("prompt_ids", 1, -1), "prompt_ids", "token id -1 < 0 (at position 1)",
     DEFAULT_LIMITS),
    ("negative response id", T, set_item("response_ids", 5, -7), "response_ids", "token id -7 < 0 (at position 5)",
     DEFAULT_LIMITS),
    ("id >= vocab", T, set_item("response_ids", 2, 1000), "response_ids", "token id 1000 >= vocab_size 1000",
     Limits(vocab_size=1000)),
    ("too many tokens", T, lambda m: None, "response_ids", "6 tokens > max_tokens 5", Limits(max_tokens=5)),
    ("empty response", T, lambda m: (set_field("response_ids", np.zeros(0, np.int32))(m),
                                     set_field("behavior_logprobs", np.zeros(0, np.float32))(m)),
     "response_ids", "must not be empty", DEFAULT_LIMITS),
    ("negative policy_version", T, set_field("policy_version", -1), "policy_version", "must be >= 0 (got -1)",
     DEFAULT_LIMITS),
    ("float policy_version", T, set_field("policy_version", 1.5), "policy_version", "must be an integer (got float)",
     DEFAULT_LIMITS),
    ("ranges gap", T, set_field("version_ranges", [(0, 2, 3), (3, 6, 4)]), "version_ranges[1]",
     "start 3 != previous end 2 (ranges must be contiguous from 0)", DEFAULT_LIMITS),
    ("ranges not from 0", T, set_field("version_ranges", [(1, 6, 3)]), "version_ranges[0]",
     "start 1 != previous end 0", DEFAULT_LIMITS),
    ("ranges short", T, set_field("version_ranges", [(0, 2, 3), (2, 5, 4)]), "version_ranges",
     "ranges end at 5 != response length 6", DEFAULT_LIMITS),
    ("empty range", T, set_field("version_ranges", [(0, 0, 3), (0, 6, 4)]), "version_ranges[0]", "end 0 <= start 0",
     DEFAULT_LIMITS),
    ("range not a triple", T, set_field("version_ranges", [(0, 6)]), "version_ranges[0]",
     "must be [start, end, version]", DEFAULT_LIMITS),
    ("empty finish_reason", T, set_field("finish_reason", ""), "finish_reason", "must not be empty", DEFAULT_LIMITS),
    ("negative created_at", T, set_field("created_at", -1.0), "created_at", "must be >= 0.0 (got -1.0)",
     DEFAULT_LIMITS),
    ("meta not a map", T, set_field("meta", [1]), "meta", "must be a map (got list)", DEFAULT_LIMITS),
    ("meta too big", T, set_field("meta", {"blob": "x" * 200}), "meta", "bytes > max_meta_bytes 100",
     Limits(max_meta_bytes=100)),
    ("member group_id", "group", set_field("trajectories.1.group_id", "other"), "trajectories[1].group_id",
     "'other' != group id 'g1'", DEFAULT_LIMITS),
    ("member rule", "group", set_item("trajectories.2.response_ids", 0, -1), "trajectories[2].response_ids",
     "token id -1 < 0 (at position 0)", DEFAULT_LIMITS),
    ("duplicate member", "group", set_field("trajectories.2.id", "g1-0"), "trajectories[2].id",
     "duplicate trajectory id 'g1-0' in the group", DEFAULT_LIMITS),
    ("group too big", "group", lambda m: None, "trajectories", "3 members > max_group_size 2",
     Limits(max_group_size=2)),
    ("empty group", "group", set_field("trajectories", []), "trajectories", "must be a non-empty array",
     DEFAULT_LIMITS),
    ("empty task_id", "group", set_field("task_id", ""), "task_id", "must not be empty", DEFAULT_LIMITS),
    ("n zero", "task", set_field("n", 0), "n", "must be >= 1 (got 0)", DEFAULT_LIMITS),
    ("n above group size", "task", set_field("n", 9), "n", "must be <= 8 (got 9)", Limits(max_group_size=8)),
    ("empty text prompt", "task", set_field("prompt", ""), "prompt", "must not be empty", DEFAULT_LIMITS),
    ("negative prompt token", "task", set_field("prompt", np.array([3, -2], np.int32)), "prompt",
     "token id -2 < 0", DEFAULT_LIMITS),
    ("negative temperature", "task", set_field("sampling.temperature", -0.1), "sampling.temperature",
     "must be >= 0.0 (got -0.1)", DEFAULT_LIMITS),
    ("top_p zero", "task", set_field("sampling.top_p", 0.0), "sampling.top_p", "must be in (0, 1] (got 0.0)",
     DEFAULT_LIMITS),
    ("top_k zero", "task", set_field("sampling.top_k", 0), "sampling.top_k", "must be -1 (no top-k) or >= 1",
     DEFAULT_LIMITS),
    ("max_new_tokens", "task", set_field("sampling.max_new_tokens", 17), "sampling.max_new_tokens",
     "must be <= 16 (got 17)", Limits(max_tokens=16)),
    ("stop not text", "task", set_field("sampling.stop", ["", "x"]), "sampling.stop[0]",
     "must be a non-empty string", DEFAULT_LIMITS),
    ("stop token id", "task", set_field("sampling.stop_token_ids", [1, -3]), "sampling.stop_token_ids[1]",
     "must be >= 0 (got -3)", DEFAULT_LIMITS),
    ("negative min_version", "task", set_field("min_version", -1), "min_version", "must be >= 0", DEFAULT_LIMITS),
    ("one ref logp", "preference", set_field("ref_rejected_logp", None), "ref_rejected_logp",
     "must be given when the other reference log-probability is", DEFAULT_LIMITS),
    ("positive ref logp", "preference", set_field("ref_chosen_logp", 0.5), "ref_chosen_logp",
     "must be <= 0.0001 (got 0.5)", DEFAULT_LIMITS),
    ("nan ref logp", "preference", set_field("ref_chosen_logp", math.nan), "ref_chosen_logp",
     "must be finite (got nan)", DEFAULT_LIMITS),
    ("empty chosen", "preference", set_field("chosen_ids", np.zeros(0, np.int32)), "chosen_ids", "must not be empty",
     DEFAULT_LIMITS),
    ("bucket bytes", "weights", set_item("bucket_bytes", 1, 15), "bucket_bytes[1]",
     "15 != 16 bytes of the bucket's tensors", DEFAULT_LIMITS),
    ("mixed bucket", "weights", lambda m: (set_field("buckets", [[0, 1, 2]])(m), set_field("bucket_bytes", [336])(m)),
     "buckets[0]", "mixes dtypes ['bfloat16', 'float32']", DEFAULT_LIMITS),
    ("tensor twice", "weights", set_field("buckets", [[0, 2], [1, 0]]), "buckets[1]", "tensor 0 is already in a bucket",
     DEFAULT_LIMITS),
    ("tensor in no bucket", "weights",
     lambda m: (set_field("buckets", [[0, 2]])(m), set_field("bucket_bytes", [160])(m)), "buckets",
     "tensor 1 is in no bucket", DEFAULT_LIMITS),
    ("index out of range", "weights", set_field("buckets", [[0, 2], [3]]), "buckets[1]", "must be <= 2 (got 3)",
     DEFAULT_LIMITS),
    ("bucket_bytes count", "weights", set_field("bucket_bytes", [160]), "bucket_bytes", "must be an array of 2 sizes",
     DEFAULT_LIMITS),
    ("unknown dtype", "weights", set_field("tensors.1.dtype", "float13"), "tensors[1].dtype", "unknown dtype 'float13'",
     DEFAULT_LIMITS),
    ("duplicate tensor", "weights", set_field("tensors.2.name", "embed.weight"), "tensors[2].name",
     "duplicate tensor name 'embed.weight'", DEFAULT_LIMITS),
    ("negative dim", "weights", set_field("tensors.1.shape", [-4]), "tensors[1].shape[0]", "must be >= 0",
     DEFAULT_LIMITS),
    ("checksum type", "weights", set_field("checksum", None), "checksum", "must be a string (got nil)",
     DEFAULT_LIMITS),
    ("empty node_id", "join", set_field("node_id", ""), "node_id", "must not be empty", DEFAULT_LIMITS),
    ("empty address", "join", set_field("address", ""), "address", "must not be empty", DEFAULT_LIMITS),
    ("negative version", "heartbeat", set_field("version", -2), "version", "must be >= 0 (got -2)", DEFAULT_LIMITS),
    ("empty role", "leave", set_field("role", ""), "role", "must not be empty", DEFAULT_LIMITS),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "mutate", "field", "rule", "limits"), [case[1:] for case in RULE_CASES],
                         ids=[case[0] for case in RULE_CASES])  # fmt: skip
def test_rule_is_enforced_by_validate_and_decode(
    kind: str, mutate: Mutation, field: str, rule: str, limits: Limits
) -> None:
    msg = examples()[kind]
    mutate(msg)
    errors = []
    for check in (lambda: validate(msg, limits), lambda: encode(msg, limits=limits),
                  lambda: decode(encode(msg, validate=False), limits)):  # fmt: skip
        with pytest.raises(MessageError) as info:
            check()
        errors.append(info.value)
    for error in errors:
        assert error.field == field and rule in error.rule, str(error)
        assert str(error) == f"{error.field}: {error.rule}"
    assert len({str(error) for error in errors}) == 1  # the same words whichever way the message went


# ----------------------------------------------------------------------------------- rules only the wire can break


def wire_case(kind: str, mutate: Callable[[dict[str, Any]], None]) -> bytes:
    wire = wire_of(examples()[kind])
    mutate(wire)
    return msgpack.packb(wire)


WIRE_CASES: list[tuple[str, bytes, str, str]] = [
    # (case, data, field, rule fragment)
    ("missing field", wire_case(T, lambda w: w.pop("reward")), "reward", "required field missing"),
    ("missing member field", wire_case("group", lambda w: w["trajectories"][1].pop("response_ids")),
     "trajectories[1].response_ids", "required field missing"),
    ("missing tensor field", wire_case("weights", lambda w: w["tensors"][0].pop("shape")), "tensors[0].shape",
     "required field missing"),
    ("nil required field", wire_case(T, lambda w: w.update(reward=None)), "reward", "must be a number (got nil)"),
    ("bin length", wire_case(T, lambda w: w.update(response_ids=w["response_ids"][:-1])), "response_ids",
     "bin length 23 is not a multiple of 4 (int32)"),
    ("logprob bin length", wire_case(T, lambda w: w.update(behavior_logprobs=b"\0" * 6)), "behavior_logprobs",
     "bin length 6 is not a multiple of 4 (float32)"),
    ("array wrong type", wire_case(T, lambda w: w.update(prompt_ids=7)), "prompt_ids",
     "must be bin or an array of numbers (got int)"),
    ("list of text", wire_case(T, lambda w: w.update(prompt_ids=["a", "b"])), "prompt_ids", "must hold int32 values"),
    ("list of floats as ids", wire_case(T, lambda w: w.update(prompt_ids=[1.5])), "prompt_ids",
     "must hold int32 values (got float64)"),
    ("list beyond int32", wire_case(T, lambda w: w.update(prompt_ids=[1, 2**40])), "prompt_ids",
     "value 1099511627776 out of int32 range"),
    ("nested list", wire_case(T, lambda w: w.update(prompt_ids=[[1], [2]])), "prompt_ids", "must be a 1-D array"),
    ("ragged list", wire_case(T, lambda w: w.update(prompt_ids=[[1], 2])), "prompt_ids", "must be a 1-D array"),
    ("sampling not a map", wire_case("task", lambda w: w.update(sampling=[1])), "sampling", "must be a map (got list)"),
    ("member not a map", wire_case("group", lambda w: w["trajectories"].append(3)), "trajectories[3]",
     "must be a map (got int)"),
    ("member kind", wire_case("group", lambda w: w["trajectories"][0].update(kind="task")), "trajectories[0].kind",
     "must be 'trajectory' (got 'task')"),
    ("member version", wire_case("group", lambda w: w["trajectories"][0].update(v=2)), "trajectories[0].v",
     "unsupported schema version 2"),
    ("unknown kind", wire_case(T, lambda w: w.update(kind="trajectroy")), "kind", "unknown message kind 'trajectroy'"),
    ("missing kind", wire_case(T, lambda w: w.pop("kind")), "kind", "unknown message kind None"),
    ("newer version", wire_case(T, lambda w: w.update(v=2)), "v", "unsupported schema version 2 (this build reads 1)"),
    ("version as text", wire_case(T, lambda w: w.update(v="1")), "v", "unsupported schema version '1'"),
    ("missing version", wire_case(T, lambda w: w.pop("v")), "v", "unsupported schema version None"),
    ("top-level array", msgpack.packb([1, 2]), "data", "must be a msgpack map (got list)"),
    ("top-level int", msgpack.packb(3), "data", "must be a msgpack map (got int)"),
    ("empty input", b"", "data", "not valid msgpack"),
    ("trailing bytes", encode(examples()["leave"]) + b"\x00", "data", "trailing bytes after the message"),
    ("non-string key", msgpack.packb({"kind": "leave", "v": 1, "meta": {1: 2}}), "meta", "not valid msgpack"),
    ("fixext", msgpack.packb({"kind": "leave", "meta": msgpack.ExtType(5, b"x")}), "meta", "ext types are not allowed"),
    ("empty ext8", b"\x81\xa4meta\xc7\x00\x05", "meta", "msgpack ext type 5 is not allowed"),
    ("timestamp ext", msgpack.packb({"meta": msgpack.Timestamp(1, 0)}), "meta", "ext types are not allowed"),
    ("deep nesting", b"\x91" * 100_000 + b"\xc0", "data", "not valid msgpack (StackError"),
    ("ext under an unknown key", msgpack.packb({"kind": "leave", "x" * 99: msgpack.ExtType(5, b"x")}), "data",
     "ext types are not allowed"),  # only field names are named: a hostile key is not echoed
    ("bin over the limit in a member",
     msgpack.packb({"kind": "group", "trajectories": [{}, {"prompt_ids": b"x" * 2**20}]}), "trajectories[1].prompt_ids",
     "exceeds max_bin_len"),
    ("bin32 claiming 4 GB", b"\x81\xa4meta\xc6\xff\xff\xff\xff" + b"\0" * 64, "meta", "not valid msgpack"),
    ("array32 claiming 4G items", b"\xdd\xff\xff\xff\xff\x00", "data", "not valid msgpack"),
    ("str32 claiming 4 GB", b"\xdb\xff\xff\xff\xffabc", "data", "not valid msgpack"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "field", "rule"), [case[1:] for case in WIRE_CASES], ids=[c[0] for c in WIRE_CASES])
def test_wire_rule(data: bytes, field: str, rule: str) -> None:
    error = decode_error(data)
    assert error.field == field and rule in error.rule, str(error)


def test_declared_lengths_beyond_limits_fail_before_allocating() -> None:
    """A bin header claiming more than a message may hold is refused by msgpack's own limits, data present or not."""
    limits = Limits(max_tokens=16, max_meta_bytes=64)
    claim = b"\x81\xa4meta\xc5\x01\x00" + b"\0" * 256  # a complete 256-byte bin, over max_bin_len = 64
    error = decode_error(claim, limits)
    assert error.field == "meta" and "exceeds max_bin_len(64)" in error.rule


def test_whole_message_size_is_checked_by_encode_and_decode() -> None:
    """validate() checks every rule but the encoded size, which only encode and decode know."""
    msg = msgspec.structs.replace(examples()["heartbeat"], meta={"blob": "x" * 2000})
    limits = Limits(max_message_bytes=1000, max_meta_bytes=4000)
    validate(msg, limits)
    with pytest.raises(MessageError, match=r"^data: \d+ bytes > max_message_bytes 1000$"):
        encode(msg, limits=limits)
    error = decode_error(encode(msg), limits)
    assert error.field == "data" and error.rule.endswith("bytes > max_message_bytes 1000")


def test_non_bytes_input_is_a_message_error() -> None:
    error = decode_error("not bytes")  # type: ignore[arg-type]
    assert (error.field, error.rule) == ("data", "must be bytes (got str)")


def test_validate_and_encode_reject_what_is_not_a_message() -> None:
    for call in (lambda: validate({"kind": "task"}), lambda: encode(Sampling())):  # type: ignore[arg-type]
        with pytest.raises(MessageError, match=r"^kind: not a message type: (dict|Sampling)$"):
            call()


def test_encode_without_validation_still_raises_only_message_error() -> None:
    msg = msgspec.structs.replace(examples()["heartbeat"], meta={"x": object()})
    with pytest.raises(MessageError, match=r"^data: cannot encode \(TypeError"):
        encode(msg, validate=False)
    with pytest.raises(MessageError, match=r"^meta: must be msgpack-able plain data"):
        encode(msg)


def test_meta_that_a_consumer_could_not_decode_is_refused_at_encode() -> None:
    msg = msgspec.structs.replace(examples()["heartbeat"], meta={"nested": {7: "int key"}})
    with pytest.raises(MessageError, match=r"^meta: must be msgpack-able plain data with string keys"):
        validate(msg)


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match=r"^max_tokens: must be an integer >= 1 \(got 0\)$"):
        Limits(max_tokens=0)
    assert Limits(vocab_size=None).vocab_size is None


def test_errors_cross_process_boundaries_intact() -> None:
    error = decode_error(wire_case(T, lambda w: w.update(reward=None)))
    assert str(pickle.loads(pickle.dumps(error))) == "reward: must be a number (got nil)"


# ------------------------------------------------------------------------------------------------------- peek_id


def test_peek_id_reads_ids_even_from_broken_messages() -> None:
    data = encode(examples()["trajectory"])
    assert peek_id(data) == "g1-0"
    assert peek(data) == {"kind": "trajectory", "v": 1, "id": "g1-0", "group_id": "g1", "producer": "rollout-0"}
    assert peek_id(data[:60]) == "g1-0"  # truncated after the id
    assert peek_id(wire_case(T, lambda w: w.update(reward=math.nan))) == "g1-0"  # valid msgpack, invalid message
    assert peek_id(encode(examples()["join"])) == "rollout-0"  # node events are known by node_id
    assert peek_id(encode(examples()["weights"])) is None


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x93\x01\x02\x03", b"\x81\xa2id\x05", b"\xdf\xff\xff\xff\xff", b"\x91" * 5000, "text", None],
)
def test_peek_id_never_raises(data: Any) -> None:
    assert peek_id(data) is None


# ------------------------------------------------------------------------------------ the external-producer contract

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "produce_without_slipstream.py"


def test_example_producer_writes_a_valid_trajectory_without_slipstream() -> None:
    source = EXAMPLE.read_text()
    imported = {line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))}
    assert imported <= {"argparse", "json", "math", "struct", "time", "uuid", "msgpack", "redis"}
    spec = importlib.util.spec_from_file_location("produce_without_slipstream", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    traj = decode(msgpack.packb(module.make_trajectory("agent-7"), use_bin_type=True))
    assert isinstance(traj, Trajectory) and traj.producer == "agent-7" and len(traj.response_ids) == 2


def test_wire_protocol_doc_shows_the_example_verbatim() -> None:
    doc = (ROOT / "docs" / "wire-protocol.md").read_text()
    block = doc.split("## Producing without Slipstream")[1].split("```python\n")[1].split("```")[0]
    assert block in EXAMPLE.read_text()
    assert "## Streams, consumer groups and delivery guarantees" in doc


@pytest.mark.parametrize("kind", ["join", "leave", "heartbeat"])
def test_a_node_event_without_version_or_with_nil_serves_version_0(kind: str) -> None:
    # docs/wire-protocol.md: `version` is optional (an agent serves no policy); absent or nil means 0.
    for mutate in (lambda w: w.pop("version"), lambda w: w.update(version=None)):
        assert decode(wire_case(kind, mutate)).version == 0
