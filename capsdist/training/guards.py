"""Training guards: stop on non-finite gradients, losses or weights without a host sync per step; the skip count;
the startup warning for bf16 on a CPU that emulates it (``warn_emulated_bf16``, at the end of this module).

``NonFiniteGuard`` works on the device and reads the result on the host only where the host reads anyway: on
logging steps (Lightning turns the logged metrics into numbers there) and before any checkpoint is written.
- Every step, in ``on_before_optimizer_step`` (after backward and the DDP all-reduce, before the weights change),
  one fused kernel per device and dtype (GradScaler's ``_amp_foreach_non_finite_check_and_unscale_``) sets a
  ``found_inf`` flag on the device, one all-reduce makes all ranks agree, and the fused Adam skips its update
  when the flag is set (the GradScaler mechanism): a bad step never reaches the weights. The loss is checked
  on the device in ``on_train_batch_end``. Bad steps are counted there, on the device.
- At a check (logging step, ``on_save_checkpoint``, end of training) one read brings the counts and whether
  every weight is finite to the host. Finite gradients can still overflow the weights (Adam's first step with lr
  1e38 is inf): then the weights of the last good check are put back (the one extra copy of the weights this
  guard keeps, refreshed at each check) and the run stops. A checkpoint is never written before its check
  passed, so no checkpoint, not even the one written on the exception, holds non-finite weights.
``max_skips=N`` drops up to N bad steps (gradients or loss) before stopping; the count is compared at each check,
so a run stops at the first check after the (N+1)-th bad step. Configure it as a trainer callback:
``--trainer.callbacks+=capsdist.training.guards.NonFiniteGuard --trainer.callbacks.max_skips=3``. An optimizer that
cannot skip on the device (not fused) gets the host read per step instead (its gradients set to None).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.rank_zero import rank_zero_warn

from capsdist.compat.lightning import is_logging_step
from capsdist.core.errors import CapsdistError


class NonFiniteError(CapsdistError):
    """A NaN or infinite loss, gradient or weight: the run stops with finite weights."""


def _grads_by_group(module: torch.nn.Module) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    """The module's gradients grouped by device and dtype (what the fused check takes)."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in module.parameters():
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    return groups


