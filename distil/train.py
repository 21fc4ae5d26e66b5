"""The distillation loop: one DeepSpeed ZeRO engine per worker, any world size.

`prepare()` validates everything that can be wrong with the input and builds the data;
it writes nothing but the tokenization cache. `Trainer` owns the models, engine, sampler
and masker; `Trainer.train()` is the loop: resume -> (batch, mask, teacher forward,
student forward/backward, step) x N -> log -> checkpoint.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from distil import checkpoint as ckpt
from distil import preempt, reshard, zero_foreach
from distil.checkpoint_stores import CheckpointStore, LocalCheckpointStore
from distil.config import DistilConfig
from distil.data import Lookahead, ResumableSampler, collate
from distil.errors import UserError
from distil.evaluate import agreement, embed
from distil.export import save_hf_skeleton
from distil.losses import DistillationLoss, distillation_forward
from distil.masking import Masker
from distil.metrics_log import METRICS, MetricsLog
from distil.model import MaskedLM, build_student, load_teacher, load_teacher_config, validate_against_teacher
from distil.prepared import open_prepared
from distil.token_store import TokenSplit, TokenStore

EVAL_STEP = 2**31 - 1  # masking stream reserved for held-out evaluation


def check_precision(cfg: DistilConfig, gpu: bool) -> str:
    """The training dtype for workers with (or without) a GPU; refuses what the device can't do."""
    dtype = cfg.precision.dtype
    if dtype == "auto":
        dtype = "fp16" if gpu else "fp32"
    if dtype == "fp16" and not gpu:
        raise UserError("fp16 training needs a GPU; DeepSpeed refuses fp16 on CPU", where="precision.dtype",
                        fix="use dtype: auto (fp32 on CPU), fp32 or bf16, or run on GPU workers")
    if dtype == "bf16" and gpu and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bf16 support", where="precision.dtype", fix="use dtype: fp16")
    return dtype


def resolve_precision(cfg: DistilConfig) -> tuple[torch.device, str]:
    want = cfg.precision.device
    cuda = torch.cuda.is_available()
    if want == "cuda" and not cuda:
        raise UserError("device 'cuda' requested but no GPU is visible", where="precision.device", fix="use device: auto or cpu")
    device = torch.device("cuda" if (want == "cuda" or (want == "auto" and cuda)) else "cpu")
    return device, check_precision(cfg, gpu=device.type == "cuda")


@dataclass
class Prepared:
    cfg: DistilConfig
    tokenizer: object
    train: TokenSplit
    eval: TokenSplit
    counts: np.ndarray | None
    device: torch.device
    dtype: str


def load_tokenizer(cfg: DistilConfig):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(cfg.teacher.name_or_path), revision=cfg.teacher.revision)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the teacher's tokenizer from {cfg.teacher.name_or_path!r}: {str(e).splitlines()[0][:300]}",
                        where="teacher.name_or_path", fix="point it at a folder with the tokenizer files, or a reachable hub id") from None
    if tokenizer.mask_token_id is None:
        raise UserError("the teacher's tokenizer has no mask token", where="teacher.name_or_path")
    return tokenizer


def build_data(cfg: DistilConfig, tokenizer, world_size: int, log=print, use_ray: bool | None = None,
               fingerprint: str | None = None) -> TokenStore:
    """The run's prepared sequences (tokenized once, see distil/prepared.py); refuses a corpus
    too small for one batch."""
    per_step = cfg.train.micro_batch_size * world_size
    cfg.check_batch_split(world_size)  # (checked on the driver too; this is the worker's actual world size)
    return open_prepared(cfg, tokenizer, per_step, log, use_ray=use_ray, fingerprint=fingerprint)


def prepare(cfg: DistilConfig, world_size: int = 1, fingerprint: str | None = None) -> Prepared:
    """Validate the run against the teacher, the device and the data; build the sequences (or,
    with `fingerprint`, open the data a Ray driver prepared)."""
    validate_against_teacher(cfg, load_teacher_config(cfg))
    device, dtype = resolve_precision(cfg)
    tokenizer = load_tokenizer(cfg)
    log = (lambda m: print(m, flush=True)) if int(os.environ.get("RANK", "0")) == 0 else (lambda _: None)
    started = time.perf_counter()
    store = build_data(cfg, tokenizer, world_size, log=log, fingerprint=fingerprint)
    log(f"data {store.manifest['fingerprint']}: {len(store['train']):,} training / {len(store['eval']):,} held-out sequences, "
        f"opened in {time.perf_counter() - started:.1f} s")
    counts = store.counts() if cfg.masking.smoothing is not None else None
    return Prepared(cfg, tokenizer, store["train"], store["eval"], counts, device, dtype)


