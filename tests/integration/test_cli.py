"""The `meshpipe` console script, run as a subprocess (each `generate` starts its own local Ray)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models import load_model
from tests.checkpoints import make_tiny_gguf, make_tiny_llama, smollm2_gguf_path


def meshpipe(*args: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    exe = shutil.which("meshpipe")
    cmd = [exe] if exe else [sys.executable, "-m", "actors.cli"]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **env}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)


@pytest.mark.smollm2
def test_pull_installed_model_prints_its_path() -> None:
    path = smollm2_gguf_path()
    r = meshpipe("pull", "smollm2-135m")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(path)


def test_a_cluster_refusing_the_auth_token_is_named_as_such(ray_cluster: dict) -> None:
    """Ray 2.60 clusters check a token: a driver without the cluster's is told to bring it, not that no
    cluster is there."""
    r = meshpipe("generate", "--address", ray_cluster["gcs_address"], "--name", "any", "--prompt", "hi",
                 timeout=120, RAY_AUTH_TOKEN="0" * 32, RAY_NUM_REDIS_GET_RETRIES="1")  # one try, not 20 s
    assert r.returncode != 0 and "refused this machine's auth token" in r.stderr, r.stderr[-2000:]
    assert "ray get-auth-token" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.ray
def test_generate_token_ids_on_tiny_checkpoint_matches_single_process(tmp_path: Path) -> None:
    folder = make_tiny_llama(tmp_path / "tiny")
    n = 8
    want = load_model(folder).generate([1, 2, 3], max_new_tokens=n)[0]
    r = meshpipe("generate", "--model", str(folder), "--stages", "2", "--prompt-ids", "1,2,3",
                 "--max-new-tokens", str(n), "--speculative", "3", "--draft-model", str(folder), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(got) == {"text", "token_ids", "finish_reason", "usage", "speculation"}
    spec = got["speculation"]  # the model drafting for itself: drafts verified through the stages, all kept
    assert spec["accepted"] == spec["drafted"] > 0 and spec["passes"] < n
    assert got["token_ids"] == want.token_ids
    assert got["finish_reason"] == want.finish_reason
    assert got["usage"] == want.usage


def test_unknown_model_is_one_error_line_and_exit_2(tmp_path: Path) -> None:
    r = meshpipe("generate", "--model", str(tmp_path / "no-such-model"), "--prompt-ids", "1,2,3")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ")
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


def test_serve_with_an_unknown_model_is_one_error_line_before_any_ray(tmp_path: Path) -> None:
    r = meshpipe("serve", "--model", str(tmp_path / "no-such-model"), timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "no-such-model" in r.stderr
    assert "Started a local Ray" not in r.stderr
    r = meshpipe("serve", "--detach", timeout=60)
    assert r.returncode == 2 and "--detach needs --address" in r.stderr
    (tmp_path / "cert.pem").write_text("not a certificate")
    for tls in (["--tls-cert", str(tmp_path / "cert.pem")],
                ["--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "cert.pem")]):
        r = meshpipe("serve", *tls, timeout=60)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and "--tls-" in r.stderr, r.stderr
        assert "Started a local Ray" not in r.stderr and "not a certificate" not in r.stderr


def test_prompt_and_prompt_ids_are_exclusive() -> None:
    r = meshpipe("generate", "--prompt", "hi", "--prompt-ids", "1,2")
    assert r.returncode == 2
    assert "exactly one of --prompt and --prompt-ids" in r.stderr


@pytest.mark.smollm2
def test_demo_answers_with_paris_and_prints_the_route_and_speed() -> None:
    smollm2_gguf_path()
    r = meshpipe("demo", "--max-new-tokens", "8")  # README's main command (with a shorter answer)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Paris" in r.stdout
    assert "route: router -> stage-0/replica-0 -> stage-1/replica-0 -> stage-2/replica-0 -> stage-3/replica-0 " \
        "-> stage-0/replica-0 (decode ring" in r.stdout  # the default data path, named as it runs
    assert "meshpipe/demo/" not in r.stdout  # the table names replicas as the route does
    assert "tokens/s" in r.stdout
    assert "reading weights" in r.stderr and "starting stages" in r.stderr  # the progress bars


def test_bench_gpu_help_lists_its_options() -> None:
    r = meshpipe("bench", "gpu", "--help", timeout=60)
    assert r.returncode == 0, r.stderr
    for option in ("--stages", "--batches", "--new-tokens", "--device", "--layers", "--dim", "--heads",
                   "--kv-heads", "--hidden", "--vocab", "--dtype", "--repeats", "--parity", "--budget-s"):
        assert option in r.stdout, option
    r = meshpipe("bench", "--help", timeout=60)  # the moved sub-app keeps every command
    for command in ("pipeline", "planner", "placement", "simulate", "calibrate", "overhead", "codecs",
                    "channels", "http", "gpu"):
        assert command in r.stdout, command


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_train_lora_in_2_stages_x_2_copies_then_generate_serves_the_result(tmp_path: Path) -> None:
    """`meshpipe train` (a tiny GGUF with its own tokenizer, LoRA r=8, S=2 x D=2, three steps on the shipped
    text) writes a Hugging Face folder with the tokenizer, its loss history and curve; `meshpipe generate
    --model DIR` serves it. (SmolLM2 trains in the fine-tuning notebook's test.)"""
    gguf = make_tiny_gguf(tmp_path / "tiny.gguf", make_tiny_llama(tmp_path / "hf", n_layers=4))
    data = Path(__file__).resolve().parents[2] / "notebooks" / "finetune.txt"
    out = tmp_path / "tuned"
    r = meshpipe("train", "--model", str(gguf), "--data", str(data), "--out", str(out), "--stages", "2",
                 "--data-parallel", "2", "--lora-r", "8", "--steps", "3", "--seq-len", "32", "--batch-size", "4",
                 "--eval-every", "3", "--lr", "1e-2", "--checkpoint-every", "2", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trained 3 steps (3 in all)" in r.stdout and "training" in r.stderr  # the tqdm bar on stderr
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [0, 1, 2, 3] and history[-1]["eval_loss"] < history[0]["eval_loss"]
    assert json.loads((out / "checkpoint" / "trainer.json").read_text())["steps"] == 2
    # the run stopped at its checkpoint, resumed: step 3 draws the same batch and reaches the same loss
    again = meshpipe("train", "--resume", str(out / "checkpoint"), "--data", str(data), "--out", str(tmp_path / "t2"),
                     "--steps", "3", "--batch-size", "4", "--eval-every", "3", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "trained 1 step (3 in all)" in again.stdout
    rest = json.loads((tmp_path / "t2" / "history.json").read_text())
    assert [h["step"] for h in rest] == [2, 3] and abs(rest[-1]["loss"] - history[-1]["loss"]) < 1e-5
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    g = meshpipe("generate", "--model", str(out), "--prompt", "Day 7. The pipeline served", "--max-new-tokens",
                 "4", "--json")
    assert g.returncode == 0, g.stderr[-3000:]
    assert len(json.loads(g.stdout.strip().splitlines()[-1])["token_ids"]) == 4


def test_train_with_a_missing_data_file_is_a_clear_error(tmp_path: Path) -> None:
    r = meshpipe("train", "--data", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o"), timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: --data") and "none.txt is not a file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


WORKER_DIES = """
import json, os, sys, time
import ray
if sys.argv[1] == "guarded":
    from actors.cli_helpers import keep_stdout_for_results
    keep_stdout_for_results()
ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)

@ray.remote(num_cpus=0, max_retries=0)
def die():
    os._exit(1)

try:
    ray.get(die.remote())
except ray.exceptions.WorkerCrashedError:
    pass
deadline = time.monotonic() + 20  # Ray's error thread prints the worker's death a moment later
while time.monotonic() < deadline and "died" not in open(sys.argv[2]).read():
    time.sleep(0.2)
print(json.dumps({"ok": True}))
"""


@pytest.mark.ray
def test_ray_error_messages_never_reach_the_results_on_stdout(ray_cluster: dict, tmp_path: Path) -> None:
    """Ray's driver prints a dead worker's message to sys.stdout from a thread, whatever log_to_driver
    says (a CI run's `generate --json` once ended with it); the CLI sends other threads' output to stderr."""
    script = tmp_path / "dies.py"
    script.write_text(WORKER_DIES)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["gcs_address"], "PYTHONPATH": str(Path.cwd())}
    seen = {}
    for mode in ("unguarded", "guarded"):
        out, err = tmp_path / f"{mode}.out", tmp_path / f"{mode}.err"
        with out.open("w") as o, err.open("w") as e:
            r = subprocess.run([sys.executable, str(script), mode, str(err if mode == "guarded" else out)],
                               stdout=o, stderr=e, env=env, timeout=120, check=False)
        assert r.returncode == 0, err.read_text()[-2000:]
        seen[mode] = (out.read_text().strip().splitlines(), err.read_text())
    assert any("died" in line for line in seen["unguarded"][0])  # the hazard is real: Ray prints it there
    lines, stderr = seen["guarded"]
    assert lines == ['{"ok": true}'] and "died" in stderr
