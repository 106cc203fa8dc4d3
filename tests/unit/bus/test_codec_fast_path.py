"""The codec's fast path accepts exactly what its rules accept, in every direction.

validate/encode check a trajectory object, decode checks the received bins and scalars, each with a cheap
"plainly valid" test first and the rule-by-rule checks behind it. Here trajectories whose fields sit on the edges
of the rules (ids at 0, -1, vocab_size - 1, vocab_size, int32 extremes; logprobs at 0.0, -0.0, the tolerance, just
above it, the floor and just below it, -inf, nan, the most negative float32; rewards at +-MAX_ABS_REWARD and 1e308;
ints where floats are usual; lists for arrays) go through validate, encode and decode, and the verdicts must match an
independent per-element oracle written from docs/wire-protocol.md, with the same error text whichever way the message
went.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgpack
import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus.codec import DEFAULT_LIMITS, Limits, decode, encode, validate
from bus.schema import LOGPROB_FLOOR, LOGPROB_TOLERANCE, MAX_ABS_REWARD, Group, MessageError, Trajectory

VOCAB = Limits(vocab_size=1000)
F32_MIN = float(np.finfo(np.float32).min)  # the most negative finite float32: below the floor
BELOW_FLOOR = float(np.nextafter(np.float32(LOGPROB_FLOOR), np.float32(-np.inf)))

IDS = st.sampled_from([0, 1, 7, 999, 1000, 2**31 - 1, -1, -(2**31)])
LOGPROBS = st.sampled_from(
    [-1.5, -0.25, -1e-30, -0.0, 0.0, LOGPROB_TOLERANCE / 2, 2e-4, 0.5, -math.inf, math.inf, math.nan, F32_MIN]
    + [LOGPROB_FLOOR, BELOW_FLOOR]
)
NAMES = st.sampled_from(["t", "x" * 256, "x" * 257, ""])
NUMBERS = st.sampled_from([0.0, 1.5, -2.0, 3, math.nan, math.inf, -math.inf, True, MAX_ABS_REWARD, -1e308])
VERSIONS = st.sampled_from([0, 12, 2**63 - 1, -1, 2**63, 1.0])


def rule_breaks(traj: Trajectory, limits: Limits) -> bool:
    """Whether any core rule of docs/wire-protocol.md is broken, element by element in plain Python."""
    vocab = limits.vocab_size if limits.vocab_size is not None else 2**31

    def name_ok(value: Any) -> bool:
        return type(value) is str and 1 <= len(value) <= 256

    def number_ok(value: Any, low: float = -math.inf, high: float = math.inf) -> bool:
        return type(value) in (int, float) and math.isfinite(value) and low <= value <= high

    def ids_ok(ids: list[int]) -> bool:
        return 1 <= len(ids) <= limits.max_tokens and all(0 <= i < vocab for i in ids)

    logprobs = [float(x) for x in np.asarray(traj.behavior_logprobs, np.float32)]
    response = list(traj.response_ids)
    return not (
        all(name_ok(v) for v in (traj.id, traj.group_id, traj.producer, traj.finish_reason))
        and ids_ok(list(traj.prompt_ids))
        and ids_ok(response)
        and len(logprobs) == len(response)
        and all(math.isfinite(x) and LOGPROB_FLOOR <= x <= LOGPROB_TOLERANCE for x in logprobs)
        and number_ok(traj.reward, -MAX_ABS_REWARD, MAX_ABS_REWARD)
        and number_ok(traj.created_at, 0.0)
        and type(traj.policy_version) is int
        and 0 <= traj.policy_version < 2**63
    )


def verdicts(msg: Any, limits: Limits) -> set[str]:
    """The outcome of validate, encode and decode of the unvalidated encoding: 'ok' or the error text."""
    out = set()
    for check in (lambda: validate(msg, limits), lambda: encode(msg, limits=limits),
                  lambda: decode(encode(msg, validate=False), limits)):  # fmt: skip
        try:
            check()
            out.add("ok")
        except MessageError as error:
            out.add(str(error))
    return out


@st.composite
def trajectories(draw: st.DrawFn) -> Trajectory:
    length = draw(st.integers(1, 6))
    response = draw(st.lists(IDS, min_size=length, max_size=length))
    logprobs = draw(st.lists(LOGPROBS, min_size=length, max_size=length))
    as_lists = draw(st.booleans())  # lists and int64 take the rule-by-rule path; wire dtypes the fast one
    return Trajectory(
        id=draw(NAMES),
        group_id="g",
        producer=draw(NAMES),
        prompt_ids=draw(st.lists(IDS, min_size=1, max_size=4)) if as_lists else np.array([3, 4], np.int32),
        response_ids=response if as_lists else np.array(response, np.int64).astype(np.int32),
        behavior_logprobs=logprobs if as_lists else np.array(logprobs, np.float32),
        reward=draw(NUMBERS),
        policy_version=draw(VERSIONS),
        finish_reason=draw(st.sampled_from(["stop", ""])),
        created_at=draw(st.sampled_from([1.7e9, 0.0, -1.0, 5])),
    )


@settings(max_examples=600, deadline=None, database=None, derandomize=True)
@given(trajectories(), st.sampled_from([DEFAULT_LIMITS, VOCAB]))
def test_validate_encode_and_decode_accept_exactly_what_the_rules_allow(traj: Trajectory, limits: Limits) -> None:
    if any(type(i) is int and not -(2**31) <= i < 2**31 for i in list(traj.prompt_ids) + list(traj.response_ids)):
        return  # not representable on the wire at all (covered by test_codec's int32 range cases)
    outcome = verdicts(traj, limits)
    assert len(outcome) == 1, outcome  # the same words whichever way the message went
    assert (outcome == {"ok"}) == (not rule_breaks(traj, limits)), outcome


@pytest.mark.parametrize("limits", [DEFAULT_LIMITS, VOCAB], ids=["no vocab", "vocab 1000"])
@pytest.mark.parametrize(
    ("position", "token", "rule"),
    [(0, -1, "token id -1 < 0 (at position 0)"), (1023, -(2**31), "token id -2147483648 < 0 (at position 1023)")],
)
def test_a_negative_id_anywhere_in_a_long_bin_is_found(position: int, token: int, rule: str, limits: Limits) -> None:
    """The fast check reads each int32's sign byte: the first and the last element must both be covered."""
    traj = long_trajectory()
    traj.response_ids[position] = token
    assert verdicts(traj, limits) == {f"response_ids: {rule}"}


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        (math.nan, "must be finite (got nan at position 1023)"),
        (-math.inf, "must be finite (got -inf at position 1023)"),
        (0.5, "log-probability 0.5 > 0 at position 1023 (impossible)"),
        (F32_MIN, "log-probability -3.4028234663852886e+38 < -1000.0 at position 1023"),
    ],
)
def test_a_bad_logprob_at_the_end_of_a_long_bin_is_found(value: float, rule: str) -> None:
    traj = long_trajectory()
    traj.behavior_logprobs[1023] = value
    assert verdicts(traj, DEFAULT_LIMITS) == {f"behavior_logprobs: {rule}"}


