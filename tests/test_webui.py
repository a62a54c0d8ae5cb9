"""The A1111/Forge side: the backends over shared.sd_model, the host (shared.state, models/Lora), the tab's
registration and install.py.

A1111 and Forge cannot be started here (at launch they clone repositories from the internet), so their
objects are stand-ins built from the toy model, with the interfaces the real ones have (read from A1111's
ldm/sgm wrappers and Forge's KModel/Prediction): ldm's apply_model(x_t, t, cond) returns eps at the DDPM
timestep; Forge's KModel.apply_model(x, sigma, c_crossattn) takes x0 + sigma * eps and returns the
denoised x0 (calculate_input / calculate_denoised). The backends must then reproduce the toy model's own
images, which is what ties them to the engine.
"""

import importlib.util
import runpy
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from surgun_core.backends.webui import A1111Backend, ForgeBackend, webui_backend
from surgun_core.errors import Cancelled, SurgUnError
from surgun_ui.session import EraseRequest, EraseSession

ROOT = Path(__file__).resolve().parents[1]
PROMPTS, SEEDS = ["a red circle", "a blue square"], [3, 4]


class FakeLdm(nn.Module):
    """Stands in for A1111's ldm LatentDiffusion over the toy UNet (pixel space: decode is the identity)."""

    def __init__(self, toy):
        super().__init__()
        self.toy = toy
        self.model = nn.Module()
        self.model.diffusion_model = toy.denoiser
        self.alphas_cumprod = toy.objective.alphas_cumprod
        self.parameterization = "eps"
        self.sd_checkpoint_info = types.SimpleNamespace(name_for_extra="toy-ldm")

    @torch.inference_mode()  # A1111 and Forge hand out inference tensors
    def get_learned_conditioning(self, prompts):
        return self.toy.encode(prompts)["encoder_hidden_states"]

    def apply_model(self, x, t, cond):
        return self.toy.predict(x, t, {"encoder_hidden_states": cond})

    def decode_first_stage(self, z):
        return z


class FakePrediction(nn.Module):
    """Forge's k_prediction.Prediction: sigmas of the discrete schedule, prediction_type."""

    def __init__(self, alphas):
        super().__init__()
        self.register_buffer("sigmas", ((1 - alphas) / alphas) ** 0.5)
        self.prediction_type = "epsilon"


class FakeKModel(nn.Module):
    def __init__(self, toy):
        super().__init__()
        self.toy, self.diffusion_model = toy, toy.denoiser
        self.predictor = FakePrediction(toy.objective.alphas_cumprod.float())

    def apply_model(self, x, t, c_crossattn=None, **kwargs):
        sigma = t.float().view(-1, 1, 1, 1)
        timestep = (self.predictor.sigmas.view(1, -1) - t.float().cpu().view(-1, 1)).abs().argmin(1)
        eps = self.toy.predict(x / (sigma**2 + 1) ** 0.5, timestep, {"encoder_hidden_states": c_crossattn})
        return x - eps * sigma  # calculate_denoised for EPS models


class FakeForgeModel(FakeLdm):
    def __init__(self, toy):
        super().__init__(toy)
        self.forge_objects = types.SimpleNamespace(unet=types.SimpleNamespace(model=FakeKModel(toy)))


def test_a1111_backend_draws_the_toy_models_own_images(toy_backend):
    b = webui_backend(FakeLdm(toy_backend), image_size=16, latent_ratio=1)
    assert isinstance(b, A1111Backend) and b.family == "sd1" and b.latent_shape() == (3, 16, 16)
    assert list(b.attention_linears()) == list(toy_backend.attention_linears())
    ref = toy_backend.sample(PROMPTS, SEEDS, steps=6, guidance=4.0)
    assert torch.allclose(b.sample(PROMPTS, SEEDS, steps=6, guidance=4.0), ref, atol=1e-5)


def test_forge_backend_converts_sigma_and_x0_back_to_the_engines_view(toy_backend):
    b = webui_backend(FakeForgeModel(toy_backend), image_size=16, latent_ratio=1)
    assert isinstance(b, ForgeBackend)
    ref = toy_backend.sample(PROMPTS, SEEDS, steps=6, guidance=4.0)
    # float32 round trip through x0 + sigma * eps at sigma up to ~1e2: small, not bit-exact
    assert (b.sample(PROMPTS, SEEDS, steps=6, guidance=4.0) - ref).abs().max() < 2e-2
    x0 = toy_backend.sample(PROMPTS, SEEDS, steps=4, guidance=4.0)
    noise, t = torch.randn_like(x0), torch.tensor([100, 700])
    cond = b.encode(PROMPTS)
    ours = b.loss(x0, cond, noise, t)
    theirs = toy_backend.loss(x0, toy_backend.encode(PROMPTS), noise, t)
    assert torch.allclose(ours, theirs, rtol=1e-3, atol=1e-5)


def test_forge_flow_models_are_refused_with_a_reason(toy_backend):
    m = FakeForgeModel(toy_backend)
    m.forge_objects.unet.model.predictor.__class__ = type("PredictionFlux", (FakePrediction,), {})
    with pytest.raises(SurgUnError, match="flow models"):
        webui_backend(m)


