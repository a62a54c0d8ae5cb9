"""Bad input and faults (issue 14, section 4): each is refused with one line on stderr that names the setting and
what to do, exit 2 (a usage error) or 1 (a failure), no traceback unless -v, and no file left behind.

Read-only mounts and full disks are real: a tmpfs in a private mount namespace (`unshare -rm`, no root needed
where user namespaces are allowed; skipped with the reason elsewhere). A read-only folder for a non-root user
is real too: as root, the check runs without the capabilities that let root write anywhere. Exit codes, -v and
Ctrl-C: test_cli_exit.py.
"""

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import threading
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from cli_helpers import ERASE, FAST, files_in, last_line, run
from PIL import Image

from surgun_core import io as surgun_io
from surgun_core.cli import build_parser
from surgun_core.commands.common import wrote
from surgun_core.commands.erase import erase_config, settings_from
from surgun_core.config import EraseConfig
from surgun_core.errors import ConfigError
from surgun_core.grid import save_png
from surgun_core.io import atomic_path, check_writable, write_json
from surgun_core.lora import LoraDelta
from surgun_core.testing import save_tiny_folder, tiny_sd1_backend
from surgun_core.toyworld.world import COLOURS

PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "SURGUN_CACHE": "", "PYTHONDONTWRITEBYTECODE": "1"}


def assert_one_line(err: str, field: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"surgun: error: {field}:"), err
    assert all(n in lines[0] for n in needles), err


@pytest.fixture
def fast_config(tmp_path):
    p = tmp_path / "fast.json"
    p.write_text(json.dumps(FAST))
    return p


def _userns() -> str | None:
    """Why a private mount namespace cannot be had here, or None when it can."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /mnt"], capture_output=True)
    return None if r.returncode == 0 else f"no private mounts here ({r.stderr.decode().strip()})"


NO_USERNS = _userns()
needs_mounts = pytest.mark.skipif(NO_USERNS is not None, reason=f"{NO_USERNS}")


def in_mount(mnt: Path, options: str, script: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `script` (sh) with a fresh tmpfs at `mnt` mounted with `options`, in a private mount namespace."""
    mnt.mkdir(exist_ok=True)
    sh = f"set -e; mount -t tmpfs -o {options} tmpfs {mnt}; {script}"
    return subprocess.run(["unshare", "-rm", "sh", "-c", sh], capture_output=True, text=True, env=ENV, timeout=timeout)


# ---- --out: checked before any work --------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["folder", "under a file"])
def test_out_that_cannot_be_a_file_is_refused_before_any_work(tmp_path, capsys, fast_config, case):
    (tmp_path / "taken.safetensors").mkdir()
    (tmp_path / "file").write_text("x")
    out = tmp_path / "taken.safetensors" if case == "folder" else tmp_path / "file" / "d.safetensors"
    before = files_in(tmp_path)
    code, _, err = run(capsys, *ERASE, "--config", fast_config, "--out", out)
    assert code == 2
    assert_one_line(err, "out", "folder")
    assert files_in(tmp_path) == before


def test_a_full_disk_stand_in_is_refused_before_any_work(tmp_path, capsys, monkeypatch, fast_config):
    # A stand-in for a full disk that runs anywhere: the probe write fails as on one (ENOSPC). The real full
    # tmpfs is test_full_disk_and_read_only_mount_are_refused_before_any_work.
    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(surgun_io.os, "write", full)
    code, _, err = run(capsys, *ERASE, "--config", fast_config, "--out", tmp_path / "new" / "d.safetensors")
    assert code == 2
    assert_one_line(err, "out", "No space left on device", "free some space")
    assert files_in(tmp_path) == ["fast.json"]  # neither the probe file nor the folder


def test_a_writable_path_is_checked_without_a_trace(tmp_path):
    assert check_writable(tmp_path / "a" / "b" / "d.safetensors") == tmp_path / "a" / "b" / "d.safetensors"
    assert check_writable(tmp_path / "out", folder=True) == tmp_path / "out"
    assert files_in(tmp_path) == []
    with pytest.raises(ConfigError, match="not a regular file"):  # os.replace would swap out the device node
        check_writable("/dev/null")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder") as e:
        check_writable(tmp_path / "f", "json", folder=True)
    assert e.value.field == "json"


def test_demo_out_is_checked_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "demo", "--out", tmp_path / "file")
    assert code == 2
    assert_one_line(err, "out", "is a file, not a folder")
    code, _, err = run(capsys, "demo", "--out", tmp_path / "o", "--json", tmp_path / "file" / "m.json")
    assert code == 2
    assert_one_line(err, "json", "is a file, not a folder")
    assert files_in(tmp_path) == ["file"]