def test_logprobs_of_zero_and_within_tolerance_take_the_exact_path_and_pass() -> None:
    traj = long_trajectory()
    traj.behavior_logprobs[::2] = 0.0
    traj.behavior_logprobs[1] = -0.0
    traj.behavior_logprobs[3] = LOGPROB_TOLERANCE
    assert verdicts(traj, DEFAULT_LIMITS) == {"ok"}


def test_decoded_plain_group_members_still_get_every_group_rule() -> None:
    members = [long_trajectory(f"t{i}") for i in range(3)]
    members[2] = msgspec.structs.replace(members[2], id="t0", rewards={"format": math.inf})
    group = Group(id="g", producer="p", trajectories=members, created_at=1.0)
    assert verdicts(group, DEFAULT_LIMITS) == {"trajectories[2].rewards.format: must be finite (got inf)"}
    members[2].rewards = {}
    assert verdicts(group, DEFAULT_LIMITS) == {"trajectories[2].id: duplicate trajectory id 't0' in the group"}


def test_rewards_beyond_the_bound_are_refused_by_name() -> None:
    """1e308 is finite, but a group (1e308, -1e308, 0, 0) would make NaN advantages: the wire bounds rewards."""
    traj = msgspec.structs.replace(long_trajectory(), reward=1e308)
    assert verdicts(traj, DEFAULT_LIMITS) == {"reward: must be <= 1000000000.0 (got 1e+308)"}
    traj = msgspec.structs.replace(long_trajectory(), reward=-MAX_ABS_REWARD, rewards={"judge": -1e200})
    assert verdicts(traj, DEFAULT_LIMITS) == {"rewards.judge: must be >= -1000000000.0 (got -1e+200)"}