class FakeState:
    """A1111's shared.state: begin/end, job, sampling_step(s), interrupted."""

    def __init__(self):
        self.log, self.interrupted, self.job, self.steps_seen = [], False, "", []
        self.sampling_step = self.sampling_steps = self.job_count = 0

    def __setattr__(self, name, value):
        if name == "sampling_step" and "steps_seen" in self.__dict__:
            self.steps_seen.append(value)
        super().__setattr__(name, value)

    def begin(self, job="(unknown)"):
        self.log.append(("begin", job))
        self.interrupted = False

    def end(self):
        self.log.append(("end",))


def _host(toy, tmp_path, forge=False):
    from surgun_ui.webui import WebuiHost

    model = (FakeForgeModel if forge else FakeLdm)(toy)
    shared = types.SimpleNamespace(sd_model=model, state=FakeState(), cmd_opts=types.SimpleNamespace(lora_dir=None))
    host = WebuiHost(shared, types.SimpleNamespace(models_path=str(tmp_path / "models")))
    host._backend = (id(model), webui_backend(model, image_size=16, latent_ratio=1))  # toy-sized
    return host, shared


@pytest.mark.parametrize("forge", [False, True], ids=["a1111", "forge"])
def test_tab_session_on_the_webui_host(toy_backend, tmp_path, forge):
    host, shared = _host(toy_backend, tmp_path, forge)
    out = EraseSession(host).erase(EraseRequest("circle", distractors="square, ring", steps=6,
                                                blocks="cross-attn-kv", calibrate=False))  # fmt: skip
    assert out.lora_path == tmp_path / "models" / "Lora" / "surgun-circle.safetensors" and out.lora_path.is_file()
    assert shared.state.log == [("begin", "surgun"), ("end",)]
    assert shared.state.sampling_steps >= 1 and 6 in shared.state.steps_seen  # training progress reached shared.state
    from safetensors import safe_open

    with safe_open(str(out.lora_path), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert host.name == "toy-ldm"


def test_the_webuis_interrupt_button_stops_training(toy_backend, tmp_path):
    host, shared = _host(toy_backend, tmp_path)

    def progress(phase, done, total, stats):
        if phase == "train" and done == 2:
            shared.state.interrupted = True  # what A1111's Interrupt button sets

    with pytest.raises(Cancelled):
        EraseSession(host).erase(EraseRequest("circle", steps=100, blocks="cross-attn-kv", calibrate=False), progress)
    assert not (tmp_path / "models" / "Lora" / "surgun-circle.safetensors").exists()
    assert shared.state.log[-1] == ("end",)


def test_no_checkpoint_loaded_is_a_clear_error(toy_backend, tmp_path):
    host, shared = _host(toy_backend, tmp_path)
    shared.sd_model, host._backend = None, None
    with pytest.raises(SurgUnError, match="no checkpoint is loaded"):
        host.backend()


def test_tab_registers_through_script_callbacks(monkeypatch, toy_backend, tmp_path):
    """scripts/surgun_tab.py against a stand-in of A1111's modules.script_callbacks (A1111 cannot run here):
    it registers one on_ui_tabs callback, which returns [(gr.Blocks, title, elem_id)] as A1111 expects."""
    gr = pytest.importorskip("gradio")
    registered = []
    modules = types.ModuleType("modules")
    modules.script_callbacks = types.SimpleNamespace(on_ui_tabs=registered.append)
    _, shared = _host(toy_backend, tmp_path)
    modules.shared, modules.paths = shared, types.SimpleNamespace(models_path=str(tmp_path / "models"))
    for name, mod in (("modules", modules), ("modules.script_callbacks", modules.script_callbacks),
                      ("modules.shared", shared), ("modules.paths", modules.paths)):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, mod)
    runpy.run_path(str(ROOT / "scripts" / "surgun_tab.py"))
    assert len(registered) == 1
    tabs = registered[0]()
    assert len(tabs) == 1 and isinstance(tabs[0][0], gr.Blocks) and tabs[0][1:] == ("SurgUn", "surgun")


def _run_install(monkeypatch, installed: set[str] | None):
    calls = []
    launch = types.SimpleNamespace(is_installed=lambda m: m in installed, run_pip=lambda a, d: calls.append(a))
    monkeypatch.setitem(sys.modules, "launch", launch if installed is not None else None)  # None: no such module
    spec = importlib.util.spec_from_file_location("surgun_install", ROOT / "install.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    return calls


def test_install_py_installs_only_what_is_missing_and_never_host_packages(monkeypatch):
    """install.py against a stand-in of A1111's launch module (its is_installed / run_pip helpers)."""
    calls = _run_install(monkeypatch, {"numpy", "PIL"})
    assert calls == ['install "safetensors>=0.4"', 'install "tqdm>=4.60"']
    assert _run_install(monkeypatch, {"numpy", "PIL", "safetensors", "tqdm"}) == []  # idempotent
    everything = _run_install(monkeypatch, set())
    assert not any(w in c for c in everything for w in ("torch", "transformers", "gradio"))
    assert _run_install(monkeypatch, None) == []  # ComfyUI-Manager runs it too: no launch module, no error


def test_the_tab_needs_no_diffusers_or_transformers(monkeypatch):
    """Inside A1111 the tab imports only the core, the webui backend and the UI: no diffusers/transformers
    (A1111 ships an old transformers, and diffusers is not there)."""
    code = ("import sys; sys.modules['diffusers'] = None; sys.modules['transformers'] = None\n"
            "import surgun_ui.session, surgun_core.backends.webui, surgun_ui.webui\n")  # fmt: skip
    import subprocess

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
