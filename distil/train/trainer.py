"""The distillation loop: one DeepSpeed ZeRO engine per worker, any world size.

`Trainer` owns the models, engine, sampler and masker; `Trainer.train()` is the loop:
resume -> (batch, mask, teacher forward, student forward/backward, step) x N -> log ->
held-out figures (distil/eval/in_loop.py) -> checkpoint. What a worker sets up first (validation, data, precision,
process group) is in distil/train/setup.py; saving, resuming and the preemption signals belong
to the Checkpointer (distil/runs/checkpointer.py).
"""

from __future__ import annotations

# Imports inside functions: DeepSpeed (see distil/train/setup.py), and tqdm only for a progress bar
# on a terminal.
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from distil.data.batches import Lookahead, ResumableSampler, collate
from distil.data.masking import Masker
from distil.eval.in_loop import InLoopEval
from distil.model.student import MaskedLM, build_student, set_dropout, student_projection
from distil.model.student_shape import StudentShape
from distil.model.teacher import load_teacher
from distil.objectives.losses import DistillationLoss, distillation_forward
from distil.runs.checkpointer import Checkpointer
from distil.runs.heartbeat import Gap
from distil.runs.metrics_log import MetricsLog
from distil.runs.stores import CheckpointStore, LocalCheckpointStore
from distil.train import zero_foreach
from distil.train.budget import TimeBudget
from distil.train.setup import RunInputs, deepspeed_config, lr_lambda


