"""An iterator over prompt rows with epochs, per-epoch shuffling by seed, and a position that can be checkpointed.

data = PromptDataset(rows, shuffle=True, seed=0, epochs=0)          # balance=True: every answer equally often
row = next(data)
state = data.state_dict()          # saved with the learner's checkpoint
data.load_state_dict(state)        # later, in a new process: the same rows follow
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator, Sequence

from envs.rows import PromptRow


class PromptDataset(Iterator[PromptRow]):
    """Yields `rows` epoch after epoch (`epochs` = 0: forever), each epoch in its own seeded order when `shuffle`.

    With `balance`, an epoch is len(rows) draws that visit the distinct ground truths in turn (each round of them in
    a seeded order, each one's rows cycled in a seeded order), so every answer comes up equally often however skewed
    the rows are: a policy learning from reward alone then gains nothing by guessing the most common answer.

    The order of epoch e depends only on (seed, e), so a position (epoch, index) names the same next row in any
    process that holds the same rows.
    """

    def __init__(
        self, rows: Sequence[PromptRow], *, shuffle: bool, seed: int, epochs: int, balance: bool = False
    ) -> None:
        if not rows:
            raise ValueError("a dataset needs at least one row")
        self.rows = list(rows)
        self.shuffle, self.seed, self.epochs, self.balance = shuffle, seed, epochs, balance
        self.epoch, self.index = 0, 0
        self._order = self._order_of(0)

    def __len__(self) -> int:
        """Rows per epoch."""
        return len(self.rows)

    def _order_of(self, epoch: int) -> list[int]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        if self.balance:
            return self._balanced_order(rng)
        order = list(range(len(self.rows)))
        if self.shuffle:
            rng.shuffle(order)
        return order

    def _balanced_order(self, rng: random.Random) -> list[int]:
        by_answer: dict[str, list[int]] = defaultdict(list)
        for i, row in enumerate(self.rows):
            by_answer[str(row.meta.get("ground_truth"))].append(i)
        pools = list(by_answer.values())
        for pool in pools:
            rng.shuffle(pool)
        order: list[int] = []
        taken = [0] * len(pools)
        while len(order) < len(self.rows):
            turn = list(range(len(pools)))
            rng.shuffle(turn)
            for k in turn[: len(self.rows) - len(order)]:
                order.append(pools[k][taken[k] % len(pools[k])])
                taken[k] += 1
        return order

    def __next__(self) -> PromptRow:
        if self.index == len(self.rows):
            if self.epochs and self.epoch + 1 >= self.epochs:
                raise StopIteration
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._order_of(self.epoch)
        row = self.rows[self._order[self.index]]
        self.index += 1
        return row

    def state_dict(self) -> dict[str, int]:
        """The position: {"epoch", "index"} plus the "seed" and "size" it is only valid for."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "size": len(self.rows)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a saved position; a ValueError if the saved seed or size differ from this dataset's."""
        for key, mine in (("seed", self.seed), ("size", len(self.rows))):
            if state.get(key) != mine:
                raise ValueError(f"dataset state: {key} is {state.get(key)!r} in the checkpoint but {mine} now")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= len(self.rows):
            raise ValueError(f"dataset state: position (epoch {epoch}, index {index}) is out of range")
        self.epoch, self.index = epoch, index
        self._order = self._order_of(epoch)
