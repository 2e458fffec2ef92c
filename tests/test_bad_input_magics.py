"""Every mistake a user can type into ``%ckpt``, through a real IPython shell: exactly one
``UsageError`` (IPython shows no traceback for it), one line, the fix in ``%ckpt``'s own flags,
and nothing changed on disk or in the namespace. Then the behaviours that used to be silent."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from _shell import ckpt_root, ip, run  # noqa: F401 - ip is a fixture
from IPython.core.error import UsageError

#: Python keyword spellings that must never reach a %ckpt user.
PYTHON_DIALECT = ("verify=False", "allow_incomplete=True", "strict=False", "allow=[", "trusted=True",
                  "allow_latest=True", "overwrite=True", "into=", "map_location=", "rng=")


@pytest.fixture
def root(ip, tmp_path):
    with ckpt_root(ip, tmp_path / "ckpts") as path:
        yield path
    magics = ip.magics_manager.registry.get("CkptMagics")
    if magics is not None:
        magics.auto_max_mb = 512.0


def disk(path) -> dict[str, tuple[int, int]]:
    """Every file under ``path`` with its size and mtime: equal snapshots mean nothing changed."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.join(dirpath, f)] = (st.st_size, st.st_mtime_ns)
    return out


# -- the table: (set-up cells, the mistake, what the one line must say) ------------------------------
SETUP_RESTORE = "import torch\nmodel = 42"
CORRUPT = """
import json, os
from torchckpt._fileio import checksum_file
_r = get_ipython().run_line_magic('ckpt', 'dir')
_p = _r / 'rb' / 'objects' / 'x.pt'
_p.write_bytes({head!r} + os.urandom(4096))
_m = json.loads((_r / 'rb' / 'torchckpt-manifest.json').read_text())
for _rec in _m['files']:
    if _rec['path'] == 'objects/x.pt':
        _rec['size'], _rec['checksum'] = checksum_file(_p)
(_r / 'rb' / 'torchckpt-manifest.json').write_text(json.dumps(_m))
"""
CASES = [
    pytest.param(["x = 1", "%ckpt save cc x",
                  ("_f = get_ipython().run_line_magic('ckpt', 'dir') / 'cc' / 'objects' / 'x.pt'\n"
                   "_f.write_bytes(_f.read_bytes() + b'tail')")], "%ckpt load cc",
                 ["is corrupt", "--no-verify"], id="corrupt-hint"),
    pytest.param(["x = 1", "%ckpt save rb x", CORRUPT.format(head=b"")], "%ckpt load rb",
                 ["not a torch.save file (zip or legacy) nor safetensors"], id="random-bytes"),
    pytest.param(["x = 1", "%ckpt save rb x", CORRUPT.format(head=b"\x80")], "%ckpt load rb --trusted",
                 ["could not be unpickled", "not a torch.save file"], id="random-bytes-trusted"),
    pytest.param([SETUP_RESTORE, "%ckpt save b model", "model = torch.nn.Linear(2, 2)"], "%ckpt load b",
                 ["saved as a plain value", "torch.nn.modules.linear.Linear", "--into model_saved"], id="value-over-module"),
    pytest.param(["import torch\nt = torch.zeros(3)", "%ckpt save b t", "t = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1)"],
                 "%ckpt load b t", ["saved as a tensor", "torch.optim.sgd.SGD"], id="tensor-over-optimizer"),
    pytest.param(["import torch\nt = torch.zeros(3)", "%ckpt save b t", "t = torch.zeros(4)"], "%ckpt load b",
                 ["shape (3,) saved, (4,) live", "--no-strict"], id="tensor-shape-strict-hint"),
    pytest.param(["cfg = {'lr': 0.1, 'act': lambda x: x}"], "%ckpt save b cfg",
                 ["cfg['act'] is a lambda"], id="dict-with-lambda-named"),
    pytest.param(["x = 1", "%ckpt save a x"], "%ckpt load a --map-location nonsense",
                 ["--map-location nonsense is not a device", "'cpu'", "'auto'"], id="map-location-nonsense"),
    pytest.param(["x = 1", "%ckpt save a x"], "%ckpt load a --map-location cpu:0",
                 ["--map-location cpu:0", "use 'cpu'"], id="map-location-cpu0"),
    pytest.param(["x = 1", "%ckpt save a x"], "%ckpt load a --map-location cuda:7",
                 ["--map-location cuda:7"], id="map-location-cuda7"),
    pytest.param(["x = 1", "%ckpt save a x"], "%ckpt load a x --into class",
                 ["--into class is not a name a variable can have", "--into x_saved"], id="into-keyword"),
    pytest.param(["x = 1", "%ckpt save a x"], "%ckpt load a x --into y --rng",
                 ["--rng with --into", "never changes the RNG"], id="into-with-rng"),
    pytest.param(["x = 1", "%ckpt save a x"], "%ckpt rm a", ["'latest'", "--force"], id="rm-latest-hint"),
    pytest.param(["x = 1", "%ckpt save a x"], "%ckpt save a x", ["already exists", "--overwrite"], id="exists-hint"),
    pytest.param(["x = 1"], "%ckpt dir {file}/sub", ["is a file"], id="dir-under-file"),
    pytest.param(["x = 1"], "%ckpt dir /proc/torchckpt-root", ["cannot create directories in /proc"], id="dir-in-proc"),
    pytest.param(["x = 1"], "%ckpt ui", ["needs a Jupyter notebook or JupyterLab", "%ckpt ls"], id="ui-in-terminal"),
    pytest.param(["x = 1", "%ckpt save a x"], "%ckpt info ''", ["empty"], id="empty-tag"),
    pytest.param([("class Cfg:\n    pass\n"
                   "class Holder:\n    def state_dict(self): return {'c': Cfg()}\n"
                   "    def load_state_dict(self, sd): pass\n"
                   "h = Holder()"), "%ckpt save u h"], "%ckpt load u",
                 ["needs globals", "--allow __main__.Cfg", "--trusted"], id="unsafe-hints"),
]