def _all_reduce_max(flag: torch.Tensor) -> None:
    """All ranks agree on the flag: one device-side all-reduce, no host read; nothing without a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)


class NonFiniteGuard(Callback):
    """Stop on non-finite gradients, losses or weights with finite weights (module docstring), or skip up to
    ``max_skips`` bad steps."""

    def __init__(self, max_skips: int = 0) -> None:
        """``max_skips``: bad steps to drop (optimizer step skipped) before stopping; 0 stops at the first."""
        if max_skips < 0:
            raise CapsdistError(f"NonFiniteGuard max_skips={max_skips}: must be >= 0.")
        self.max_skips, self.skipped, self.stopped = max_skips, 0, False
        self.restore: list[torch.Tensor] = []  # the weights at the last check that passed
        self.checked_step = 0  # global step of that check
        self.counts: torch.Tensor | None = None  # on the device: bad-gradient steps, bad-loss steps, first bad step
        self.found_inf: torch.Tensor | None = None  # this step's gradient flag, handed to the fused optimizer

    def _counts(self, device: torch.device) -> torch.Tensor:
        """The device-side counters (made on first use, on the module's device)."""
        if self.counts is None or self.counts.device != device:
            self.counts = torch.tensor([0.0, 0.0, -1.0], device=device)
            self.found_inf, self.one = torch.zeros((), device=device), torch.ones((), device=device)
        return self.counts

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The first restore point: the weights training starts from."""
        self._keep(trainer, pl_module)

    def _keep(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Copy the weights into the restore point (allocated once)."""
        params = list(pl_module.parameters())
        with torch.no_grad():
            if len(self.restore) != len(params):
                self.restore = [p.detach().clone() for p in params]
            else:
                torch._foreach_copy_(self.restore, [p.detach() for p in params])
        self.checked_step = trainer.global_step

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Flag non-finite gradients on the device (all ranks agree) and let the fused optimizer skip the step."""
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16's GradScaler skips inf steps itself and lowers its scale; the loss check still applies
        groups = _grads_by_group(pl_module)
        if not groups:
            return
        device = next(iter(groups))[0]
        self._counts(device)
        found_inf = self.found_inf
        found_inf.zero_()
        for (group_device, _), grads in groups.items():  # one kernel per device and dtype
            if group_device == device:
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, self.one)
            else:  # a model spread over devices
                flag = torch.zeros((), device=group_device)
                torch._amp_foreach_non_finite_check_and_unscale_(grads, flag, self.one.to(group_device))
                torch.maximum(found_inf, flag.to(device), out=found_inf)
        _all_reduce_max(found_inf)
        inner = getattr(optimizer, "_optimizer", optimizer)
        if getattr(inner, "_step_supports_amp_scaling", False):
            inner.found_inf = found_inf  # read by the fused kernel: no update, no step count when set
            return
        if bool(found_inf):  # an optimizer that cannot skip on the device: read the flag now
            self.skipped += 1
            if self.skipped > self.max_skips:
                self._stop(trainer, pl_module, f"gradient at step {trainer.global_step}", restore=False)
            optimizer.zero_grad(set_to_none=True)  # Adam leaves parameters without gradients untouched
            found_inf.zero_()  # counted here already

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Count this step on the device (bad gradient, else bad loss); check on logging steps."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):  # also under fp16's GradScaler, where no gradient flag is set
            counts = self._counts(loss.device)
            grad_bad = self.found_inf
            loss_bad = (~torch.isfinite(loss.detach()).all()).float() * (1 - grad_bad)
            first = torch.where((counts[2] < 0) & (grad_bad + loss_bad > 0), float(trainer.global_step), counts[2])
            counts += torch.stack([grad_bad, loss_bad, first - counts[2]])
            grad_bad.zero_()
        if is_logging_step(trainer):
            self.check(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """No checkpoint of a fit without a passed check (it raises before the file is written)."""
        if trainer.state.fn == TrainerFn.FITTING:
            self.check(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The last steps are checked too."""
        self.check(trainer, pl_module)

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One host read (and one all-reduce): stop on non-finite weights, putting back the last good ones, or on
        more bad steps than ``max_skips``; else the weights become the new restore point."""
        if self.stopped or self.counts is None:
            return
        weights_bad = torch.stack([(~torch.isfinite(p)).any() for p in pl_module.parameters()]).any()
        state = torch.cat([self.counts[:2], weights_bad.to(self.counts).view(1)])
        grads, losses, weights = trainer.strategy.reduce(state, reduce_op="max").tolist()
        if weights:
            since = trainer.global_step - self.checked_step
            where = "at step" if since <= 1 else f"between step {self.checked_step + 1} and step"
            self._stop(trainer, pl_module, f"weights after the optimizer step {where} {trainer.global_step}")
        if grads + losses > self.max_skips:
            kind = "loss" if not grads else "gradient" if not losses else "gradient or loss"
            allowed = f" ({int(grads + losses)} bad steps, {self.max_skips} allowed)" if self.max_skips else ""
            self._stop(trainer, pl_module, f"{kind} at step {int(self.counts[2])}{allowed}", restore=False)
        self._keep(trainer, pl_module)

    def _stop(self, trainer: pl.Trainer, pl_module: pl.LightningModule, what: str, restore: bool = True) -> None:
        """Put back the weights of the last passed check, then raise the one-paragraph error (step, likely cause)."""
        self.stopped = True
        params = list(pl_module.parameters())
        kept = "the weights of the last finite check"
        if restore and len(self.restore) == len(params):
            with torch.no_grad():
                torch._foreach_copy_([p.detach() for p in params], self.restore)
            kept = f"the weights of step {self.checked_step} (the last check that found them finite)"
        elif not restore:
            kept = "the bad steps skipped (the weights are finite)"
        lr = f"{trainer.optimizers[0].param_groups[0]['lr']:.3g}" if trainer.optimizers else "unknown"
        raise NonFiniteError(
            f"non-finite {what} (epoch {trainer.current_epoch}); training stopped with {kept}, so every checkpoint "
            f"holds finite weights. Likely cause: a learning rate too high for this model (lr now {lr}), or low "
            f"precision ({trainer.precision}) overflowing. Fix: lower --model.lr, train with --trainer.precision 32, "
            "or resume from the last checkpoint with --trainer.callbacks+=capsdist.training.guards.NonFiniteGuard "
            "--trainer.callbacks.max_skips N to drop rare bad steps."
        )


class DataSkips(Callback):
    """Logs ``data/skipped``: corrupt samples skipped so far, summed over loader workers and ranks."""

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log this rank's count, summed over ranks by Lightning, on logging steps and at the end of an epoch or fit
        (a sum over ranks is a collective: not on every step)."""
        last = trainer.is_last_batch or trainer.global_step >= trainer.max_steps > 0
        if not (is_logging_step(trainer) or last):
            return
        count = getattr(trainer.datamodule, "skipped", lambda: 0)()
        pl_module.log("data/skipped", float(count), reduce_fx="sum", sync_dist=True, on_step=True, on_epoch=False)


def fault_callbacks(configured: list[Callback]) -> list[Callback]:
    """The guards a run gets: the default NonFiniteGuard unless one is configured, and the skip count."""
    own = [] if any(isinstance(c, NonFiniteGuard) for c in configured) else [NonFiniteGuard()]
    return [*own, DataSkips()]


# CPU features that do bf16 arithmetic in hardware: x86 AVX512-BF16 (Cooper Lake, Zen 4 and later) and AMX (Sapphire
# Rapids and later) in /proc/cpuinfo's "flags", Arm's BF16 in its "Features".
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
# AVX-512 "core" (Skylake-SP and later, Zen 4): without bf16 hardware oneDNN emulates bf16 with it, at a modest cost.
AVX512_CORE_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})
# What the emulation costs (issue 29): the paper's model in bf16-mixed against fp32 on 2 cores.
EMULATED_BF16 = {
    "avx512": "emulated with AVX-512: no faster than fp32 and less precise (0.9-1.6x the fp32 step time for the "
    "paper's MultiMNIST model on a 2-core Intel Ice Lake)",
    "none": "emulated without AVX-512: about 30x slower than fp32 (the paper's model: 2.9 vs 84 images/s on an AMD "
    "Zen 3)",
}


