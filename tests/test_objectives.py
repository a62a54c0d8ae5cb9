"""Training objectives on hand-computed cases, and reading them from scheduler configs."""

from __future__ import annotations

import pytest
import torch

from surgun_core.errors import ConfigError
from surgun_core.objectives import DiffusionObjective, FlowObjective, objective_from_scheduler

X0 = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
EPS = torch.tensor([[3.0, -1.0], [3.0, -1.0]])
ALPHAS = torch.tensor([0.64, 0.36])  # sqrt: 0.8 / 0.6, sqrt(1 - a): 0.6 / 0.8
T = torch.tensor([0, 1])


def test_epsilon_objective():
    obj = DiffusionObjective(ALPHAS, "epsilon")
    # x_t = sqrt(a) x0 + sqrt(1-a) eps
    torch.testing.assert_close(obj.noisy(X0, EPS, T), torch.tensor([[2.6, 1.0], [3.0, 0.4]]))
    assert torch.equal(obj.target(X0, EPS, T), EPS)
    assert torch.equal(obj.model_time(T), T)


def test_v_objective():
    obj = DiffusionObjective(ALPHAS, "v_prediction")
    # v = sqrt(a) eps - sqrt(1-a) x0: row 0 = 0.8 eps - 0.6 x0, row 1 = 0.6 eps - 0.8 x0
    torch.testing.assert_close(obj.target(X0, EPS, T), torch.tensor([[1.8, -2.0], [1.0, -2.2]]))
    torch.testing.assert_close(obj.noisy(X0, EPS, T), torch.tensor([[2.6, 1.0], [3.0, 0.4]]))


def test_flow_objective():
    obj = FlowObjective(num_train_timesteps=1000)
    t = torch.tensor([0.25, 0.5])
    # x_t = (1 - s) x0 + s eps; target eps - x0; the network sees s * 1000
    torch.testing.assert_close(obj.noisy(X0, EPS, t), torch.tensor([[1.5, 1.25], [2.0, 0.5]]))
    torch.testing.assert_close(obj.target(X0, EPS, t), torch.tensor([[2.0, -3.0], [2.0, -3.0]]))
    torch.testing.assert_close(obj.model_time(t), torch.tensor([250.0, 500.0]))


def test_flow_shift_moves_time_toward_noise():
    plain = FlowObjective(shift=1.0).sample_t(64, torch.Generator().manual_seed(0))
    shifted = FlowObjective(shift=3.0).sample_t(64, torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted, 3 * plain / (1 + 2 * plain))
    assert ((shifted > 0) & (shifted < 1)).all()


def _config(cls_name: str, **kw) -> dict:
    import diffusers

    return {"_class_name": cls_name, **getattr(diffusers, cls_name)(**kw).config}


def test_scheduler_flow_match_is_flow():
    obj = objective_from_scheduler(_config("FlowMatchEulerDiscreteScheduler", shift=3.0))
    assert isinstance(obj, FlowObjective) and obj.shift == 3.0 and obj.num_train_timesteps == 1000


def test_scheduler_sana_dpm_solver_flow_is_flow():
    # Released SANA folders ship a DPMSolverMultistepScheduler in flow mode, not a FlowMatch* class.
    kw = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    obj = objective_from_scheduler(_config("DPMSolverMultistepScheduler", **kw))
    assert isinstance(obj, FlowObjective) and obj.shift == 3.0


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_scheduler_ddim_alphas(ptype):
    import diffusers

    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=ptype)
    obj = objective_from_scheduler(_config("DDIMScheduler", **kw))
    assert isinstance(obj, DiffusionObjective) and obj.prediction_type == ptype
    torch.testing.assert_close(obj.alphas_cumprod, diffusers.DDIMScheduler(**kw).alphas_cumprod.float())


def test_scheduler_unknown_prediction_type():
    with pytest.raises(ConfigError, match="prediction_type") as e:
        objective_from_scheduler(_config("DDIMScheduler", prediction_type="sample"))
    assert e.value.field == "prediction_type" and "'sample'" in str(e.value)