class Trainer:
    """One rank of a distillation. `run_dir`: the run's folder (a Ray worker's is a local
    staging folder; its `store` puts checkpoints in Ray's storage)."""

    def __init__(self, prep: RunInputs, run_dir: Path, log=print, store: CheckpointStore | None = None):
        import deepspeed

        self.cfg, self.prep, self.run_dir, self.log = prep.cfg, prep, Path(run_dir), log
        cfg = self.cfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local_rank}") if prep.device.type == "cuda" else prep.device
        self.pad_to = 8 if self.device.type == "cuda" else 1  # training batches' widths (distil.data.batches.collate)
        torch.manual_seed(cfg.run.seed)
        needs_logits = cfg.loss.needs_logits
        teacher = load_teacher(cfg, with_head=needs_logits)
        t_shape, shape = StudentShape.of(teacher.config), StudentShape.for_student(cfg.student, teacher.config)
        student = build_student(teacher, cfg.student.layers, cfg.student.architecture, shape, cfg.student.init)
        narrower = shape.hidden != t_shape.hidden and cfg.loss.needs_hidden
        # The teacher runs in half precision where the device supports it; it is never trained.
        t_dtype = (
            {"bf16": torch.bfloat16}.get(prep.dtype, torch.float16) if self.device.type == "cuda" else torch.float32
        )
        self.teacher = MaskedLM(teacher).to(self.device, t_dtype)
        model = MaskedLM(student, student_projection(t_shape, shape, cfg.student.init) if narrower else None)
        if cfg.train.compile:  # in place: parameter names, checkpoints and the export stay the eager ones
            self.teacher.model.base_model.compile()
            model.model.base_model.compile()
        if cfg.student.dropout is not None:
            set_dropout(student, cfg.student.dropout)
        if cfg.student.freeze_embeddings:
            model.model.get_input_embeddings().weight.requires_grad_(False)
        trained = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in trained if p.ndim > 1]
        no_decay = [p for p in trained if p.ndim <= 1]  # biases and LayerNorms, as BERT
        o = cfg.optim
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            betas=o.betas,
            eps=o.eps,
            foreach=True,
        )
        self.budget = TimeBudget(cfg.train.time_budget_minutes, cfg.train.max_steps, self.device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, self.budget.planned_end))
        # Before the engine exists: a checkpoint from another worker count needs an engine that
        # loads DeepSpeed's universal layout.
        self.checkpointer = Checkpointer(cfg, self.run_dir, store or LocalCheckpointStore(), self.device, log)
        ds_config = deepspeed_config(cfg, prep.dtype, self.world, load_universal=self.checkpointer.resharding)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        zero_foreach.install(self.engine.optimizer)  # ZeRO's per-tensor gradient scans as multi-tensor kernels
        self.masker = Masker(cfg.masking, prep.tokenizer, cfg.run.seed, prep.counts)
        self.loss = DistillationLoss(
            cfg.loss, cfg.student.layers, teacher.config.num_hidden_layers, (shape.heads, t_shape.heads)
        )
        lengths = prep.train.lengths() if cfg.data.packing == "lines" and cfg.data.group_by_length else None
        self.sampler = ResumableSampler(len(prep.train), cfg.run.seed, lengths, step_size=cfg.train.global_batch_size)
        self.batches = Lookahead(self._make_batch)
        self.gas = self.engine.gradient_accumulation_steps()
        self.step, self.tokens, self._pending_tokens = 0, 0, 0
        self.resizes: list[dict] = []  # {"step", "from", "to"}: each start on another worker count
        self.measure = InLoopEval(
            cfg,
            prep,
            self.teacher,
            self.masker,
            self._forward,
            list(self.loss.weights()),
            self.device,
            self.rank,
            self.world,
        )
        self.last_loss = float("nan")
        # A bar only on a terminal: in a pod's log it would be one endless `\r` line; there,
        # every logged row is a plain line instead.
        self.show_bar = cfg.train.progress_bar and self.rank == 0 and sys.stderr.isatty()
        echo = None if self.show_bar else log
        self.metrics = MetricsLog(self.run_dir, enabled=self.rank == 0, tensorboard=cfg.train.tensorboard, echo=echo)

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "sampler": self.sampler.state_dict(),
            "world_size": self.world,
            "resizes": self.resizes,
            **self.budget.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = state["step"], state["tokens"]
        self.sampler.load_state_dict(state["sampler"])
        self.budget.load_state_dict(state)
        self.resizes = list(state.get("resizes", []))
        if state["world_size"] != self.world:  # resumed by another number of workers: one more resize
            self.resizes.append({"step": self.step, "from": state["world_size"], "to": self.world})

    def _sync_tokens(self) -> int:
        """Add every rank's tokens since the last sync to the global count; returns the increase."""
        delta = torch.tensor(float(self._pending_tokens), dtype=torch.float64, device=self.device)  # NCCL: on the GPU
        dist.all_reduce(delta)
        self._pending_tokens = 0
        self.tokens += int(delta)
        return int(delta)

    def save_checkpoint(self, wait: bool = False) -> None:
        """This step's checkpoint, unless it is saved already (see Checkpointer.save; `wait`: until
        it is uploaded)."""
        self._sync_tokens()  # (a collective: every rank is here, saving or not)
        self.checkpointer.save(
            self.step,
            self.engine,
            self.prep.tokenizer,
            self.state_dict(),
            {"loss": self.last_loss},
            self.metrics,
            wait=wait,
        )

    def resume(self) -> None:
        """Continue from the checkpoint the Checkpointer found, if any."""
        complete = self.checkpointer.load(self.engine, self)
        if complete is not None:
            self.last_loss = complete.get("loss", float("nan"))
            self.metrics.resumed_at(self.step, self.checkpointer.metrics_of(self.checkpointer.resume_tag))
            if self.checkpointer.resharding and self.rank == 0:
                self.log(_resize_line(self.resizes[-1], self.checkpointer.gap, self.cfg.scaling.elastic))

    # -- one optimizer step ----------------------------------------------------------
    def _batch(self, micro: int):
        """This rank's micro-batch `micro` of the current step, made ahead on another thread."""
        m, n = self.cfg.train.micro_batch_size, self.cfg.train.micro_batch_size * self.world
        idx = self.sampler.next_indices(n, self.rank, m)
        following = (self.step, micro + 1) if micro + 1 < self.gas else (self.step + 1, 0)
        return self.batches.get((self.step, micro), idx, following, self.sampler.peek(n, self.rank, m))

    def _make_batch(self, key: tuple[int, int], idx):
        step, micro = key
        ids, attn = collate(
            self.prep.train.rows(idx), self.prep.tokenizer.pad_token_id, self.cfg.data.max_len, self.pad_to
        )
        masked, labels = self.masker(ids, attn, step, micro, self.rank)  # a function of (seed, step, micro, rank)
        if self.device.type == "cuda":  # pinned here, off the step's thread; the step copies asynchronously
            masked, attn, labels = masked.pin_memory(), attn.pin_memory(), labels.pin_memory()
        return masked, attn, labels, int(attn.sum())

    def _forward(self, model, teacher, masked, attn, labels):
        return distillation_forward(model, teacher, self.loss, masked, attn, labels, device=self.device)

    def train_step(self) -> dict[str, torch.Tensor]:
        sums: dict[str, torch.Tensor] = {}
        for micro in range(self.gas):
            masked, attn, labels, n_tokens = self._batch(micro)
            terms = self._forward(self.engine, self.teacher, masked, attn, labels)
            self.engine.backward(terms["loss"])
            self.engine.step()
            self._pending_tokens += n_tokens
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / self.gas
        self.step += 1
        return sums

    # -- the loop ------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        self.resume()
        self.engine.module.train()
        if self.step == 0:
            start_metrics = self.measure(
                self.engine.module, probe=True
            )  # the untrained student: what the summary compares with
            self.metrics.write({"step": self.step, **start_metrics})
        else:  # resumed: the step-0 figures are in the run's history; evaluating again only delays the first step
            start_metrics = self.metrics.first_eval()
        bar = self._progress_bar()
        started, first_step, first_tokens = time.perf_counter(), self.step, self.tokens
        self._open_window()
        end_metrics: dict[str, float] = {}
        stop = False
        self.budget.begin(self.step)
        if self.budget.notice() and self.rank == 0:
            self.log(self.budget.notice())
        while self.step < self.budget.end_step() and not stop:
            for k, v in self.train_step().items():
                self._window[k] = self._window.get(k, 0.0) + v
            self._window_steps += 1
            plan = self.budget.after_step(self.step)
            if plan and self.rank == 0:
                self.log(plan)
                if bar is not None:
                    bar.total = self.budget.end_step()
                    bar.refresh()
            self.checkpointer.beat(self.step)
            # A pod drain or Ray's notice: a checkpoint now, uploaded. SIGTERM: stop after this step.
            stop = self.checkpointer.preempted(self.step, save=self._save_now)
            if bar is not None:
                bar.update(1)
            last = self.step == self.budget.end_step()
            if (self.step % t.log_every == 0 or last or stop) and self._window_steps:
                row = self._log_window()
                if bar is not None:
                    bar.set_postfix(loss=f"{row['train/loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            # The last step's held-out figures come before its checkpoint, which keeps them (its
            # metrics.jsonl: the exported model's card shows them). A preempted pod has seconds
            # left: it only checkpoints.
            if (t.eval_every and self.step % t.eval_every == 0 or last) and not stop:
                end_metrics = self.measure(self.engine.module, probe=last)
                self.metrics.write({"step": self.step, **end_metrics})
            if self.step % cfg.checkpoint.every_steps == 0 or last or stop:
                self.save_checkpoint(wait=last or stop)
        self.batches.close()
        if bar is not None:
            bar.close()
        self.metrics.close()
        self.checkpointer.close()  # the history's copy, and any upload still in flight
        wall = time.perf_counter() - started
        return {
            "step": self.step,
            "tokens": self.tokens,
            "start": start_metrics,
            "end": {} if stop else end_metrics,
            "planned_steps": self.budget.planned
            if self.budget.end_step() < t.max_steps
            else None,  # a budget cut it short
            "stopped": stop,
            "wall_s": wall,
            "steps_run": self.step - first_step,
            "tokens_per_s": (self.tokens - first_tokens) / wall,
            "workers": self.world,
            "resizes": self.resizes,
        }

    def _save_now(self) -> None:
        """The checkpoint a pod drain or Ray's notice asks for, uploaded before this returns, with
        this step's metrics row in it (the history resumed from it must not miss the step)."""
        if self._window_steps:
            self._log_window()
        self.save_checkpoint(wait=True)

    def _open_window(self) -> None:
        """Start the steps that the next metrics line averages over."""
        self._window, self._window_steps = {}, 0
        self._window_t, self._window_tokens = time.perf_counter(), self.tokens

    def _log_window(self) -> dict:
        """One metrics row: every loss term averaged over the window's steps and the ranks, lr,
        grad norm, throughput and the time to the last step at this pace."""
        n = self._window_steps
        self._sync_tokens()
        vec = torch.stack([self._window[k] for k in sorted(self._window)])
        dist.all_reduce(vec)
        elapsed = time.perf_counter() - self._window_t
        row = {
            "step": self.step,
            **{f"train/{k}": float(v) / self.world / n for k, v in zip(sorted(self._window), vec)},
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            "tokens": self.tokens,
            "workers": self.world,  # (an elastic run: the worker group's size at this step)
            "tokens_per_s": (self.tokens - self._window_tokens) / elapsed,
            "eta_s": (self.budget.end_step() - self.step) * elapsed / n,
        }
        if self.engine.fp16_enabled():
            row["loss_scale"] = float(self.engine.optimizer.loss_scale)
        self.metrics.write(row)
        self.last_loss = row["train/loss"]
        self._open_window()
        return row

    def _progress_bar(self):
        if not self.show_bar:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.budget.end_step(), initial=self.step, desc="distil", unit="step", dynamic_ncols=True)


def _resize_line(resize: dict, gap: Gap | None, elastic: bool = True) -> str:
    """One line for a start on another number of workers than the checkpoint's: from how many to
    how many, why (an elastic run gets as many workers as Ray can place: fewer, a node was lost or
    is being reclaimed; more, capacity came back), at which step, and how long the run trained
    nothing before it (`gap`: distil/runs/heartbeat.py)."""
    if not elastic:
        why = "started again with another scaling.num_workers"
    elif resize["to"] < resize["from"]:
        why = "fewer could be placed: a node was lost or is being reclaimed"
    else:
        why = "capacity came back"
    since = f"; down about {gap.seconds:.0f} s (the run's last sign of life: step {gap.last_step})" if gap else ""
    return f"resize: {resize['from']} -> {resize['to']} workers at step {resize['step']} ({why}){since}"