def cpu_bf16(cpuinfo: str) -> str | None:
    """How a CPU does bf16 arithmetic, from /proc/cpuinfo text (its first flags or Features line): "native"
    (NATIVE_BF16_FLAGS), "avx512" (emulated with AVX-512 core), "none" (emulated without), None without the line."""
    for line in cpuinfo.splitlines():
        key, _, words = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(words.split())
            return "native" if NATIVE_BF16_FLAGS & flags else "avx512" if flags >= AVX512_CORE_FLAGS else "none"
    return None


def host_cpu_bf16() -> str | None:
    """``cpu_bf16`` of this host; None where /proc/cpuinfo cannot be read (not Linux)."""
    try:
        return cpu_bf16(Path("/proc/cpuinfo").read_text())
    except OSError:
        return None


def warn_emulated_bf16(trainer: pl.Trainer) -> None:
    """At startup, on rank 0: say that a bf16 precision on a CPU without bf16 hardware is emulated, what that costs,
    and how to switch."""
    precision = str(trainer.precision)
    if trainer.strategy.root_device.type != "cpu" or not precision.startswith("bf16"):
        return
    cost = EMULATED_BF16.get(host_cpu_bf16() or "native")
    if cost:
        rank_zero_warn(
            f"capsdist: --trainer.precision {precision} on a CPU without bf16 hardware (no avx512_bf16 or amx_bf16 "
            f"among /proc/cpuinfo's flags): bf16 is {cost}. Fix: train with --trainer.precision 32-true."
        )
