"""The training-image cache: keyed by model fingerprint and settings, on disk atomically, damage ignored."""

import torch

from surgun_core.cache import ImageCache


def test_disk_round_trip_and_key(tmp_path):
    k = ImageCache.key("fp1", "a photo of a cat", 3, 20, 5.0)
    assert k != ImageCache.key("fp2", "a photo of a cat", 3, 20, 5.0)  # another base model: another entry
    assert k != ImageCache.key("fp1", "a photo of a cat", 3, 20, 4.0)
    x = torch.randn(3, 8, 8)
    ImageCache(tmp_path).put(k, x)
    assert [p.name for p in tmp_path.iterdir()] == [f"{k}.safetensors"]  # no temp file left behind
    torch.testing.assert_close(ImageCache(tmp_path).get(k), x)  # a fresh cache reads it from disk


def test_damaged_entry_is_regenerated_not_trusted(tmp_path):
    k = ImageCache.key("fp", "p", 0, 20, 5.0)
    (tmp_path / f"{k}.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    assert ImageCache(tmp_path).get(k) is None


def test_memory_only_cache(tmp_path):
    c = ImageCache(None)
    c.put("k", torch.ones(2))
    assert c.get("k").sum() == 2 and c.get("other") is None
