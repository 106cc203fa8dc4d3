"""Admission: the capacity rule paces tasks by staleness, task ids name the run and dataset position, and the state
(persisted with every batch of tasks) resumes the same run where it stopped."""

from __future__ import annotations

from typing import Any

from bus.schema import Sampling, Task
from envs.dataset import PromptDataset
from envs.rows import PROMPT_MESSAGES, PromptRow
from learner_node.admission import MESSAGES_META_CHARS, Admission


def make(rows: int = 5, groups_per_step: int = 2, max_staleness: int = 1, epochs: int = 0) -> tuple[Admission, list]:
    published: list[tuple[list[Task], dict[str, Any]]] = []
    data = [PromptRow(f"r{i}", f"{i}+1=", {"ground_truth": str(i + 1)}) for i in range(rows)]
    admission = Admission(
        PromptDataset(data, shuffle=False, seed=0, epochs=epochs),
        lambda tasks, state: published.append((tasks, state)),
        lambda row: str(row.prompt),
        run_name="run",
        groups_per_step=groups_per_step,
        max_staleness=max_staleness,
        n=4,
        sampling=Sampling(temperature=0.7, max_new_tokens=3),
    )
    return admission, published


def test_capacity_rule_keeps_at_most_staleness_plus_one_steps_in_flight() -> None:
    admission, published = make(groups_per_step=2, max_staleness=1)
    assert admission.pump(min_version=0) == 4  # (1 + 1) * 2
    assert admission.pump(min_version=0) == 0  # full until groups are trained or dropped
    admission.record(trained=2, dropped=0)  # one step trained two groups: two slots free
    assert admission.pump(min_version=1) == 2
    admission.record(trained=0, dropped=1)  # a dropped group will never train: its slot is free again
    assert admission.pump(min_version=1) == 1
    assert [len(tasks) for tasks, _ in published] == [4, 2, 1]
    assert (admission.published, admission.in_flight(), admission.capacity()) == (7, 4, 0)


def test_tasks_carry_position_ids_prompt_sampling_and_min_version() -> None:
    admission, published = make(rows=3, groups_per_step=2, max_staleness=2)
    admission.pump(min_version=0)
    admission.record(trained=2, dropped=0)
    admission.pump(min_version=1)
    tasks = [t for batch, _ in published for t in batch]
    prefix = admission.id_prefix
    assert prefix.startswith("run:") and len(prefix) == len("run:") + 7  # run name and a 6-hex-digit nonce
    # 3 rows per epoch: the ids name (epoch, index), so the 4th task is epoch 1, index 0.
    positions = ["0:0", "0:1", "0:2", "1:0", "1:1", "1:2", "2:0", "2:1"]
    assert [t.id for t in tasks] == [prefix + p for p in positions]
    assert all(admission.owns(t.id) for t in tasks) and not admission.owns("other:abc:0:0") and not admission.owns(None)
    first = tasks[0]
    assert (first.prompt, first.n, first.sampling.temperature, first.min_version) == ("0+1=", 4, 0.7, 0)
    assert first.meta == {"ground_truth": "1", "row_id": "r0"}
    assert tasks[-1].min_version == 1
    # Each batch is published with the state after it: where the next task comes from, and the count.
    assert published[0][1] | {"nonce": "-"} == {
        "nonce": "-", "epoch": 1, "index": 3, "seed": 0, "size": 3, "published": 6, "trained": 0, "dropped": 0,
    }  # fmt: skip


def test_a_resumed_run_continues_after_its_last_published_task() -> None:
    admission, published = make(rows=5, groups_per_step=1, max_staleness=1)
    admission.pump(min_version=0)
    admission.record(trained=1, dropped=0)
    state = {k: str(v) for k, v in admission.state_dict().items()}  # as it comes back from the Redis hash
    admission.pump(min_version=1)
    after = [t.id for t in published[-1][0]]

    resumed, again = make(rows=5, groups_per_step=1, max_staleness=1)
    resumed.load_state_dict(state)
    assert (resumed.published, resumed.trained, resumed.dropped, resumed.nonce) == (2, 1, 0, admission.nonce)
    resumed.pump(min_version=1)
    assert [t.id for t in again[-1][0]] == after


def test_a_finite_dataset_runs_out() -> None:
    admission, published = make(rows=3, groups_per_step=4, max_staleness=0, epochs=1)
    assert admission.pump(min_version=0) == 3
    assert admission.exhausted and len(published) == 1


def test_a_conversational_row_sends_its_messages_with_its_token_ids() -> None:
    # The rollout node's rewards get the conversation as TRL passes it (`prompts`), not the decoded template text.
    conversation = [{"role": "user", "content": "3+4?"}]
    rows = [PromptRow("c", conversation, {"ground_truth": "7"}), PromptRow("t", "3+4=", {"ground_truth": "7"})]
    rows.append(PromptRow("long", [{"role": "user", "content": "x" * (MESSAGES_META_CHARS + 1)}], {}))
    published: list[list[Task]] = []
    admission = Admission(
        PromptDataset(rows, shuffle=False, seed=0, epochs=1), lambda tasks, _: published.append(tasks),
        lambda row: str(row.prompt), run_name="run", groups_per_step=3, max_staleness=0, n=2, sampling=Sampling(),
    )  # fmt: skip
    admission.pump(min_version=0)
    [tasks] = published
    assert [t.meta.get(PROMPT_MESSAGES) for t in tasks] == [conversation, None, None]