def deepspeed_config(cfg: DistilConfig, dtype: str, world_size: int, load_universal: bool = False) -> dict:
    """`load_universal`: the engine will load a checkpoint converted to DeepSpeed's universal
    layout, i.e. one written by another number of workers (see distil/reshard.py)."""
    t, z, p = cfg.train, cfg.zero, cfg.precision
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * world_size),
        "train_batch_size": t.global_batch_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": z.stage, "overlap_comm": z.overlap_comm, "contiguous_gradients": z.contiguous_gradients,
                              "reduce_bucket_size": z.reduce_bucket_size, "allgather_bucket_size": z.allgather_bucket_size},
        "fp16": {"enabled": dtype == "fp16", "loss_scale": 0, "initial_scale_power": p.initial_scale_power,
                 "loss_scale_window": p.loss_scale_window, "hysteresis": 2, "min_loss_scale": 1},
        "bf16": {"enabled": dtype == "bf16"},
        # A torch AdamW is handed in: DeepSpeed's fused Adam would JIT-compile on a CPU.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "checkpoint": {"load_universal": load_universal},
    }


def lr_lambda(cfg: DistilConfig):
    warmup = int(cfg.optim.warmup_ratio * cfg.train.max_steps)
    total = cfg.train.max_steps

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 1.0 if cfg.optim.schedule == "constant" else max(0.0, (total - step) / max(1, total - warmup))
    return f


