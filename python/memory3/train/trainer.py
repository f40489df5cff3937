"""The training loop (nanoGPT order): schedule, micro-steps with accumulation, backward,
clip, step, log, checkpoint. One loop for every recipe; the `Task` decides what a batch is.

    trainer = Trainer(model, make_task, TrainConfig.recipe_defaults("single-stage", steps=500), "runs/a")
    summary = trainer.fit()          # resumes from runs/a/step_* when present

Loss: cross-entropy summed over the target tokens of every micro-batch of every rank,
divided by their global count, so a DDP run of W ranks with batch B each computes the same
loss and gradient as one process with batch W*B. Memories are encoded by the model being
trained, inside the forward pass, so gradients reach the encoding too.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from memory3.memory.encoder import encode_references
from memory3.model import Memories, Memory3Model
from memory3.train import binding
from memory3.train.checkpoint import latest_checkpoint, read_checkpoint, save_checkpoint
from memory3.train.config import TrainConfig
from memory3.train.distributed import DistInfo, all_reduce_sum, barrier
from memory3.train.schedule import lr_at
from memory3.train.tasks import IGNORE, Batch, Task

TaskFactory = Callable[[int, int, int], Task]
"""(rank, world_size, micro_batch) -> the task that makes this rank's batches."""


class LossModel(nn.Module):
    """Summed next-token cross-entropy of a batch; what DDP wraps (encoding included).
    Logits are computed only where a target is (answer-only loss: ~1 position in 13 on the
    synthetic task, and the output projection and softmax were ~40% of a step).

    With ``bind_layers`` and a batch that knows its right memory (``right``), the returned
    objective adds ``bind_weight`` x the binding supervision's -log share summed over the
    answer positions (`memory3.train.binding`); ``stats`` then holds the parts, detached:
    ``ce``, ``bind`` (the -log share sum) and ``share`` (the share summed over positions,
    mean over layers and heads), with ``positions`` their count."""

    def __init__(self, model: Memory3Model, bind_layers: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.model = model
        self.bind_layers = tuple(bind_layers)
        self.stats: dict = {}

    def forward(self, tokens, targets, refs=None, ref_lens=None, mem_ids=None, right=None,
                bind_weight: float = 0.0) -> torch.Tensor:
        memories = memory = None
        if refs is not None:
            memory = encode_references(self.model, refs, ref_lens)
            memories = Memories.from_stacked(memory, mem_ids)
        where = targets != IGNORE
        supervise = bool(self.bind_layers) and memory is not None and right is not None
        with binding.capture_queries(self.model, self.bind_layers if supervise else ()) as queries:
            logits = self.model(tokens, memories, logits_where=where)  # [K, V] at the target positions
        loss = F.cross_entropy(logits.float(), targets[where], reduction="sum")
        self.stats = {"ce": loss.detach()}
        if not supervise:
            return loss
        log_share = binding.answer_log_shares(self.model, queries, where, memory, mem_ids, right, self.bind_layers)
        aux = -log_share.mean(dim=(1, 2)).sum()
        self.stats.update(bind=aux.detach(), share=log_share.detach().exp().mean(dim=(1, 2)).sum(),
                          positions=log_share.shape[0])
        return loss + bind_weight * aux if bind_weight else loss


def make_optimizer(model: nn.Module, config: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (embeddings included), none on norm weights."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused or None)


class Trainer:
    def __init__(self, model: Memory3Model, make_task: TaskFactory, config: TrainConfig, out_dir: str | Path, *,
                 dist: DistInfo = DistInfo(), resume: bool = True, progress: bool = True,
                 on_checkpoint: Callable[[int], dict] | None = None) -> None:
        self.config, self.dist, self.out_dir = config, dist, Path(out_dir)
        self.model = model.to(dist.device)
        self.micro_batch, self.accum = config.layout(dist.world_size)
        self.task = make_task(dist.rank, dist.world_size, self.micro_batch)
        self.bind_layers: tuple[int, ...] = ()
        if config.bind_supervision > 0:
            self.bind_layers = binding.check_layers(
                model.config, binding.default_layers(model.config) if config.bind_layers is None else config.bind_layers)
        loss_model = self.inner_loss = LossModel(self.model, self.bind_layers)
        self.fsdp = dist.enabled and config.parallel == "fsdp"
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard
            # One unit: the encoder runs the memory layers' submodules outside Block calls,
            # so per-block units would never be gathered for it.
            fully_shard(loss_model)
        elif dist.enabled:
            loss_model = nn.parallel.DistributedDataParallel(
                loss_model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
        self.loss_model = loss_model
        self.optimizer = make_optimizer(self.model, config, fused=dist.device.type == "cuda")
        use_bf16 = config.precision == "bf16" or (config.precision == "auto" and dist.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(dist.device.type, dtype=torch.bfloat16)) if use_bf16 \
            else contextlib.nullcontext
        self.progress, self.on_checkpoint = progress, on_checkpoint
        self.step, self.history = 0, []
        found = latest_checkpoint(self.out_dir) if resume else None
        if found is not None:
            self.load(found)

    # ------------------------------------------------------------------ one optimizer step

    def train_step(self, step: int) -> dict:
        c = self.config
        lr = lr_at(step, peak=c.lr, total=c.steps, warmup=c.warmup_steps, kind=c.schedule,
                   decay_frac=c.decay_frac, min_ratio=c.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = [self.task.batch(step, m).to(self.dist.device) for m in range(self.accum)]
        counts = torch.tensor([float(sum(b.n_targets for b in batches)),
                               float(sum(int((b.tokens != self.model.config.pad_id).sum()) for b in batches))])
        counts = all_reduce_sum(counts, self.dist)
        n_targets, n_tokens = max(1.0, counts[0].item()), counts[1].item()
        bind_weight = c.bind_supervision if step < c.bind_until * c.steps else 0.0
        total = torch.zeros((), device=self.dist.device)
        bind = torch.zeros(3, device=self.dist.device)  # -log share sum, share sum, positions
        for m, b in enumerate(batches):
            last = m == self.accum - 1
            sync = contextlib.nullcontext()
            if self.fsdp:
                self.loss_model.set_requires_gradient_sync(last)
            elif self.dist.enabled and not last:
                sync = self.loss_model.no_sync()
            with sync:
                with self.autocast():
                    objective = self.loss_model(b.tokens, b.targets, b.refs, b.ref_lens, b.mem_ids, b.right,
                                                bind_weight)
                # DDP averages gradients over ranks: scale so the result is sum / global count.
                (objective * (self.dist.world_size / n_targets)).backward()
            stats = self.inner_loss.stats
            total += stats["ce"].float()
            if "bind" in stats:
                bind += torch.stack([stats["bind"].float(), stats["share"].float(),
                                     torch.tensor(float(stats["positions"]), device=bind.device)])
        loss = all_reduce_sum(total, self.dist).item() / n_targets
        grad_norm = float("nan")
        if c.clip > 0:
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), c.clip)
            grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        memory = batches[0].refs is not None
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens,
                  "targets": n_targets, "memory": memory}
        if self.bind_layers:
            bind = all_reduce_sum(bind, self.dist).tolist()
            if bind[2]:  # a memory step: the supervision's loss and the right memory's attention share
                record.update(bind_loss=bind[0] / bind[2], right_share=bind[1] / bind[2], bind_weight=bind_weight)
        if hasattr(self.task, "skipped_leaks"):  # continual stage: references the 0.9 filter dropped so far
            record["skipped_leaks"] = self.task.skipped_leaks
        return record

    # ------------------------------------------------------------------ the loop

    def fit(self, stop_at: int | None = None) -> dict:
        """Train up to ``config.steps`` (or stop early at ``stop_at``, checkpointing there, as
        a preempted job would); return steps, final loss, steps/s and tokens/s."""
        c = self.config
        end = c.steps if stop_at is None else min(stop_at, c.steps)
        bar = tqdm(total=c.steps, initial=self.step, desc=c.recipe, disable=not (self.progress and self.dist.is_main))
        t0, tokens, start = time.perf_counter(), 0.0, self.step
        while self.step < end:
            record = self.train_step(self.step)
            self.step += 1
            tokens += record["tokens"]
            elapsed = time.perf_counter() - t0
            record["tokens_per_s"] = tokens / elapsed
            self.history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens_per_s']:.0f}")
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"loss is {record['loss']} at step {record['step']}: lower the lr "
                                         f"or resume from an earlier checkpoint")
            if (c.checkpoint_every and self.step % c.checkpoint_every == 0) or self.step == end:
                self.save()
        bar.close()
        elapsed = time.perf_counter() - t0
        steps = self.step - start
        return {"steps": self.step, "final_loss": self.history[-1]["loss"] if self.history else None,
                "seconds": elapsed, "steps_per_s": steps / elapsed if steps else 0.0,
                "tokens_per_s": tokens / elapsed if steps else 0.0, "out_dir": str(self.out_dir)}

    def _param_names(self) -> list[str]:
        """Names (in self.model) of the optimizer's parameters, in torch's numbering."""
        name_of = {id(p): n for n, p in self.model.named_parameters()}
        return [name_of[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    def full_state(self) -> tuple[dict, dict]:
        """(model state, int-keyed optimizer state), unsharded, on the CPU (every rank must
        call it under FSDP; rank 0 gets the tensors)."""
        if not self.fsdp:
            return self.model.state_dict(), self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        msd, osd = get_state_dict(self.loss_model, self.optimizer,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.dist.is_main:  # cpu_offload gathers onto rank 0 only
            return {}, {}
        index = {"model." + n: i for i, n in enumerate(self._param_names())}
        groups = [{**g, "params": [index[f] for f in g["params"]]} for g in osd["param_groups"]]
        return ({k.removeprefix("model."): v for k, v in msd.items()},
                {"state": {index[f]: s for f, s in osd["state"].items()}, "param_groups": groups})

    def export_model(self) -> Memory3Model | None:
        """The trained model with plain (unsharded) weights: the model itself unless FSDP
        shards it, then a copy on rank 0 (None on the other ranks; all must call)."""
        if not self.fsdp:
            return self.model
        state, _ = self.full_state()
        if not self.dist.is_main:
            return None
        model = Memory3Model(self.model.config)
        model.load_state_dict(state, strict=True)
        return model.to(self.dist.device)

    def load(self, folder: Path) -> None:
        model_state, optim_state, state = read_checkpoint(folder)
        if not self.fsdp:
            self.model.load_state_dict({k: v.to(self.dist.device) for k, v in model_state.items()}, strict=True)
            names = self._param_names()
            if len(optim_state["state"]) > len(names):
                raise ValueError(f"{folder}: optimizer state does not match this model's parameters")
            self.optimizer.load_state_dict(optim_state)
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
            fqn = ["model." + n for n in self._param_names()]
            osd = {"state": {fqn[i]: s for i, s in optim_state["state"].items()},
                   "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]} for g in optim_state["param_groups"]]}
            set_state_dict(self.loss_model, self.optimizer, model_state_dict={"model." + k: v for k, v in model_state.items()},
                           optim_state_dict=osd, options=StateDictOptions(full_state_dict=True))
        self.step, self.history = state["step"], state["history"]

    def save(self) -> None:
        """Checkpoint ``step_NNNNNN`` (rank 0 writes; all ranks wait), the loss curve, and
        drop checkpoints beyond ``keep_checkpoints``."""
        model_state, optim_state = self.full_state()
        if self.dist.is_main:
            extra = self.on_checkpoint(self.step) if self.on_checkpoint else {}
            state = {"step": self.step, "model_config": self.model.config.to_dict(),
                     "train_config": self.config.to_dict(), "history": self.history, **extra}
            save_checkpoint(self.out_dir / f"step_{self.step:06d}", model_state=model_state,
                            optim_state=optim_state, state=state)
            for old in sorted(self.out_dir.glob("step_*"))[:-self.config.keep_checkpoints]:
                if old.is_dir() and not old.name.endswith(".tmp"):
                    shutil.rmtree(old)
            (self.out_dir / "history.json").write_text(json.dumps(self.history) + "\n")
            plot_loss_curve(self.history, self.out_dir / "loss_curve.png", title=self.config.recipe)
        barrier(self.dist)


def plot_loss_curve(history: list[dict], path: str | Path, title: str = "") -> None:
    """Training loss per step (memory and no-memory steps apart when both occur), log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for memory, label, color in ((True, "steps with memory", "tab:blue"), (False, "steps without memory", "tab:orange")):
        pts = [(h["step"], h["loss"]) for h in history if h.get("memory", False) == memory]
        if pts:
            ax.plot(*zip(*pts), ".", ms=2, alpha=0.35, color=color, label=label)
            window = max(1, len(pts) // 50)
            smooth = [sum(l for _, l in pts[max(0, i - window + 1):i + 1]) / len(pts[max(0, i - window + 1):i + 1])
                      for i in range(len(pts))]
            ax.plot([s for s, _ in pts], smooth, color=color, lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if history:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
