"""The reference of `slipstream bench learn`: a plain single-process GRPO loop, as a textbook (or TRL) writes it.

No bus, no engine, no FSDP: transformers' `generate` samples, the task's rewards score (the same `envs` task and
reward functions Slipstream uses, so both solve the same problem), and one clipped-surrogate step per batch trains:

    per step: draw `groups_per_step` prompts (a fresh shuffled order per epoch, like TRL's RepeatSampler)
              generate `num_generations` samples each (temperature, top_p, max_new_tokens; eos ends a sample)
              A_i = r_i - mean(group)  [/ (std + 1e-4) per scale_rewards]
              L = -sum_t min(r_t A, clip(r_t, 1 - eps, 1 + eps_high) A) / normaliser,  r_t = pi / pi.detach()
              (on-policy: the ratio is 1 and the gradient is -A grad log pi; normaliser per loss_agg)
              AdamW step after clipping the gradient norm

It reads only `[model]`, `[task]` and the learner's hyperparameters, so it answers "how fast does this recipe learn
without Slipstream?" for any config.
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from envs.config import TaskConfig
from envs.render import render_prompt, uses_chat_template
from envs.rows import PromptRow
from envs.scoring import RewardSet
from envs.sources import load_rows
from learner_node.config import LearnerConfig

STD_EPS = 1e-4


def _encode(rows: list[PromptRow], task: TaskConfig, tokenizer: Any) -> list[list[int]]:
    fmt = task.format
    return [
        tokenizer.encode(
            render_prompt(r.prompt, fmt, tokenizer), add_special_tokens=not uses_chat_template(fmt, tokenizer, r.prompt)
        )
        for r in rows
    ]


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


def _completions(out: torch.Tensor, prompt_width: int, eos_ids: set[int]) -> list[list[int]]:
    """Each generated row cut after its first eos (the eos is part of the completion, as TRL trains it)."""
    result = []
    for row in out[:, prompt_width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        result.append(row[:end])
    return result


class ReferenceGRPO:
    """One model, one optimizer, one task; `step()` trains once, `evaluate()` measures greedy accuracy."""

    def __init__(self, model_path: str, task: TaskConfig, cfg: LearnerConfig, *, seed: int, eval_split: str) -> None:
        torch.manual_seed(seed)
        self.rng = random.Random(seed)
        self.task, self.cfg = task, cfg
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, local_files_only=True)
        self.model.eval()  # no dropout: the sampled distribution is the trained one
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or [self.tokenizer.eos_token_id])
        self.rewards = RewardSet.from_config(task)
        self.train_rows = load_rows(task, "train")
        self.eval_rows = self.train_rows if eval_split == "train" else load_rows(task, "eval")
        self.order: list[PromptRow] = []
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay,
        )  # fmt: skip

    def _draw(self, count: int) -> list[PromptRow]:
        rows = []
        while len(rows) < count:
            if not self.order:
                self.order = list(self.train_rows)
                self.rng.shuffle(self.order)
            rows.append(self.order.pop())
        return rows

    def _generate(self, prompts: list[list[int]], n: int, greedy: bool) -> list[list[int]]:
        ids, mask = _left_pad(prompts, self.pad_id)
        sampling: dict[str, Any] = {"do_sample": False}
        if not greedy:
            sampling = {"do_sample": True, "temperature": self.cfg.temperature, "top_p": self.cfg.top_p, "top_k": 0}
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=self.cfg.max_new_tokens, num_return_sequences=n,
                pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids), **sampling,
            )  # fmt: skip
        return _completions(out, ids.shape[1], self.eos_ids)

    def _advantages(self, rewards: torch.Tensor, n: int) -> torch.Tensor:
        grouped = rewards.view(-1, n)
        advantages = grouped - grouped.mean(dim=1, keepdim=True)
        if self.cfg.scale_rewards == "group":
            advantages = advantages / (grouped.std(dim=1, keepdim=True) + STD_EPS)
        elif self.cfg.scale_rewards == "batch":
            advantages = advantages / (grouped.std() + STD_EPS)
        return advantages.reshape(-1)

    def step(self) -> dict[str, float]:
        cfg, n = self.cfg, self.cfg.num_generations
        started = time.monotonic()
        rows = self._draw(cfg.groups_per_step)
        prompts = _encode(rows, self.task, self.tokenizer)
        completions = self._generate(prompts, n, greedy=False)
        generated = time.monotonic()
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        rows_n = [r for r in rows for _ in range(n)]
        rewards = torch.tensor(self.rewards.score(texts, rows_n, completions).total, dtype=torch.float32)
        advantages = self._advantages(rewards, n)
        prompts_n = [p for p in prompts for _ in range(n)]
        total_tokens = sum(len(c) for c in completions)
        normaliser = {"token-mean": total_tokens, "seq-mean-token-mean": len(completions)}.get(
            cfg.loss_agg, len(completions) * cfg.max_new_tokens
        )
        for start in range(0, len(completions), cfg.micro_batch_size):
            part = slice(start, start + cfg.micro_batch_size)
            self._backward(prompts_n[part], completions[part], advantages[part], normaliser)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "reward_mean": float(rewards.mean()),
            "zero_std_frac": float((rewards.view(-1, n).std(dim=1) == 0).float().mean()),
            "grad_norm": float(norm),
            "generate_s": generated - started,
            "step_s": time.monotonic() - started,
        }

    def _backward(
        self, prompts: list[list[int]], completions: list[list[int]], advantages: torch.Tensor, normaliser: float
    ) -> None:
        """The textbook clipped surrogate on one micro-batch (rows: left-padded prompt + right-padded completion)."""
        cfg = self.cfg
        prompt_ids, prompt_mask = _left_pad(prompts, self.pad_id)
        width = max(len(c) for c in completions)
        completion_ids = torch.full((len(completions), width), self.pad_id, dtype=torch.long)
        completion_mask = torch.zeros((len(completions), width), dtype=torch.float32)
        for i, c in enumerate(completions):
            completion_ids[i, : len(c)] = torch.tensor(c)
            completion_mask[i, : len(c)] = 1
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention = torch.cat([prompt_mask, completion_mask.long()], dim=1)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions).logits
        logits = logits[:, prompt_ids.shape[1] - 1 : -1] / cfg.temperature
        logps = logits.log_softmax(-1).gather(-1, completion_ids[..., None]).squeeze(-1)
        ratio = torch.exp(logps - logps.detach())
        high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
        a = advantages[:, None]
        per_token = -torch.min(ratio * a, ratio.clamp(1 - cfg.epsilon, 1 + high) * a) * completion_mask
        if cfg.loss_agg == "seq-mean-token-mean":
            loss = (per_token.sum(-1) / completion_mask.sum(-1).clamp(min=1)).sum() / normaliser
        else:
            loss = per_token.sum() / normaliser
        loss.backward()

    def evaluate(self) -> float:
        """Greedy accuracy: a completion is correct when its total reward reaches `eval_threshold`."""
        prompts = _encode(self.eval_rows, self.task, self.tokenizer)
        correct = 0
        for start in range(0, len(prompts), self.cfg.eval_batch_size):
            part = slice(start, start + self.cfg.eval_batch_size)
            completions = self._generate(prompts[part], 1, greedy=True)
            texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
            scores = self.rewards.score(texts, self.eval_rows[part], completions).total
            correct += sum(score >= self.cfg.eval_threshold for score in scores)
        return correct / len(prompts)