@pytest.mark.parametrize(("setup", "mistake", "says"), CASES)
def test_every_mistake_is_one_usage_error_in_ckpt_words_and_changes_nothing(ip, root, tmp_path, setup, mistake, says):
    (tmp_path / "afile").write_text("x")
    for cell in setup:
        run(ip, cell)
    names = {k: v for k, v in ip.user_ns.items() if not k.startswith("_")}
    before = disk(tmp_path)
    magics = ip.magics_manager.registry["CkptMagics"]
    root_before = magics.resolved_root()
    result = ip.run_cell(mistake.format(file=tmp_path / "afile"), store_history=False)
    error = result.error_in_exec
    assert type(error) is UsageError, repr(error)
    message = str(error)
    assert "\n" not in message and "Traceback" not in message, message
    for part in says:
        assert part in message, message
    for kw in PYTHON_DIALECT:
        assert kw not in message, f"{kw!r} (Python's spelling) in a %ckpt message: {message}"
    assert disk(tmp_path) == before
    assert {k: v for k, v in ip.user_ns.items() if not k.startswith("_")}.keys() == names.keys()
    assert all(ip.user_ns[k] is v for k, v in names.items())
    assert magics.resolved_root() == root_before


def test_a_config_root_that_cannot_hold_checkpoints_is_one_line(ip, root, tmp_path):
    (tmp_path / "afile").write_text("x")
    magics = ip.magics_manager.registry["CkptMagics"]
    run(ip, "x = 1")
    magics.root = str(tmp_path / "afile" / "sub")  # as %config CkptMagics.root = ... would
    try:
        result = ip.run_cell("%ckpt save t x", store_history=False)
        assert type(result.error_in_exec) is UsageError
        assert "\n" not in str(result.error_in_exec) and "afile" in str(result.error_in_exec)
    finally:
        magics.root = str(root)


def test_a_long_note_is_parsed_in_linear_time(ip, root):
    import time

    run(ip, "x = 1")
    started = time.perf_counter()
    r = run(ip, '%ckpt save t x -q --note "' + "n" * 40_000 + ' costs 5$ {x}"')
    assert r.committed and time.perf_counter() - started < 3


# -- what used to be silent --------------------------------------------------------------------------
def test_save_without_names_says_what_it_left_out_and_why(ip, root, tmp_path):
    run(ip, "import torch, threading\nmodel = torch.nn.Linear(2, 2)\ncfg = {'lr': 0.1, 'act': lambda x: x}\n"
            f"fh = open({str(tmp_path / 'log.txt')!r}, 'w')\nlock = threading.Lock()\n"
            "data = torch.zeros(4096)\nsmall = torch.zeros(2)")
    try:
        run(ip, "%config CkptMagics.auto_max_mb = 0.01")  # 10 KiB: data (16 KiB) is "a data set"
        r = run(ip, "%ckpt save all")
        assert set(r.names) == {"model", "small"}
        text = r.to_text()
        assert "left out cfg: cfg['act'] is a lambda" in text
        assert "left out fh: an open file" in text
        assert "left out lock:" in text and "lock" in text
        assert "left out data: a tensor of 16.0 KiB, over the 10.2 KiB limit" in text and "name it" in text
        assert repr(r).endswith("(4 notes: see .notes)>")
        r = run(ip, "%ckpt save named data")  # named: saved whatever its size, without a note
        assert r.names == ["data"] and not r.notes
    finally:
        run(ip, "fh.close()")


def test_text_metrics_are_kept_and_said(ip, root):
    run(ip, "x = 1")
    r = run(ip, "%ckpt save t x --metric loss=abc acc=0.5")
    assert r.metrics == {"loss": "abc", "acc": 0.5}
    assert "metric loss='abc' is text, not a number" in r.to_text()


RESUME = """
import torch
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
opt = torch.optim.SGD(net.parameters(), lr=0.1)
def train(n):
    out = []
    for _ in range(n):
        x = torch.randn(16, 4)
        loss = ((net(x) - x.sum(1, keepdim=True)) ** 2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        out.append(loss.item())
    return out
"""


