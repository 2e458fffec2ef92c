"""The same mistakes through the Python API: the exception class, and the fix spelled as the
keyword argument; nothing changed. (The %ckpt, panel and CLI tables render these messages.)"""

from __future__ import annotations

import pytest
import torch

from torchckpt import Checkpointer
from torchckpt.errors import (
    DeviceUnavailableError,
    InvalidArgumentError,
    NotCheckpointableError,
    RestoreError,
    TagExistsError,
    hint_options,
    in_dialect,
)

CASES = [
    pytest.param(lambda c, ns: c.load("a", ns), {"model": torch.nn.Linear(2, 2)}, RestoreError,
                 ["saved as a plain value", "into='model_saved'"], id="value-over-module"),
    pytest.param(lambda c, ns: c.load("a", ns, map_location="nonsense"), {}, InvalidArgumentError,
                 ["map_location='nonsense' is not a device"], id="map-location"),
    pytest.param(lambda c, ns: c.load("a", ns, map_location="cpu:0"), {}, InvalidArgumentError,
                 ["use 'cpu'"], id="map-location-cpu0"),
    pytest.param(lambda c, ns: c.load("a", ns, map_location="cuda:9"), {}, DeviceUnavailableError,
                 ["map_location='cuda:9'"], id="map-location-cuda9"),
    pytest.param(lambda c, ns: c.load("a", ns, ["model"], into="class"), {}, RestoreError,
                 ["into='class' is not a name"], id="into-keyword"),
    pytest.param(lambda c, ns: c.save("a", {"model": 1}), {}, TagExistsError, ["overwrite=True"], id="exists"),
    pytest.param(lambda c, ns: c.save("c", {"cfg": {"act": lambda x: x}}), {}, NotCheckpointableError,
                 ["cfg['act'] is a lambda"], id="dict-with-lambda"),
]


@pytest.mark.parametrize(("call", "live", "error", "says"), CASES)
def test_python_mistakes_raise_the_class_with_the_keyword(tmp_path, call, live, error, says):
    with Checkpointer(tmp_path / "r") as ckpt:
        ckpt.save("a", {"model": 42})
        ns = dict(live)
        before = dict(ns)
        with pytest.raises(error) as e:
            call(ckpt, ns)
        for part in says:
            assert part in str(e.value)
        assert ns.keys() == before.keys() and all(ns[k] is v for k, v in before.items())
        assert ckpt.tags() == ["a"]


def test_one_message_three_dialects():
    message = ("checkpoint 'a' is 'latest'; pass allow_latest=True (or --force) to remove it; load with "
               "strict=False, or pass allow=['a.B', 'c.D'] or trusted=True")
    assert in_dialect(message, "python") == message.replace(" (or --force)", "")
    assert in_dialect(message, "magic") == ("checkpoint 'a' is 'latest'; pass --force to remove it; load with "
                                            "--no-strict, or pass --allow a.B --allow c.D or --trusted")
    assert in_dialect(message, "cli") == ("checkpoint 'a' is 'latest'; pass --force to remove it; load with "
                                          "strict=False (Python API), or pass --allow a.B --allow c.D or --trusted")
    assert hint_options(ValueError(message)) == ["allow_latest=True", "strict=False",
                                                 "allow=['a.B', 'c.D']", "trusted=True"]
    with pytest.raises(ValueError, match="surface 'web'"):
        in_dialect(message, "web")
