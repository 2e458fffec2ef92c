"""The checkpoint panel in a real JupyterLab, driven from headless Chromium by Playwright.

Starts ``jupyter lab`` on 127.0.0.1:18888 with throw-away settings (no autosave, no news, no
kernel dialog), opens a copy of ``notebooks/03_panel.ipynb``, runs it, then uses the panel the
way a person would: type a tag, click Save, see the tag in the table, change the model, tick
the tag, click Load, and check in the kernel that the model is back. Screenshots go to
``$TORCHCKPT_ARTIFACTS`` (or pytest's tmp_path) and the path is printed.

Debian's ``chromium`` is used (pip's playwright cannot download a browser here); the test skips
only when /usr/bin/chromium is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
PORT = 18888
NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "03_panel.ipynb"
TIMEOUT_MS = 60_000  # Playwright's 5 s default is too short on 2 shared cores
SLOW_MS = 150_000  # starting the kernel, running the whole notebook (imports torch)
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"needs Debian's chromium at {CHROMIUM} (`apt-get install chromium`; ./dev test installs it as root)",
    ),
]

# JupyterLab user settings for the throw-away settings directory: no autosave (the test must
# not rewrite the notebook), no news/update toasts over the page, no kernel-selection dialog,
# and every cell attached to the DOM (windowing would detach cells scrolled out of view).
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker": {"autoStartDefaultKernel": True, "windowingMode": "none"},
    "@jupyterlab/apputils-extension/sessionDialogs": {"skipKernelRestartDialog": True},
}


def _artifact_dir(tmp_path: Path) -> Path:
    base = os.environ.get("TORCHCKPT_ARTIFACTS")
    out = Path(base) / "panel-browser" if base else tmp_path / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def jupyter_lab(workdir: Path, notebooks: Path) -> Iterator[tuple[str, str, Path]]:
    """Run JupyterLab on 127.0.0.1:PORT serving ``notebooks``; yield (base url, token, log path)."""
    dirs = {name: workdir / name for name in ("settings", "workspaces", "config", "runtime", "data", "tmp")}
    for d in dirs.values():
        d.mkdir(parents=True)
    for plugin, values in LAB_SETTINGS.items():
        path = dirs["settings"] / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    token = secrets.token_hex(16)
    env = dict(
        os.environ,
        JUPYTERLAB_SETTINGS_DIR=str(dirs["settings"]),
        JUPYTERLAB_WORKSPACES_DIR=str(dirs["workspaces"]),
        JUPYTER_CONFIG_DIR=str(dirs["config"]),
        JUPYTER_RUNTIME_DIR=str(dirs["runtime"]),
        JUPYTER_DATA_DIR=str(dirs["data"]),  # no user kernelspec can shadow this interpreter's
        TMPDIR=str(dirs["tmp"]),  # the notebook's tempfile.mkdtemp() root is removed with tmp_path
        # The kernel runs `python`; jupyter_client maps that to sys.executable, but keep the
        # interpreter's directory first on PATH so anything else it spawns is ours too.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    cmd = [
        sys.executable, "-m", "jupyter", "lab",
        "--no-browser", "--allow-root",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={PORT}", "--ServerApp.port_retries=0",
        f"--ServerApp.token={token}", f"--ServerApp.root_dir={notebooks}",
    ]  # fmt: skip
    log_path = workdir / "jupyterlab.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{PORT}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"jupyter lab exited with code {proc.returncode} before serving (port {PORT} taken?):\n"
                    + log_path.read_text(errors="replace")[-3000:]
                )
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    json.load(r)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("jupyter lab did not answer /api/status within 60 s") from None
                time.sleep(0.25)
        yield base, token, log_path
    finally:
        # SIGTERM lets the server shut its kernels down; SIGKILL the group if it hangs.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _wait_all_executed(page, expect) -> None:
    """Every code cell shows an execution count (``[3]:``), none is queued or running (``[*]:``)."""
    prompts = page.locator(".jp-CodeCell .jp-InputArea-prompt")
    expect(prompts.first).to_be_visible()
    page.wait_for_function(
        """() => {
            const ps = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')];
            return ps.length > 0 && ps.every(p => /\\[\\d+\\]/.test(p.textContent));
        }""",
        timeout=SLOW_MS,
    )
    expect(page.locator("#jp-main-statusbar")).to_contain_text(re.compile(r"\|\s*Idle"))


def _run_new_cell(page, expect, code: str) -> str:
    """Append a code cell at the end of the notebook, run it, return its text output."""
    cells = page.locator(".jp-Notebook .jp-Cell")
    before = cells.count()
    cells.last.locator(".jp-InputArea-prompt").click()  # select the last cell (command mode)
    page.keyboard.press("Escape")
    page.keyboard.press("b")  # insert a cell below
    expect(cells).to_have_count(before + 1)
    cell = cells.nth(before)  # by index: Shift+Enter on the last cell appends yet another one
    editor = cell.locator(".cm-content")
    editor.click()
    expect(editor).to_be_focused()
    page.keyboard.insert_text(code)  # no key events: no auto-closed brackets or completions
    expect(editor).to_contain_text(code.splitlines()[-1].strip())
    page.keyboard.press("Shift+Enter")
    expect(cell.locator(".jp-InputArea-prompt")).to_have_text(re.compile(r"\[\d+\]"))
    output = cell.locator(".jp-OutputArea-output")
    expect(output.first).to_be_visible()
    return output.all_inner_texts()


def test_panel_save_and_load_in_jupyterlab(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    # Without its clean-up cells (tagged "cleanup"): they close the panels this test drives.
    doc = json.loads(NOTEBOOK.read_text())
    doc["cells"] = [c for c in doc["cells"] if "cleanup" not in c.get("metadata", {}).get("tags", [])]
    (notebooks / NOTEBOOK.name).write_text(json.dumps(doc))
    artifacts = _artifact_dir(tmp_path)
    print(f"\nbrowser test artifacts: {artifacts}")
    started = time.monotonic()

    with jupyter_lab(tmp_path / "lab", notebooks) as (base, token, log_path), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        try:
            page.goto(f"{base}/lab/tree/{NOTEBOOK.name}?token={token}")
            status_bar = page.locator("#jp-main-statusbar")
            # The kernel is ready when the status bar names it and reads Idle.
            expect(status_bar).to_contain_text(re.compile(r"Python 3.*\|\s*Idle"), timeout=SLOW_MS)

            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
            _wait_all_executed(page, expect)

            # The kernel JupyterLab started is this interpreter (so it imports this torchckpt);
            # and a "training step", so the tag saved below differs from the notebook's "demo".
            out = _run_new_cell(
                page, expect,
                "import sys\nprint('prefix:', sys.prefix)\nwith torch.no_grad():\n    model.weight.mul_(0.5)",
            )  # fmt: skip
            assert f"prefix: {sys.prefix}" in "".join(out)

            # Two panels: CheckpointPanel(...) from Python, then `%ckpt ui` at the end.
            expect(page.locator(".torchckpt-panel")).to_have_count(2)
            panel = page.locator(".torchckpt-panel").first
            expect(panel).to_be_visible()
            # The notebook's own cells saved "demo" through the panel's Python handle.
            expect(panel.locator(".torchckpt-row", has_text="demo")).to_be_visible()

            # Save a new tag by hand.
            panel.locator(".torchckpt-tag input").fill("browser-1")
            panel.locator(".torchckpt-note input").fill("saved from the browser test")
            panel.locator(".torchckpt-metrics input").fill("loss=0.42")
            panel.locator("button.torchckpt-save").click()
            row = panel.locator(".torchckpt-row", has_text="browser-1")
            expect(row).to_be_visible()
            expect(row).to_contain_text("committed")
            expect(row).to_contain_text("loss=0.42")
            expect(row.locator(".torchckpt-latest")).to_be_visible()
            expect(panel.locator(".torchckpt-status")).to_contain_text("saved 'browser-1'")
            expect(panel.locator("button.torchckpt-save")).to_be_enabled()

            # Change the model in the kernel.
            out = _run_new_cell(
                page, expect,
                "before = {k: v.clone() for k, v in model.state_dict().items()}\n"
                "with torch.no_grad():\n"
                "    model.weight.add_(1.0)\n"
                "print('changed:', not torch.equal(model.weight, before['weight']))",
            )  # fmt: skip
            assert "changed: True" in "".join(out)

            # Tick the tag, load it onto the CPU, and check the model is restored.
            for other in panel.locator(".torchckpt-row input[type=checkbox]").all():
                other.uncheck()
            row.locator("input[type=checkbox]").check()
            panel.locator(".torchckpt-map-location select").select_option(label="cpu")
            load = panel.locator("button.torchckpt-load")
            expect(load).to_be_enabled()
            load.click()
            expect(panel.locator(".torchckpt-status")).to_contain_text("loaded 'browser-1' onto cpu")
            expect(panel.locator(".torchckpt-progress .progress-bar-success")).to_be_visible()
            out = _run_new_cell(
                page, expect,
                "print('restored:', all(torch.equal(v, before[k]) for k, v in model.state_dict().items()))",
            )  # fmt: skip
            assert "restored: True" in "".join(out)

            # Compare the two tags: the diff lands in the log.
            panel.locator(".torchckpt-row", has_text="demo").locator("input[type=checkbox]").check()
            panel.locator("button.torchckpt-diff").click()
            expect(panel.locator(".torchckpt-status")).to_contain_text(re.compile(r"demo → browser-1: .*1 of 2 tensors changed"))
            expect(panel.locator(".torchckpt-log")).to_contain_text("tensors changed")

            panel.scroll_into_view_if_needed()
            panel.screenshot(path=str(artifacts / "panel.png"))
            page.screenshot(path=str(artifacts / "jupyterlab.png"), full_page=True)

            # The chart: two more tags saved in code (the panel refreshes after the cell), then shown.
            out = _run_new_cell(
                page, expect,
                "for s, l in ((10, 0.30), (20, 0.21)):\n"
                "    step = s\n"
                "    panel.checkpointer.save(f'browser-s{s}', {'model': model, 'step': step}, step=s, metrics={'loss': l})\n"
                "print('saved', len(panel.checkpointer.tags()))",
            )  # fmt: skip
            assert "saved 4" in "".join(out)
            panel.locator(".torchckpt-chart-toggle").click()
            chart = panel.locator("img.torchckpt-chart")
            expect(chart).to_be_visible()
            expect(panel.locator(".torchckpt-chart-note")).to_contain_text("1 branch")
            assert chart.evaluate("img => img.naturalWidth") > 100
            panel.screenshot(path=str(artifacts / "panel-chart.png"))
        except Exception:
            with contextlib.suppress(Exception):
                page.screenshot(path=str(artifacts / "failure.png"), full_page=True)
            shutil.copy(log_path, artifacts / "jupyterlab.log")
            raise
        finally:
            browser.close()
    elapsed = time.monotonic() - started
    print(f"browser test took {elapsed:.1f} s; screenshots in {artifacts}")
    assert (artifacts / "panel.png").stat().st_size > 0
