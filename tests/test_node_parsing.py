"""The node layer's pure helpers (nodes/parsing.py): widget text -> EraseConfig, without ComfyUI."""

import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parsing(pack):
    return importlib.import_module(pack.__name__ + ".nodes.parsing")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("circle", ["circle"]),
        ("circle\nsquare", ["circle", "square"]),
        ("circle, square\n ring ", ["circle", "square", "ring"]),
        ("\n\n  circle  \n\n", ["circle"]),
        ("# erase these\ncircle\n  # and not this\n", ["circle"]),
        ("circle\ncircle", ["circle"]),
        ("Van Gogh\nClaude Monet", ["Van Gogh", "Claude Monet"]),
        ("", []),
        (None, []),
    ],
)
def test_parse_list(parsing, text, expected):
    assert parsing.parse_list(text) == expected


def test_templates_keep_commas(parsing):
    assert parsing.parse_list_lines("a {}, painting\n\n# no\na photo of a {}") == ["a {}, painting", "a photo of a {}"]


def test_build_config(parsing):
    cfg = parsing.build_config("circle\n", "square\ntriangle", "", kind="object", steps=3, lr=0.01, rank=2, seed=5)
    assert cfg.concepts == ["circle"]
    assert cfg.distractors == ["square", "triangle"]
    assert cfg.templates is None
    assert (cfg.steps, cfg.lr, cfg.rank, cfg.seed) == (3, 0.01, 2, 5)


def test_empty_distractors_mean_builtin(parsing):
    cfg = parsing.build_config("dog", "  \n", kind="object")
    assert cfg.distractors is None
    assert "dog" not in cfg.resolved_distractors() and cfg.resolved_distractors()


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        ({"concepts": ""}, "concepts", "empty"),
        ({"concepts": "\n  \n# comment only"}, "concepts", "empty"),
        ({"concepts": "circle", "distractors": "circle\nsquare"}, "distractors", "own distractor"),
        ({"concepts": "circle", "templates": "a photo of a circle"}, "templates", "{}"),
        ({"concepts": "circle", "kind": "colour"}, "kind", "object"),
        ({"concepts": "circle", "steps": 0}, "steps", ">= 1"),
    ],
)
def test_build_config_errors_name_the_field(pack, parsing, kwargs, field, words):
    errors = importlib.import_module(pack.__name__ + ".surgun_core.errors")
    with pytest.raises(errors.ConfigError) as e:
        parsing.build_config(**kwargs)
    assert e.value.field == field
    assert words in str(e.value)


def test_resolve_blocks(pack, parsing):
    errors = importlib.import_module(pack.__name__ + ".surgun_core.errors")
    assert parsing.resolve_blocks("cross-attn-kv", "ignored") == "cross-attn-kv"
    assert parsing.resolve_blocks("manual", r" attn2\.to_k$ ") == r"attn2\.to_k$"
    assert parsing.BLOCK_CHOICES[0] == "auto" and parsing.BLOCK_CHOICES[-1] == "manual"  # auto: the default
    assert parsing.resolve_blocks("auto", "") == "auto"
    for preset, manual, msg in [("manual", "", "empty"), ("manual", "attn2.(", "regular expression"),
                                ("nope", "", "unknown preset")]:  # fmt: skip
        with pytest.raises(errors.ConfigError, match=msg):
            parsing.resolve_blocks(preset, manual)


def test_attack_audit_widgets(pack, parsing):
    """SurgUn Attack Audit's `attacks` and `attack_settings` widgets: names and JSON, refused with the field named."""
    errors = importlib.import_module(pack.__name__ + ".surgun_core.errors")
    every = list(importlib.import_module(pack.__name__ + ".surgun_core.registry").ATTACK_NAMES)
    assert parsing.parse_attacks("all") == parsing.parse_attacks(" ") == parsing.parse_attacks(None) == every
    assert parsing.parse_attacks("phrasings, inversion\nphrasings") == ["phrasings", "inversion"]
    assert parsing.parse_attack_settings("") == {}
    assert parsing.parse_attack_settings('{"inversion": {"steps": 5}}') == {"inversion": {"steps": 5}}
    bad = [(parsing.parse_attacks, "ringabell", "attacks", "unknown attack 'ringabell'"),
           (parsing.parse_attack_settings, "{steps: 5}", "attack_settings", "not valid JSON"),
           (parsing.parse_attack_settings, '{"inversion": 5}', "attack_settings", "map")]  # fmt: skip
    for call, text, field, words in bad:
        with pytest.raises(errors.ConfigError) as e:
            call(text)
        assert e.value.field == field and words in str(e.value)