def test_resuming_by_naming_the_objects_restores_the_rng(ip, root):
    run(ip, RESUME)
    run(ip, "%ckpt save resume net opt")
    first = run(ip, "train(5)")
    r = run(ip, "%ckpt load resume net opt")
    assert r.rng and "RNG states restored" in r.to_text()
    assert run(ip, "train(5)") == first
    r = run(ip, "%ckpt load resume net opt --no-rng")
    assert not r.rng and "not asked for" in r.to_text()
    r = run(ip, "%ckpt load resume net --into net2")
    assert not r.rng and "never changes them" in r.to_text()
    state = run(ip, "torch.get_rng_state()")
    run(ip, "%ckpt load resume net --into net3")
    assert torch.equal(run(ip, "torch.get_rng_state()"), state)


def test_the_random_bytes_file_is_not_called_unsafe(tmp_path):
    from torchckpt import serialization
    from torchckpt.errors import NotTorchFileError, UnsafeCheckpointError

    # ~5% of random pickle streams once escaped as IndexError/KeyError/UnicodeDecodeError tracebacks
    for head in (b"", b"\x80", b"\x80\x02") * 100:
        path = tmp_path / "x.pt"
        path.write_bytes(head + os.urandom(4096))
        with pytest.raises(NotTorchFileError, match="not a torch.save file .zip or legacy. nor safetensors") as e:
            serialization.load(path)
        assert not isinstance(e.value, UnsafeCheckpointError) and "trusted" not in str(e.value)


def test_thread_lock_is_described(ip, root):
    from torchckpt.state import discover

    _, skipped = discover({"lock": threading.Lock(), "n": 1})
    assert skipped == {"lock": "a _thread.lock, which torchckpt cannot save"}


def test_variables_still_expand_and_a_huge_line_is_refused_at_once(ip, root):
    import time

    run(ip, "x = 1\nname = 'from-var'\nn = 3")
    assert run(ip, "%ckpt save {name}-{n + 1} x -q").tag == "from-var-4"
    assert run(ip, "%ckpt save $name x -q --overwrite").tag == "from-var"
    run(ip, "def f():\n    inner = 'in-func'\n    return get_ipython().run_line_magic('ckpt', 'save {inner} x -q')")
    assert run(ip, "f()").tag == "in-func"
    started = time.perf_counter()
    result = ip.run_cell('%ckpt save t x --note "' + "n" * 2_000_000 + '"', store_history=False)
    assert type(result.error_in_exec) is UsageError and "characters long" in str(result.error_in_exec)
    assert time.perf_counter() - started < 3


@pytest.mark.parametrize(("line", "offered"), [
    ("%ckpt load a --into cl", ["cl"]),          # a name the user types: nothing to offer
    ("%ckpt save t --note i", ["i"]),
    ("%ckpt zz ", [""]),
    ("%ckpt load a x --map-location c", ["cpu"]),
    ("%ckpt load a --st", ["--strict"]),
])
def test_completion_never_offers_python_keywords_or_magics(ip, root, line, offered):
    run(ip, "x = 1\nclassy = 2")
    got = ip.complete(None, line, len(line))[1]
    assert got == offered
    assert not {"class", "classmethod", "import", "%alias"} & set(got)


@pytest.mark.parametrize("line", ["save $a", "save '$a' $b", "save $$a", "x {n+1} $b", "5$ and $a", "a {{lit}} $a",
                                  "it's $a", "q '$a' '$b'", "{n:03d} $a", "{b!r} $a", "a}b $a", "$a{b}$b", "$_zz $a"])
def test_expansion_is_ipythons_in_linear_time(line):
    from IPython.utils.text import DollarFormatter, FullEvalFormatter

    from torchckpt.magics import _dollars_to_fields

    ns = {"a": 1, "b": "x", "n": 3}

    def expand(formatter, convert=str):
        try:
            return formatter.vformat(convert(line), args=[], kwargs=ns)
        except Exception:  # noqa: BLE001 - IPython passes such a line as typed
            return line

    assert expand(FullEvalFormatter(), _dollars_to_fields) == expand(DollarFormatter())


def test_no_verify_reads_a_damaged_checkpoint_when_asked(ip, root):
    run(ip, "x = 1\n%ckpt save cc x\nx = 2")
    run(ip, "_f = get_ipython().run_line_magic('ckpt', 'dir') / 'cc' / 'objects' / 'x.pt'\n"
            "_f.write_bytes(_f.read_bytes() + b'tail')")
    r = run(ip, "%ckpt load cc --no-verify")
    assert r.names == ["x"] and run(ip, "x") == 1


def test_the_line_splits_as_shlex_does():
    import shlex

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from torchckpt.magics import split_line

    def outcome(split, text):
        try:
            return split(text)
        except ValueError as e:
            return ("error", str(e))

    @settings(max_examples=3000, deadline=None)
    @given(st.text(alphabet="ab '\"\\\t\n$`é", max_size=20))
    def same(text):
        assert outcome(split_line, text) == outcome(lambda t: shlex.split(t, posix=True), text)

    same()