def test_a_failed_write_removes_the_folders_it_made(tmp_path):
    with pytest.raises(RuntimeError, match="half way"), atomic_path(tmp_path / "a" / "b" / "x.json") as tmp:
        tmp.write_text("{")
        raise RuntimeError("half way")
    assert files_in(tmp_path) == []


def test_read_only_folder_for_a_non_root_user(tmp_path):
    folder = tmp_path / "theirs"
    folder.mkdir()
    target = folder / "d.safetensors"
    if os.geteuid() != 0:
        folder.chmod(0o555)
        with pytest.raises(ConfigError, match="Permission denied"):
            check_writable(target)
        return
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot drop root's right to write anywhere")
    # root without CAP_DAC_OVERRIDE is checked like any user: the folder is nobody's, mode 0755
    os.chown(folder, 65534, 65534)
    code = f"from surgun_core.io import check_writable\ncheck_writable({str(target)!r})"
    r = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", PY, "-c", code],
                       capture_output=True, text=True, env=ENV, timeout=60)  # fmt: skip
    assert r.returncode == 1 and "ConfigError: out: cannot write in" in r.stderr
    assert "Permission denied" in r.stderr and "give a folder you own" in r.stderr
    assert files_in(folder) == []


@needs_mounts
def test_full_disk_and_read_only_mount_are_refused_before_any_work(tmp_path):
    mnt = tmp_path / "m"
    check = shlex.quote(f"from surgun_core.io import check_writable\ntry:\n    check_writable({str(mnt / 'd')!r})\n"
                        "except Exception as e:\n    print(e)")  # fmt: skip
    fill = f"dd if=/dev/zero of={mnt}/fill bs=4k count=8 2>/dev/null || true"  # 16 KiB: full after 4 blocks
    full = in_mount(mnt, "size=16k", f"{fill}; {PY} -c {check}")
    assert full.stdout.strip() == (f"out: cannot write in {mnt} (No space left on device); free some space there "
                                   "or give a path on another disk"), full  # fmt: skip
    ro = in_mount(mnt, "ro,size=16k", f"{PY} -c {check}")
    assert ro.stdout.strip() == (f"out: cannot write in {mnt} (Read-only file system); that file system is "
                                 "mounted read-only: give a path on a writable one"), ro  # fmt: skip


@needs_mounts
def test_clean_up_on_a_read_only_mount_does_not_hide_the_first_error(tmp_path):
    # The mount turns read-only while the temp file exists: the body's error must surface, not unlink's.
    mnt = tmp_path / "m"
    code = (f"import subprocess\nfrom surgun_core.io import atomic_path\n"
            f"with atomic_path({str(mnt / 'd.json')!r}) as tmp:\n"
            f"    tmp.write_text('{{}}')\n"
            f"    subprocess.run(['mount', '-o', 'remount,ro', {str(mnt)!r}], check=True)\n"
            f"    raise RuntimeError('the first error')\n")  # fmt: skip
    r = in_mount(mnt, "size=64k", f"{PY} -c {shlex.quote(code)} || true")
    assert "RuntimeError: the first error" in r.stderr, r.stderr
    assert "During handling" not in r.stderr and "Read-only" in r.stderr  # the clean-up's failure: a warning only


@pytest.mark.slow
@needs_mounts
def test_command_on_a_read_only_mount_and_a_disk_that_fills_during_the_erase(tmp_path, fast_config):
    mnt = tmp_path / "m"
    cmd = f"{PY} -m surgun_core.cli " + " ".join(ERASE) + f" --config {fast_config} --blocks cross-attn-kv --steps 1"
    # read-only: refused at once, exit 2, one line
    ro = in_mount(mnt, "ro,size=64k", f"{cmd} --out {mnt}/d.safetensors || echo rc=$?", timeout=240)
    assert ro.stdout.strip() == "rc=2", ro
    want = (f"surgun: error: out: cannot write in {mnt} (Read-only file system); that file system is mounted "
            "read-only: give a path on a writable one")  # fmt: skip
    assert ro.stderr.strip().splitlines() == [want]
    # 16 KiB: the probe file fits, the delta (about 40 KiB) does not: the erase runs, then saving fails. The
    # late failure is exit 1 and one line; the full disk keeps no part of the delta.
    full = in_mount(mnt, "size=16k", f"{cmd} --out {mnt}/d.safetensors || echo rc=$?; ls -A {mnt}", timeout=240)
    assert full.stdout.strip() == "rc=1", full
    assert "Traceback" not in full.stderr
    assert last_line(full.stderr) == (f"surgun: error: out: could not write {mnt}/d.safetensors (No space left on "
                                      "device), so nothing was written; free some space there or give a path on "
                                      "another disk, then run again")  # fmt: skip


