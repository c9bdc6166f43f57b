"""A generic training loop: AdamW, warmup + cosine learning rate, gradient clipping, EMA, autocast on CUDA,
DistributedDataParallel through torchrun, and checkpoints that resume bit-for-bit.

What is trained is a *task*: an object with

- ``build_model() -> nn.Module``;
- ``collate(items) -> batch``;
- ``loss(model, batch) -> (total, parts)``: the mean loss over the batch's items and its named parts (the same
  names on every call: under DDP the parts are averaged over ranks as one tensor). Each item's
  randomness must come from ``batch["seeds"]`` (one integer per item, fixed by the seed, the epoch and the item's
  dataset index), so a batch split over ranks draws what one process drawing the whole batch would;
  ``batch["step"]`` is the global step (for schedules such as progressive resolution).

``config.batch_size`` is the global batch: with W ranks each takes ``batch_size / W`` items of every global batch, and
DDP's gradient averaging then equals one process on the whole batch. A run directory holds ``checkpoint.pt``
(format ``sparseflex-train-1``: ``config`` is the training config, ``model_config`` the model's
own ``config.to_dict()`` when it has one), ``metrics.jsonl`` (one line per logged step) and ``loss.png``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import OptionError, SparseFlexError
from ..io import atomic_path, safe_torch_load, to_plain, write_atomic
from .config import FORMAT, TrainConfig


class Task(Protocol):
    def build_model(self) -> nn.Module: ...
    def collate(self, items: list) -> dict: ...
    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


# -- distributed ------------------------------------------------------------------------------------------------------
def setup_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); joins the process group torchrun describes (``WORLD_SIZE`` > 1) unless one exists:
    NCCL on CUDA, gloo on CPU."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


# -- data order -------------------------------------------------------------------------------------------------------
def item_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one item of one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of an epoch: a seeded permutation cut into full batches (a dataset smaller than one batch
    is repeated to fill it)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_items, generator=gen)
    if num_items < batch_size:
        perm = perm.repeat(math.ceil(batch_size / num_items))
    n = len(perm) // batch_size
    return perm[: n * batch_size].reshape(n, batch_size).tolist()


class _SeededItems(torch.utils.data.Dataset):
    """``dataset[(epoch, index)] -> (item seed, item)``: lets the batch sampler hand every item its seed."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        return item_seed(self.seed, epoch, index), self.dataset[index]


class _SeededCollate:
    def __init__(self, collate):
        self.collate = collate

    def __call__(self, pairs):
        batch = self.collate([item for _, item in pairs])
        batch["seeds"] = [s for s, _ in pairs]
        return batch


class _LossModule(nn.Module):
    """The model plus its task's loss, so that DDP wraps the whole forward whatever methods the loss calls."""

    def __init__(self, task: Task, model: nn.Module):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch):
        return self.task.loss(self.model, batch)


