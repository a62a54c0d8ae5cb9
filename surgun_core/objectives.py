"""Training objectives: how a clean sample is noised and what the model must predict.

Each objective is the model family's own training loss l(x0, c) of DESIGN.md section 1:
  epsilon       x_t = sqrt(a) x0 + sqrt(1-a) eps,   target eps            (SD1.5, SDXL, toy world)
  v_prediction  x_t as above,                       target sqrt(a) eps - sqrt(1-a) x0   (SD2.x-v)
  flow          x_t = (1-s) x0 + s eps,             target eps - x0       (SANA, SD3, Flux)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like).view(-1, *([1] * (like.dim() - 1)))


@dataclass
class DiffusionObjective:
    """eps- or v-prediction over a discrete DDPM schedule."""

    alphas_cumprod: torch.Tensor  # (T,)
    prediction_type: str = "epsilon"

    def sample_t(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.alphas_cumprod.shape[0], (n,), generator=generator)

    def noisy(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = _bcast(self.alphas_cumprod[t.cpu()], x0)  # the schedule lives on the CPU; t may be on the GPU
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return eps
        a = _bcast(self.alphas_cumprod[t.cpu()], x0)
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def t_grid(self, n: int, lo: float = 0.1, hi: float = 0.8) -> torch.Tensor:
        """n fixed timesteps spread over the quantiles lo..hi of the schedule (the diffusion classifier's)."""
        T = self.alphas_cumprod.shape[0]
        return (torch.linspace(lo, hi, n) * (T - 1)).round().long()


@dataclass
class FlowObjective:
    """Rectified flow: t is sigma in (0, 1); the network sees sigma * num_train_timesteps."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    prediction_type: str = "flow"

    def sample_t(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        s = torch.rand(n, generator=generator).clamp(1e-3, 1 - 1e-3)
        return self.shift * s / (1 + (self.shift - 1) * s)

    def noisy(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = _bcast(t, x0)
        return (1 - s) * x0 + s * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return eps - x0

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.num_train_timesteps

    def t_grid(self, n: int, lo: float = 0.1, hi: float = 0.8) -> torch.Tensor:
        s = torch.linspace(lo, hi, n)
        return self.shift * s / (1 + (self.shift - 1) * s)


Objective = DiffusionObjective | FlowObjective
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


def objective_from_scheduler(scheduler_config: dict, prediction_type: str | None = None) -> Objective:
    """Build the objective a scheduler config describes (DDPM/DDIM-like or FlowMatch*)."""
    cls = str(scheduler_config.get("_class_name", ""))
    # FlowMatch* schedulers are flow by class; SANA's DPMSolverMultistepScheduler says so with
    # prediction_type "flow_prediction" (and use_flow_sigmas, flow_shift).
    flow = "FlowMatch" in cls or scheduler_config.get("use_flow_sigmas") is True
    ptype = prediction_type or ("flow" if flow else scheduler_config.get("prediction_type", "epsilon"))
    ptype = "flow" if ptype == "flow_prediction" else ptype
    if ptype not in PREDICTION_TYPES:
        raise ConfigError("prediction_type", f"unknown {ptype!r}; choose one of {', '.join(PREDICTION_TYPES)}")
    if ptype == "flow":
        shift = scheduler_config.get("shift") if "FlowMatch" in cls else scheduler_config.get("flow_shift")
        return FlowObjective(
            num_train_timesteps=int(scheduler_config.get("num_train_timesteps", 1000)),
            shift=float(shift if shift is not None else 1.0),
        )
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")
    sched = DDPMScheduler(**{k: scheduler_config[k] for k in keys if k in scheduler_config})
    return DiffusionObjective(sched.alphas_cumprod.float(), ptype)