def init_distributed(device: torch.device) -> None:
    """Join the process group Ray Train made, or make a one-process group for a local run."""
    import deepspeed
    import deepspeed.ops

    if device.type == "cpu":
        # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU ranks at start-up: minutes
        # on a cold cache, a compiler at run time, and a hang forever if a killed process left
        # its build lock behind. gloo's all-reduce is what we use instead.
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            deepspeed.ops.__compatible_ops__[builder.NAME] = False
    if not dist.is_initialized() and "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Trainer:
    def __init__(self, prep: Prepared, run_dir: Path, log=print, store: CheckpointStore | None = None):
        import deepspeed

        self.cfg, self.prep, self.run_dir, self.log = prep.cfg, prep, Path(run_dir), log
        self.store = store or LocalCheckpointStore()
        cfg = self.cfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local_rank}") if prep.device.type == "cuda" else prep.device
        torch.manual_seed(cfg.run.seed)
        needs_logits = cfg.loss.needs_logits
        teacher = load_teacher(cfg, with_head=needs_logits)
        student = build_student(teacher, cfg.student.layers, cfg.student.architecture)
        # The teacher runs in half precision where the device supports it; it is never trained.
        t_dtype = {"bf16": torch.bfloat16}.get(prep.dtype, torch.float16) if self.device.type == "cuda" else torch.float32
        self.teacher = MaskedLM(teacher).to(self.device, t_dtype)
        model = MaskedLM(student)
        if cfg.train.compile:  # in place: parameter names, checkpoints and the export stay the eager ones
            self.teacher.model.base_model.compile()
            model.model.base_model.compile()
        decay = [p for n, p in model.named_parameters() if p.ndim > 1]
        no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]  # biases and LayerNorms, as BERT
        o = cfg.optim
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                      lr=o.lr, betas=o.betas, eps=o.eps, foreach=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.ckpt_root = self.run_dir / "checkpoints"
        # Found before the engine exists: a checkpoint from another worker count needs an
        # engine that loads DeepSpeed's universal layout.
        # The store decides: checkpoint.resume was settled before the workers started (continuity),
        # and a Ray worker group restarted after a lost worker must resume from its own run.
        self.resume_tag = self.store.restore(self.ckpt_root)
        self.saved_world = ckpt.read_trainer_state(self.ckpt_root / self.resume_tag)["world_size"] if self.resume_tag else self.world
        ds_config = deepspeed_config(cfg, prep.dtype, self.world, load_universal=self.saved_world != self.world)
        self.engine, _, _, self.scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                                 config=ds_config)
        zero_foreach.install(self.engine.optimizer)  # ZeRO's per-tensor gradient scans as multi-tensor kernels
        self.masker = Masker(cfg.masking, prep.tokenizer, cfg.run.seed, prep.counts)
        self.loss = DistillationLoss(cfg.loss, cfg.student.layers)
        lengths = prep.train.lengths() if cfg.data.packing == "lines" and cfg.data.group_by_length else None
        self.sampler = ResumableSampler(len(prep.train), cfg.run.seed, lengths)
        self.batches = Lookahead(self._make_batch)
        self.gas = self.engine.gradient_accumulation_steps()
        self.step, self.tokens, self._pending_tokens = 0, 0, 0
        self.stop_requested = False
        self._preemption_saved = False
        self._saved_step = -1
        self.last_loss = float("nan")
        # A bar only on a terminal: in a pod's log it would be one endless `\r` line; there,
        # every logged row is a plain line instead.
        self.show_bar = cfg.train.progress_bar and self.rank == 0 and sys.stderr.isatty()
        echo = None if self.show_bar else log
        self.metrics = MetricsLog(self.run_dir, enabled=self.rank == 0, tensorboard=cfg.train.tensorboard, echo=echo)

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "sampler": self.sampler.state_dict(), "world_size": self.world}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = state["step"], state["tokens"]
        self.sampler.load_state_dict(state["sampler"])

    def _sync_tokens(self) -> int:
        """Add every rank's tokens since the last sync to the global count; returns the increase."""
        delta = torch.tensor(float(self._pending_tokens), dtype=torch.float64, device=self.device)  # NCCL: on the GPU
        dist.all_reduce(delta)
        self._pending_tokens = 0
        self.tokens += int(delta)
        return int(delta)

    def save_checkpoint(self, wait: bool = False) -> None:
        """Save this step's checkpoint and hand it to the store. Uploads run while training goes
        on, one at a time: a save first waits for the previous upload (so the local disk holds at
        most two checkpoints); `wait` also waits for this one (a drain, the end of the run)."""
        if self._saved_step == self.step:
            return  # e.g. a pod drain's checkpoint, then the periodic one at the same step
        t0 = time.perf_counter()
        self.store.wait_uploaded()
        held = time.perf_counter() - t0  # training held for the previous upload
        t0 = time.perf_counter()
        self._sync_tokens()
        tag = self.store.checkpoint_name(ckpt.tag_for(self.step))
        if self.rank == 0:
            ckpt.clear_for_save(self.ckpt_root / tag)
        dist.barrier()
        self.engine.save_checkpoint(str(self.ckpt_root), tag=tag, client_state=reshard.universal_info(), save_latest=False)
        ckpt.save_rank_state(self.ckpt_root / tag, self.rank)
        dist.barrier()
        # Every rank hashes the files it wrote (a Ray worker sees only its own); rank 0's are
        # hashed in finalize, with the files it adds now.
        mine = ckpt.rank_manifest(self.ckpt_root / tag, self.rank) if self.rank else {}
        parts = [None] * self.world
        dist.all_gather_object(parts, mine)
        if self.rank == 0:
            save_hf_skeleton(self.engine.module.model, self.prep.tokenizer, self.ckpt_root / tag)
            self.metrics.snapshot_into(self.ckpt_root / tag)
            summary = {"loss": self.last_loss, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            ckpt.finalize(self.ckpt_root, tag, self.state_dict(), self.cfg.to_yaml(), self.cfg.checkpoint.keep_last,
                          manifest={k: v for part in parts for k, v in part.items()}, summary=summary)
        dist.barrier()
        self._saved_step = self.step
        t1 = time.perf_counter()
        self.store.persist(self.ckpt_root / tag, {"step": self.step, "tokens": self.tokens})
        if wait:
            self.store.wait_uploaded()
        # upload_s: seconds training was held for uploads at this checkpoint (0 when they ran
        # during the steps before)
        self.metrics.write({"step": self.step, "checkpoint/save_s": t1 - t0, "checkpoint/upload_s": held + time.perf_counter() - t1})
        self.metrics.flush()
        if self.rank == 0:
            self.store.publish(self.run_dir)
        # Each rank waits for its own upload only: a drained pod must not be told "persisted"
        # (and go) while another rank is still uploading its shard.
        dist.barrier()

    def maybe_resume(self) -> None:
        tag = self.resume_tag
        if tag is None:
            return
        # The store's restore() found this checkpoint intact (every file's size and sha256).
        complete = ckpt.read_complete(self.ckpt_root / tag)
        manifest = complete["files"]
        stale = ckpt.drop_unlisted(self.ckpt_root / tag, manifest)
        if stale and self.rank == 0:
            self.log(f"{tag}: ignored {len(stale)} file(s) its manifest does not list, left by an unfinished save: {stale[:3]}")
        load_dir = self.ckpt_root
        if self.saved_world != self.world:  # re-partition the ZeRO-2 state for this worker count
            load_dir = reshard.to_universal(self.ckpt_root / tag, self.run_dir / f"universal-rank{self.rank}")
        self.engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_dir != self.ckpt_root:
            shutil.rmtree(load_dir)
        self.load_state_dict(ckpt.read_trainer_state(self.ckpt_root / tag))
        self._saved_step = self.step  # that step's checkpoint exists: a drain right now needs no new one
        self.last_loss = complete.get("loss", float("nan"))
        self.metrics.resumed_at(self.step, self.ckpt_root / tag / METRICS)
        exact = ckpt.load_rank_state(self.ckpt_root / tag, self.rank)
        if self.rank == 0:
            how = f"; written by {self.saved_world} workers, ZeRO-2 state re-partitioned for {self.world}" if load_dir != self.ckpt_root else ""
            self.log(f"resumed from {tag} (step {self.step}, {self.tokens:,} tokens){how}"
                     f"{'' if exact else '; RNG streams re-seeded (new rank)'}")

    # -- one optimizer step ----------------------------------------------------------
    def _batch(self, micro: int):
        """This rank's micro-batch `micro` of the current step, made ahead on another thread."""
        m, n = self.cfg.train.micro_batch_size, self.cfg.train.micro_batch_size * self.world
        idx = self.sampler.next_indices(n, self.rank, m)
        following = (self.step, micro + 1) if micro + 1 < self.gas else (self.step + 1, 0)
        return self.batches.get((self.step, micro), idx, following, self.sampler.peek(n, self.rank, m))

    def _make_batch(self, key: tuple[int, int], idx):
        step, micro = key
        ids, attn = collate(self.prep.train.rows(idx), self.prep.tokenizer.pad_token_id, self.cfg.data.max_len)
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

    # -- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss terms (fixed masks) and teacher/student agreement, averaged over ranks."""
        held_out = self.prep.eval
        if len(held_out) == 0:
            return {}
        model = self.engine.module
        model.eval()
        shard = list(range(self.rank, len(held_out), self.world))
        batches = [collate(held_out.rows(shard[i:i + 32]), self.prep.tokenizer.pad_token_id, self.cfg.data.max_len)
                   for i in range(0, len(shard), 32)]
        sums, n = {k: 0.0 for k in [*self.loss.weights(), "loss"]}, 0  # same keys on every rank, even an idle one
        for b, (ids, attn) in enumerate(batches):
            masked, labels = self.masker(ids, attn, EVAL_STEP, b, self.rank)
            for k, v in self._forward(model, self.teacher, masked, attn, labels).items():
                sums[k] += float(v) * len(ids)
            n += len(ids)
        to_dev = [(i.to(self.device), a.to(self.device)) for i, a in batches]
        n_agree = n if n >= 3 else 0  # a correlation needs a few sentences on this rank
        agree = agreement(embed(self.teacher, to_dev), embed(model, to_dev)) if n_agree else 0.0
        model.train()
        vec = torch.tensor([n, n_agree, agree * n_agree] + [sums[k] for k in sorted(sums)], dtype=torch.float64, device=self.device)
        dist.all_reduce(vec)
        out = {f"eval/{k}": float(v / vec[0]) for k, v in zip(sorted(sums), vec[3:].tolist())}
        out["eval/agreement"] = float(vec[2] / vec[1]) if vec[1] > 0 else float("nan")
        return out

    # -- the loop ------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        self.maybe_resume()
        self.engine.module.train()
        if self.step == 0:
            start_metrics = self.evaluate()  # the untrained student: what the summary compares with
            self.metrics.write({"step": self.step, **start_metrics})
        else:  # resumed: the step-0 figures are in the run's history; evaluating again only delays the first step
            start_metrics = self.metrics.first_eval()
        bar = self._progress_bar()
        started, first_step, first_tokens = time.perf_counter(), self.step, self.tokens
        window_t, window_tokens, window, window_steps = time.perf_counter(), self.tokens, {}, 0
        end_metrics: dict[str, float] = {}
        while self.step < t.max_steps and not self.stop_requested:
            for k, v in self.train_step().items():
                window[k] = window.get(k, 0.0) + v
            window_steps += 1
            self.stop_requested, drained = self._any_rank(self.stop_requested, preempt.requested())
            if (drained or self.store.preemption_notice()) and not self._preemption_saved:
                self.save_checkpoint(wait=True)  # just in time, with the step in flight finished, uploaded
                self._preemption_saved = True
                if drained:  # a pod's preStop hook: see distil/preempt.py
                    preempt.wait_out(self.step, self.log if self.rank == 0 else None)
                    self._preemption_saved = False  # a cancelled drain: training went on
            if bar is not None:
                bar.update(1)
            last = self.step == t.max_steps
            if self.step % t.log_every == 0 or last or self.stop_requested:
                self._sync_tokens()
                vec = torch.stack([window[k] for k in sorted(window)])
                dist.all_reduce(vec)
                elapsed = time.perf_counter() - window_t
                row = {"step": self.step, **{f"train/{k}": float(v) / self.world / window_steps for k, v in zip(sorted(window), vec)},
                       "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                       "tokens": self.tokens, "tokens_per_s": (self.tokens - window_tokens) / elapsed,
                       "eta_s": (t.max_steps - self.step) * elapsed / window_steps}
                if self.engine.fp16_enabled():
                    row["loss_scale"] = float(self.engine.optimizer.loss_scale)
                self.metrics.write(row)
                self.last_loss = row["train/loss"]
                if bar is not None:
                    bar.set_postfix(loss=f"{row['train/loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
                window_t, window_tokens, window, window_steps = time.perf_counter(), self.tokens, {}, 0
            # The last step's held-out figures come before its checkpoint, which keeps them (its
            # metrics.jsonl: the exported model's card shows them). A preempted pod has seconds
            # left: it only checkpoints.
            if (t.eval_every and self.step % t.eval_every == 0 or last) and not self.stop_requested:
                end_metrics = self.evaluate()
                self.metrics.write({"step": self.step, **end_metrics})
            if self.step % cfg.checkpoint.every_steps == 0 or last or self.stop_requested:
                self.save_checkpoint(wait=last or self.stop_requested)
        self.batches.close()
        if bar is not None:
            bar.close()
        if self.stop_requested:
            end_metrics = {}
        self.metrics.close()
        if self.rank == 0:
            self.store.publish(self.run_dir)
        self.store.wait_uploaded()  # the history's copy, and any upload still in flight
        wall = time.perf_counter() - started
        return {"step": self.step, "tokens": self.tokens, "start": start_metrics, "end": end_metrics, "stopped": self.stop_requested,
                "wall_s": wall, "steps_run": self.step - first_step, "tokens_per_s": (self.tokens - first_tokens) / wall}

    def _progress_bar(self):
        if not self.show_bar:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.train.max_steps, initial=self.step, desc="distil", unit="step", dynamic_ncols=True)

    def _any_rank(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag true when it is on any rank: ranks stop and checkpoint at the same step."""
        if self.world == 1:
            return flags
        vec = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(vec, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in vec.tolist())

    def request_stop(self, *_):
        """SIGTERM (a preemption notice): finish the current step, checkpoint, and return."""
        self.stop_requested = True

    def install_signal_handler(self) -> None:
        """Only the main thread may set handlers; Ray Train runs the loop in another thread and
        announces preemption through its own API instead (see RayCheckpointStore)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_stop)