# ---- --config --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "field", "needles"),
    [
        ('{"steps": 3,\n  "lr": 0.1,}', "config", ["is not valid JSON", "line 2, column 13", "trailing commas"]),
        ('["steps", 3]', "config", ["holds a JSON list", "one object of settings"]),
        ("", "config", ["is not valid JSON", "line 1, column 1"]),
        (None, "config", ["does not exist", "JSON file of settings"]),
        ("folder", "config", ["is a folder"]),
        ('{"calibrate": "no"}', "calibrate", ["must be true or false", "without quotes"]),
        ('{"seed": "abc"}', "seed", ["must be a whole number >= 0"]),
    ],
)
def test_config_file_errors(tmp_path, capsys, content, field, needles):
    cfg = tmp_path / "c.json"
    if content == "folder":
        cfg.mkdir()
    elif content is not None:
        cfg.write_text(content)
    code, _, err = run(capsys, *ERASE, "--config", cfg, "--out", tmp_path / "d.safetensors")
    assert code == 2
    assert_one_line(err, field, *needles, *([str(cfg)] if field == "config" else []))
    assert not (tmp_path / "d.safetensors").exists()


def test_kind_from_the_config_file_is_kept_unless_the_flag_is_given(tmp_path, toy_backend):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"kind": "style"}))
    base = ["erase", "--model", "m", "--out", "d.safetensors", "--config", str(cfg)]
    a = build_parser().parse_args([*base, "--concept", "red"])
    toy = erase_config(settings_from(a), toy_backend)
    assert toy.kind == "style" and toy.resolved_distractors() == [c for c in COLOURS if c != "red"]
    sd = erase_config(settings_from(build_parser().parse_args([*base, "--concept", "Monet"])), tiny_sd1_backend())
    assert (
        sd.kind == "style" and "Pablo Picasso" in sd.resolved_distractors() and "dog" not in sd.resolved_distractors()
    )
    flag = erase_config(settings_from(build_parser().parse_args([*base, "--concept", "circle", "--kind", "object"])),
                        toy_backend)  # fmt: skip
    assert flag.kind == "object" and "square" in flag.resolved_distractors()


# ---- EraseConfig checks every field's type -------------------------------------------------------------------


def _bad(type_name: str):
    """A value of the wrong type for a field annotated `type_name`, and the words its error must hold."""
    if "bool" in type_name:
        return "false", "true or false"
    if type_name.startswith("int"):
        return 2.0, "whole number"
    if type_name.startswith("float"):
        return "0.5", "number"
    if type_name.startswith("list"):
        return {"a": 1}, "list of strings"
    if type_name.startswith("dict"):
        return ["x"], "dictionary"
    return 5, "string"  # str, Kind


@pytest.mark.parametrize("name", [f.name for f in fields(EraseConfig)])
def test_every_field_is_type_checked(name):
    value, words = _bad(str(next(f.type for f in fields(EraseConfig) if f.name == name)))
    with pytest.raises(ConfigError) as e:
        EraseConfig(**{"concepts": ["circle"], name: value})
    assert e.value.field == name and words in str(e.value)


@pytest.mark.parametrize(
    ("settings", "field", "words"),
    [
        ({"calibrate": "no"}, "calibrate", "true or false, got 'no' (a string"),
        ({"use_contrast": "false"}, "use_contrast", "true or false"),
        ({"gradient_checkpointing": 1}, "gradient_checkpointing", "true or false"),
        ({"seed": "abc"}, "seed", "whole number >= 0"),
        ({"seed": -1}, "seed", "whole number >= 0"),
        ({"seed": True}, "seed", "whole number >= 0"),
        ({"steps": "10"}, "steps", "whole number >= 1, got '10' (a string"),
        ({"checkpoint_every": True}, "checkpoint_every", "whole number >= 0"),
        ({"device": 5}, "device", "must be a string"),
        ({"device": " "}, "device", "is empty"),
        ({"erase_threshold": True}, "erase_threshold", "(0, 1]"),
        ({"w_retain": False}, "w_retain", "finite number"),
        ({"templates": "a {}", "probe_templates": 3}, "probe_templates", "list of strings"),
        ({"recipe": None}, "recipe", "must be a string"),
        ({"extra": {"when": object()}}, "extra", "JSON values only"),
        ({"clip_path": 3}, "clip_path", "must be a string"),
    ],
)
def test_issue_cases_name_the_field_and_the_expected_type(settings, field, words):
    with pytest.raises(ConfigError) as e:
        EraseConfig.from_dict({"concepts": ["circle"], **settings})
    assert e.value.field == field and words in str(e.value)


def test_valid_values_still_pass():
    cfg = EraseConfig(["circle"], seed=0, calibrate=False, gradient_checkpointing=None, extra={"a": [1, "b"]},
                      device="cpu", w_retain=0, guidance=7, erase_threshold=1)  # fmt: skip
    assert cfg.calibrate is False and cfg.extra == {"a": [1, "b"]}