# -- EMA --------------------------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of a model's floating-point state: ``ema <- d * ema + (1 - d) * value``.

    The decay warms up, ``d = min(decay, (1 + n) / (10 + n))`` at the ``n``-th update: with a fixed 0.999 the
    initial weights would still make up ``0.999^n`` of the average (half of it after 693 steps, which kept a
    zero-initialised head at "everything inside" in a short CPU run). Its :meth:`state_dict` has the model's keys,
    so it loads straight into the model for evaluation.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def decay_at(self, n: int) -> float:
        """The decay of update number ``n`` (0-based)."""
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module, n: int) -> None:
        """The ``n``-th update (0-based; the trainer passes its step count, so a resumed run continues exactly)."""
        d = self.decay_at(n)
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.detach(), 1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at ``steps``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    t = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and kernels only (not on biases, norms or embeddings' 1-D tables)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas))


def _grad_scaler():
    """Loss scaling for float16 autocast (torch.amp.GradScaler from torch 2.3, torch.cuda.amp before)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()


# -- checkpoints ------------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """The random states of Python, numpy, torch and CUDA as tensors and plain values (see :func:`plain_rng_state`),
    so a checkpoint loads with ``weights_only=True``."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return plain_rng_state(state)


def plain_rng_state(state: dict) -> dict:
    """Python's state as ``[version, [ints], gauss_next]`` and numpy's as ``[name, keys (int64 tensor), pos,
    has_gauss, cached_gaussian]``; also converts the tuples (with a numpy array) that older checkpoints hold."""
    out = dict(state)
    version, internal, gauss = state["python"]
    out["python"] = [int(version), [int(v) for v in internal], None if gauss is None else float(gauss)]
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.clone() if isinstance(keys, torch.Tensor) else torch.from_numpy(np.asarray(keys, dtype=np.int64))
    out["numpy"] = [str(name), keys.to(torch.int64), int(pos), int(has_gauss), float(cached)]
    return out


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a training checkpoint (``weights_only``: nothing in the file runs), with one clear error line when it
    cannot be used."""
    try:
        payload = safe_torch_load(path, map_location=map_location)
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} checkpoint")
    except SparseFlexError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means the file cannot be used
        raise SparseFlexError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    return payload


# -- the loop ---------------------------------------------------------------------------------------------------------
class Trainer:
    """Trains ``task``'s model on ``dataset`` into ``run_dir`` (see the module docstring).

    With ``resume`` the run continues from ``run_dir/checkpoint.pt`` exactly where it stopped (model, optimiser,
    scheduler, EMA, data position and random states); ``config`` may then only change ``steps``.
    """

    def __init__(self, task: Task, dataset, config: TrainConfig, run_dir: str | os.PathLike,
                 device: str | torch.device | None = None, resume: bool = False, quiet: bool = False):
        self.device = torch.device(device) if device is not None else default_device()
        self.rank, self.world = setup_distributed(self.device)
        self.run_dir = Path(run_dir)
        self.ckpt_path = self.run_dir / "checkpoint.pt"
        self.log_path = self.run_dir / "metrics.jsonl"
        payload = None
        if resume:
            if not self.ckpt_path.exists():
                raise OptionError(f"--resume given but {self.ckpt_path} does not exist")
            payload = load_checkpoint(self.ckpt_path)
            steps = config.steps
            config = TrainConfig.from_dict(payload["config"])
            config.steps = steps
        self.config = config.validate()
        if config.batch_size % self.world:
            raise OptionError(f"batch size {config.batch_size} is not divisible by the {self.world} processes")
        if len(dataset) == 0:
            raise OptionError("the training dataset is empty")
        self.task, self.dataset, self.quiet = task, dataset, quiet
        torch.manual_seed(config.seed)
        self.model = task.build_model().to(self.device)
        self.optimizer = make_optimizer(self.model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, self.config))
        self.ema = EMA(self.model, config.ema_decay) if config.ema_decay > 0 else None
        self.amp_dtype = None
        if config.amp and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = _grad_scaler() if self.amp_dtype == torch.float16 else None
        self.step, self.epoch, self.position = 0, 0, 0
        if payload is not None:
            self._restore(payload)
        module = _LossModule(task, self.model)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=ids,
                                                         find_unused_parameters=config.find_unused_parameters)
        self.module = module
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._truncate_log()

    # -- state ----------------------------------------------------------------------------------------------------
    def _restore(self, payload: dict) -> None:
        try:
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
            self.scheduler.load_state_dict(payload["scheduler"])
            if self.ema is not None:
                self.ema.load_state_dict(payload["ema"])
            if self.scaler is not None and payload.get("scaler"):
                self.scaler.load_state_dict(payload["scaler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise SparseFlexError(f"checkpoint {self.ckpt_path} does not fit this model: "
                                  f"{str(exc).splitlines()[0]}") from None
        self.step, self.epoch = int(payload["step"]), int(payload["epoch"])
        self.position = int(payload["data_position"])
        states = payload["rng"]
        if len(states) != self.world:
            raise OptionError(f"checkpoint was written by {len(states)} processes; resume with the same number "
                              f"(now {self.world})")
        try:
            set_rng_state(states[self.rank])
        except (TypeError, ValueError, KeyError, RuntimeError) as exc:
            raise SparseFlexError(f"checkpoint {self.ckpt_path} holds unreadable random states "
                                  f"({type(exc).__name__}: {exc})".splitlines()[0]) from None

    def state_dict(self) -> dict:
        """The checkpoint payload (collective under DDP: every rank must call it)."""
        states = [rng_state()]
        if self.world > 1:
            states = [None] * self.world
            dist.all_gather_object(states, rng_state())
        model_config = getattr(getattr(self.model, "config", None), "to_dict", None)
        return {"format": FORMAT, "config": self.config.to_dict(),
                "model_config": model_config() if model_config is not None else None,
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "step": self.step, "epoch": self.epoch, "data_position": self.position, "rng": states}

    def save_checkpoint(self) -> None:
        """Write ``checkpoint.pt`` atomically (rank 0) and refresh the loss curve."""
        payload = to_plain(self.state_dict())
        if self.rank == 0:
            with atomic_path(self.ckpt_path) as tmp:
                torch.save(payload, tmp)
            self.plot()
        if self.world > 1:
            dist.barrier()

    # -- log ------------------------------------------------------------------------------------------------------
    def _truncate_log(self) -> None:
        """Drop log lines past the step we (re)start from: they belong to steps that will be run again."""
        if not self.log_path.exists():
            return
        keep = [line for line in self.log_path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] < self.step]
        write_atomic(self.log_path, "".join(line + "\n" for line in keep).encode())

    def history(self) -> list[dict]:
        """The metrics log as a list of records."""
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def plot(self) -> Path | None:
        from ..fit.report import loss_curve
        records = self.history()
        if not records:
            return None
        hist = [(r["step"], r.get("downsample", 1), "train", r["loss"], r["parts"]) for r in records]
        return loss_curve(hist, self.run_dir / "loss.png", title=f"sparseflex train {self.config.task}")

    # -- one step -------------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def train_step(self, batch: dict) -> tuple[float, dict[str, float], float]:
        """Forward, backward, clip, optimise, EMA; returns the (rank-averaged) loss, its parts and the grad norm."""
        self.model.train()
        batch["step"] = self.step
        with self._autocast():
            total, parts = self.module(batch)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            total.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.config.clip > 0 and params:
            grad_norm = float(nn.utils.clip_grad_norm_(params, self.config.clip))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        values = torch.stack([total.detach().float(), *[v.detach().float() for v in parts.values()]])
        if self.world > 1:
            dist.all_reduce(values)
            values /= self.world
        values = values.tolist()
        return values[0], dict(zip(parts, values[1:])), grad_norm

    # -- the whole run --------------------------------------------------------------------------------------------
    def _loader(self, batches: list[list[int]]):
        per_rank = self.config.batch_size // self.world
        mine = [[(self.epoch, i) for i in b[self.rank * per_rank:(self.rank + 1) * per_rank]] for b in batches]
        return torch.utils.data.DataLoader(_SeededItems(self.dataset, self.config.seed), batch_sampler=mine,
                                           collate_fn=_SeededCollate(self.task.collate),
                                           num_workers=self.config.num_workers)

    def run(self, until: int | None = None, seconds: float | None = None) -> nn.Module:
        """Train until ``config.steps`` (or step ``until``, or after ``seconds`` of wall time, whichever comes
        first; the schedule stays that of ``config.steps``); checkpoints every ``checkpoint_every`` steps, at the end
        and on Ctrl-C."""
        from tqdm import tqdm

        cfg = self.config
        end = min(cfg.steps, until if until is not None else cfg.steps)
        deadline = time.monotonic() + seconds if seconds is not None else math.inf
        bar = tqdm(total=cfg.steps, initial=self.step, disable=self.quiet or self.rank != 0, unit="step",
                   dynamic_ncols=True, file=sys.stderr)
        log = open(self.log_path, "a") if self.rank == 0 else None
        try:
            while self.step < end and not self._out_of_time(deadline):
                batches = epoch_batches(len(self.dataset), cfg.batch_size, cfg.seed, self.epoch)
                if self.position >= len(batches):
                    self.epoch, self.position = self.epoch + 1, 0
                    continue
                for batch in self._loader(batches[self.position:]):
                    start, lr = time.perf_counter(), self.scheduler.get_last_lr()[0]
                    loss, parts, grad_norm = self.train_step(batch)
                    if not math.isfinite(loss):
                        raise SparseFlexError(f"loss became {loss} at step {self.step}; try a lower learning rate")
                    record = {"step": self.step, "epoch": self.epoch, "lr": lr,
                              "loss": loss, "parts": parts, "grad_norm": grad_norm,
                              "downsample": cfg.downsample_at(self.step), "seconds": time.perf_counter() - start}
                    self.step += 1
                    self.position += 1
                    if log is not None and (record["step"] % cfg.log_every == 0 or self.step == end):
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                    bar.update(1)
                    bar.set_postfix_str(f"loss={loss:.4g} lr={record['lr']:.2e}")
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < end:
                        self.save_checkpoint()
                    if self.step >= end or self._out_of_time(deadline):
                        break
        except KeyboardInterrupt:
            bar.close()
            if log is not None:
                log.close()
            self.save_checkpoint()
            raise
        bar.close()
        if log is not None:
            log.close()
        self.save_checkpoint()
        return self.model

    def _out_of_time(self, deadline: float) -> bool:
        """Past the wall-time deadline (rank 0's clock decides, so every rank stops at the same step)."""
        if deadline == math.inf:
            return False
        late = torch.tensor([float(time.monotonic() >= deadline)], device=self.device)
        if self.world > 1:
            dist.broadcast(late, 0)
        return bool(late.item())

    def ema_model(self) -> nn.Module:
        """The model with the EMA weights loaded (a new module; the training model is untouched)."""
        import copy
        model = copy.deepcopy(self.model)
        if self.ema is not None:
            model.load_state_dict(self.ema.state_dict())
        return model
