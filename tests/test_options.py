"""CheckpointOptions: defaults, validation naming the option and its valid values, immutability."""

from __future__ import annotations

import dataclasses

import pytest

from torchckpt.options import AUTO_MAX_BYTES, PROGRESS_MIN_BYTES, CheckpointOptions


def test_defaults_are_the_documented_ones():
    o = CheckpointOptions()
    assert (o.lock_timeout, o.progress_min_bytes, o.auto_max_bytes) == (60.0, 256 << 20, 512 << 20)
    assert (o.max_inflight_bytes, o.pin_memory, o.poll_interval, o.dedup) == (None, None, 2.0, True)
    assert PROGRESS_MIN_BYTES == 256 << 20 and AUTO_MAX_BYTES == 512 << 20


def test_options_are_frozen_and_keyword_only():
    o = CheckpointOptions(lock_timeout=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.lock_timeout = 1
    with pytest.raises(TypeError):
        CheckpointOptions(5)  # type: ignore[misc]
    assert dataclasses.replace(o, poll_interval=None).poll_interval is None


@pytest.mark.parametrize(("name", "value", "error", "valid"), [
    ("lock_timeout", -1, ValueError, "a number of seconds >= 0"),
    ("lock_timeout", float("nan"), ValueError, "a number of seconds >= 0"),
    ("lock_timeout", "60", TypeError, "a number of seconds >= 0"),
    ("progress_min_bytes", -1, ValueError, "a whole number of bytes >= 0"),
    ("progress_min_bytes", 1.5, ValueError, "a whole number of bytes >= 0"),
    ("auto_max_bytes", -5, ValueError, r"a whole number of bytes >= 0, or None \(no limit\)"),
    ("max_inflight_bytes", 0, ValueError, r"a whole number of bytes > 0, or None \(no cap\)"),
    ("max_inflight_bytes", True, ValueError, r"a whole number of bytes > 0, or None \(no cap\)"),
    ("pin_memory", "yes", TypeError, r"True, False or None \(when CUDA is available\)"),
    ("pin_memory", 1, ValueError, r"True, False or None \(when CUDA is available\)"),
    ("poll_interval", 0, ValueError, r"a number of seconds > 0, or None \(never\)"),
    ("poll_interval", float("inf"), ValueError, r"a number of seconds > 0, or None \(never\)"),
])
def test_a_bad_value_names_the_option_and_its_valid_values(name, value, error, valid):
    with pytest.raises(error, match=rf"^{name} must be {valid}, got ") as caught:
        CheckpointOptions(**{name: value})
    assert str(caught.value).endswith(repr(value))


def test_good_values_are_kept():
    o = CheckpointOptions(lock_timeout=0, progress_min_bytes=0, auto_max_bytes=None, max_inflight_bytes=1 << 30,
                          pin_memory=False, poll_interval=0.5)
    assert o.lock_timeout == 0 and o.auto_max_bytes is None and o.max_inflight_bytes == 1 << 30
    assert o.pin_memory is False and o.poll_interval == 0.5


def test_linked_re_saves_are_an_option_like_the_others(tmp_path):
    from torchckpt.notebook import Checkpointer
    from torchckpt.options import CheckpointOptions

    with pytest.raises(TypeError, match="dedup must be True or False"):
        CheckpointOptions(dedup="yes")
    ck = Checkpointer(tmp_path, dedup=False)
    assert ck.options.dedup is False and ck.dedup is False
    ck.dedup = True
    assert ck.options.dedup is True
    assert Checkpointer(tmp_path, options=CheckpointOptions(dedup=False)).dedup is False
    ck.close()