def test_optional_fields_of_a_plain_trajectory_are_still_checked_and_travel() -> None:
    traj = msgspec.structs.replace(
        long_trajectory(), loss_mask=np.ones(1024, np.uint8), rewards={"a": 1.0}, version_ranges=[(0, 1024, 3)],
        meta={"k": [1, 2]},
    )  # fmt: skip
    decoded = decode(encode(traj))
    assert decoded.version_ranges == [(0, 1024, 3)] and decoded.rewards == {"a": 1.0} and decoded.meta == {"k": [1, 2]}
    assert np.array_equal(decoded.loss_mask, traj.loss_mask)
    traj.loss_mask[5] = 2
    assert verdicts(traj, DEFAULT_LIMITS) == {"loss_mask: values must be 0 or 1 (got 2 at position 5)"}


def test_unset_optional_fields_are_left_off_the_wire_and_decode_to_their_defaults() -> None:
    wire = msgpack.unpackb(encode(long_trajectory()))
    assert not {"loss_mask", "rewards", "version_ranges", "meta"} & set(wire)
    decoded = decode(encode(long_trajectory()))
    assert (decoded.loss_mask, decoded.rewards, decoded.version_ranges, decoded.meta) == (None, {}, None, {})


def test_an_invalid_optional_value_is_still_written_so_that_decode_names_it() -> None:
    traj = msgspec.structs.replace(long_trajectory(), rewards=[], meta="")
    assert verdicts(traj, DEFAULT_LIMITS) == {"rewards: must be a map (got list)"}


@pytest.mark.parametrize(
    ("data", "field", "rule"),
    [
        (
            b"\x81\xa4meta\xc4\x64" + b"\0" * 10,
            "meta",
            "not valid msgpack (ValueError: Unpack failed: incomplete input)",
        ),
        (b"\x81\xa4meta\xc4\x44" + b"\0" * 68, "meta", "not valid msgpack (ValueError: 68 exceeds max_bin_len(64))"),
        (b"\x81\xa4meta\xdc\x00\x05\x01", "meta", "not valid msgpack (ValueError: Unpack failed: incomplete input)"),
        (b"\x82\xa4meta\x80", "data", "not valid msgpack (ValueError: Unpack failed: incomplete input)"),
        (b"\x81\xa4meta\xc7\x00\x05", "meta", "msgpack ext type 5 is not allowed"),
        (b"\x81\xa4meta\xc4\x01x\x00", "data", "trailing bytes after the message"),
    ],
)
def test_decode_fails_alike_below_and_above_the_small_input_size(data: bytes, field: str, rule: str) -> None:
    """Inputs up to Limits.small_message_bytes (64 here) are unpacked without parsing the configured limits
    (msgpack's own, derived from the input's length, are tighter there); they fail as any input does."""
    limits = Limits(max_tokens=16, max_meta_bytes=64)
    assert limits.small_message_bytes == 64
    with pytest.raises(MessageError) as info:
        decode(data, limits)
    assert (info.value.field, info.value.rule) == (field, rule)


def long_trajectory(id_: str = "t0") -> Trajectory:
    rng = np.random.default_rng(0)
    return Trajectory(
        id=id_,
        group_id="g",
        producer="rollout-0",
        prompt_ids=rng.integers(0, 1000, 128, dtype=np.int32),
        response_ids=rng.integers(0, 1000, 1024, dtype=np.int32),
        behavior_logprobs=np.log(rng.uniform(0.01, 1.0, 1024)).astype(np.float32),
        reward=1.0,
        policy_version=3,
        finish_reason="length",
        created_at=1.7e9,
    )


def test_encoding_after_a_failed_encoding_and_from_many_threads_gives_the_same_bytes() -> None:
    """encode reuses one msgpack Packer per thread: a failure must not leave bytes behind, nor may threads mix."""
    messages = [long_trajectory(f"t{i}") for i in range(8)]
    expected = [encode(msg) for msg in messages]
    with pytest.raises(MessageError, match=r"^data: cannot encode"):
        encode(msgspec.structs.replace(messages[0], meta={"x": object()}), validate=False)
    assert encode(messages[0]) == expected[0]

    def encode_all(_: int) -> list[bytes]:
        return [encode(msg) for _ in range(50) for msg in messages]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(encode_all, range(4)))
    assert all(result == expected * 50 for result in results)
