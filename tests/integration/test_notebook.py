"""notebooks/quickstart.ipynb and finetune.ipynb run top to bottom, headless, in a fresh kernel with its own local Ray.

Not on the session `ray_cluster`: the notebook calls `ray.init()` itself, inside the kernel process.
The kernel gets RAY_ADDRESS=local so that `ray.init()` always starts a new Ray and never joins a
cluster left running on this machine.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.checkpoints import smollm2_gguf_path

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
SESSION_MARK = "MESHPIPE_TEST_RAY_SESSION="

# Added to the executed copy only (the committed notebook stays as a user sees it): proves the
# environment reached the kernel, and names the kernel's Ray session so its processes can be found.
PROBE = f"""
import os, ray
assert os.environ.get("RAY_ADDRESS") == "local", os.environ.get("RAY_ADDRESS")
print("{SESSION_MARK}" + os.path.basename(ray._private.worker._global_node.get_session_dir_path()))
"""


def _ray_pids(session: str) -> list[int]:
    """Processes (raylet, gcs_server, workers, ...) of the Ray session named `session`."""
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    pids = []
    for line in ps.splitlines():
        pid, _, args = line.strip().partition(" ")
        if session in args and int(pid) != os.getpid():
            pids.append(int(pid))
    return pids


def _outputs(cell: dict) -> tuple[str, set[str]]:
    """A code cell's printed text (stdout, stderr, text/plain results) and its output MIME types."""
    text, mimes = [], set()
    for o in cell.get("outputs", []):
        if o["output_type"] == "stream":
            text.append(o["text"])
        elif o["output_type"] in ("execute_result", "display_data"):
            mimes.update(o["data"])
            text.append(o["data"].get("text/plain", ""))
        elif o["output_type"] == "error":
            text.append("\n".join(o["traceback"]))
    return "".join(text), mimes


def _run(notebook: Path, tmp_path: Path, edits: dict[str, str] | None = None) -> list[dict]:
    """Executes `notebook` in a fresh kernel whose working folder is `tmp_path` (the notebook's own folder's
    text files copied there); checks its Ray is gone afterwards; returns the executed code cells.
    `edits`: text replaced in the executed copy's code (each must be found)."""
    smollm2_gguf_path()  # skips without the SmolLM2 wheel
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")

    for data in notebook.parent.glob("*.txt"):
        shutil.copy(data, tmp_path / data.name)
    nb = nbformat.read(notebook, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    stripped = all(not c.get("outputs") and c.get("execution_count") is None for c in code_cells)
    assert stripped, "commit the notebook with its outputs cleared"
    init = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "ray.init(" in c.source)
    nb.cells.insert(init + 1, nbformat.v4.new_code_cell(PROBE))
    for old, new in (edits or {}).items():
        cell = next(c for c in code_cells if old in c.source)
        cell.source = cell.source.replace(old, new)

    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_DEDUP_LOGS": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.perf_counter()
    try:
        client.execute(env=env)  # kwargs reach the kernel manager's start_kernel: the kernel's environment
    finally:
        # The kernel is gone now (nbclient shuts it down even when a cell raised); its Ray must be too.
        session = next((line.removeprefix(SESSION_MARK) for c in nb.cells if c.cell_type == "code"
                        for line in _outputs(c)[0].splitlines() if line.startswith(SESSION_MARK)), None)
        stray = []
        if session:
            end = time.monotonic() + 20
            while (stray := _ray_pids(session)) and time.monotonic() < end:
                time.sleep(0.5)
            for pid in stray:  # ours: started by the kernel this test ran
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    print(f"{notebook.name} ran in {time.perf_counter() - t0:.1f} s")
    assert session, "the probe cell did not name the kernel's Ray session"
    assert not stray, f"processes of the kernel's Ray outlived it: {stray}"
    return [c for c in nb.cells if c.cell_type == "code"]


@pytest.mark.smollm2
@pytest.mark.timeout(900)
def test_quickstart_notebook_runs_top_to_bottom(tmp_path: Path) -> None:
    code = _run(NOTEBOOK, tmp_path)
    texts = [_outputs(c)[0] for c in code]
    images = [c for c in code if "image/png" in _outputs(c)[1]]
    assert any("Paris" in t for t in texts), "no output mentions Paris"
    assert len(images) >= 3, f"{len(images)} cells drew a figure (routes, recovery, throughput)"
    recovery = next((t for t in texts if "killed stage 1" in t), "")
    assert "recovered in" in recovery and "same text as a fault-free run" in recovery, recovery
    mermaid = next((t for t in texts if t.lstrip().startswith("graph LR")), "")
    assert "s0r1" in mermaid and "s1r1" in mermaid, f"not 2 replicas per stage: {mermaid!r}"
    taken = [int(n) for t in texts for n in re.findall(r"^(\d+) requests: stage-0/", t, re.M)]
    assert sum(taken) == 8, taken  # the routes the 2x2 deployment's 8 requests took
    rates = [line for t in texts for line in t.splitlines() if line.startswith("batch ")]
    assert len(rates) == 3 and all(re.search(r"pipeline [\d.]+ tokens/s, one process [\d.]+ tokens/s", line)
                                   for line in rates), rates  # the single-process baseline beside each bar


@pytest.mark.smollm2
@pytest.mark.timeout(900)
def test_finetune_notebook_trains_lora_and_the_held_out_loss_falls_by_a_fifth(tmp_path: Path) -> None:
    # a third of the notebook's 30 steps (CI time): README's figure is from the notebook as committed
    code = _run(ROOT / "notebooks" / "finetune.ipynb", tmp_path, edits={"STEPS = 30": "STEPS = 10"})
    texts = [_outputs(c)[0] for c in code]
    fell = next(t for t in texts if "held-out loss" in t)
    start, end = (float(x) for x in re.search(r"held-out loss ([\d.]+) -> ([\d.]+)", fell).groups())
    assert end <= 0.8 * start, fell
    assert any("image/png" in _outputs(c)[1] for c in code), "no loss curve drawn"
    after = next(t for t in texts if "after:" in t)
    assert "before:" in after and (tmp_path / "finetuned" / "config.json").is_file(), after