# ---- the model: device, folder -----------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_names_the_device(tmp_path, capsys, fast_config):
    code, _, err = run(capsys, *ERASE, "--config", fast_config, "--device", "cuda", "--out", tmp_path / "d.safetensors")
    assert code == 2
    assert_one_line(err, "device", "CUDA is not available here", "--device cpu")
    assert files_in(tmp_path) == ["fast.json"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_folder("sd1", tmp_path_factory.mktemp("tiny") / "sd1")


def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("damage", "needles"),
    [
        ("missing", ["does not exist"]),
        ("no scheduler", ["no scheduler/scheduler_config.json", "incomplete"]),
        ("truncated unet", ["the unet cannot be read", "truncated", "copy or download it again"]),
        ("truncated text encoder", ["the text encoder cannot be read", "truncated"]),
        ("broken vae config", ["the vae cannot be read"]),
    ],
)
def test_broken_model_folder_is_one_line(tmp_path, capsys, tiny_folder, damage, needles):
    model = tmp_path / "model"
    if damage != "missing":
        shutil.copytree(tiny_folder, model)
    if damage == "no scheduler":
        shutil.rmtree(model / "scheduler")
    elif damage == "truncated unet":
        _truncate(model / "unet" / "diffusion_pytorch_model.safetensors")
    elif damage == "truncated text encoder":
        _truncate(model / "text_encoder" / "model.safetensors")
    elif damage == "broken vae config":
        (model / "vae" / "config.json").write_text('{"_class_name": ')
    before = files_in(tmp_path)
    code, _, err = run(capsys, "erase", "--model", model, "--concept", "cat", "--out", tmp_path / "d.safetensors")
    assert code == 2
    assert_one_line(err, "model", str(model), *needles)
    assert files_in(tmp_path) == before


# ---- modes and replaced files --------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077, 0o002])
def test_written_files_honour_the_umask(tmp_path, mask):
    delta = LoraDelta({"blocks.0.attn2.to_k": (torch.ones(2, 4), torch.ones(4, 2), 2.0)})
    old = os.umask(mask)
    try:
        paths = [delta.save(tmp_path / "d.safetensors"), write_json(tmp_path / "m.json", {"a": 1})]
        save_png(Image.new("RGB", (2, 2)), tmp_path / "g.png")
    finally:
        os.umask(old)
    for p in [*paths, tmp_path / "g.png"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p


def test_the_second_writer_says_it_replaced_the_file(tmp_path):
    delta = LoraDelta({"blocks.0.attn2.to_k": (torch.ones(2, 4), torch.ones(4, 2), 2.0)})
    first, second = delta.write(tmp_path / "d.safetensors"), delta.write(tmp_path / "d.safetensors")
    assert (first.replaced, second.replaced) == (False, True)
    assert wrote(second) == f"wrote {tmp_path / 'd.safetensors'} (replaced an existing file)"
    assert wrote(first) == f"wrote {tmp_path / 'd.safetensors'}"


def test_erase_says_it_replaced_an_earlier_delta_and_shows_eta_bars(tmp_path, capsys):
    out = tmp_path / "d.safetensors"
    out.write_bytes(b"an earlier run's delta")
    config = tmp_path / "fast.json"  # a checkpoint each step (the toy recipe's 12 is more than the 2 steps run)
    config.write_text(json.dumps({**FAST, "checkpoint_every": 1}))
    old = os.umask(0o027)
    try:
        code, stdout, err = run(capsys, *ERASE, "--config", config, "--blocks", "cross-attn-kv", "--steps", 2,
                                "--out", out)  # fmt: skip
    finally:
        os.umask(old)
    assert code == 0, err
    assert stdout.startswith(f"wrote {out} (replaced an existing file): ")
    assert stat.S_IMODE(out.stat().st_mode) == 0o640 and files_in(tmp_path) == ["d.safetensors", "fast.json"]
    for label in ("generating training images", "erasing"):
        assert re.search(re.escape(label) + r".*\| 2/2 \[\d\d:\d\d<\d\d:\d\d", err), label  # with an ETA
    # calibration measures latest first and may stop before the first checkpoint (2 steps erase nothing: it
    # measures the last one only); its bar still completes
    assert re.search(r"calibrating.*\| 2/2 \[\d\d:\d\d<\d\d:\d\d", err), "calibrating"


def test_concurrent_writers_exactly_one_creates_the_file(tmp_path):
    target, n = tmp_path / "d.json", 8
    gate, replaced = threading.Barrier(n), {}

    def writer(i):
        w = atomic_path(target)
        with w as tmp:
            tmp.write_text(json.dumps({"writer": i, "pad": "x" * 100_000}))
            gate.wait()
        replaced[i] = w.replaced

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(replaced.values()) == [False] + [True] * (n - 1)
    assert json.loads(target.read_text())["writer"] in range(n)  # whole: one writer's file
    assert files_in(tmp_path) == ["d.json"]
