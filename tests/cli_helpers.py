"""What the command-line fault and exit tests share: a tiny erase, and how to run the command and read it."""

from pathlib import Path

from surgun_core.cli import main

# the whole method but tiny (as tests/test_cli.py); fixed blocks skip localization unless a test wants it
FAST = {"images_per_concept": 2, "sample_steps": 2, "templates": ["a {}"], "localize_steps": 1, "probe_seeds": 1,
        "probe_retained": 1, "localize_batches": 1}  # fmt: skip
ERASE = ["erase", "--model", "toy", "--concept", "circle", "--distractor", "square", "--distractor", "ring"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def last_line(err: str) -> str:
    """The last line a terminal shows: progress bars redraw with carriage returns, so take what follows them."""
    return err.strip().splitlines()[-1].split("\r")[-1].strip() if err.strip() else ""


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
