"""bench/gpu.py --smoke: the GPU check's code on the CPU at toy sizes, so that GPU time is never
spent on a typo."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["parity"] and all(check["passed"] for check in report["parity"])
    assert [r["preset"] for r in report["shapes"]] == ["distilgpt2", "gpt2-large", "gpt2-xl", "llama-2-7b"]
    assert all(r["seconds_per_step"] > 0 and all(loss > 0 for loss in r["losses"]) for r in report["shapes"])
    served = {(r["preset"], r["bank_documents"]) for r in report["serving"]}
    assert served == {(p, n) for p in ("distilgpt2", "llama-2-7b") for n in (100, 200)}
    assert "all passed" in done.stdout


def test_a_missing_package_stops_it_in_one_line(tmp_path):
    blocker = tmp_path / "sitecustomize.py"  # gguf looks uninstalled, as on a bare GPU machine
    blocker.write_text(
        "import importlib.metadata as m\n"
        "_version = m.version\n"
        "def version(name):\n"
        "    if name == 'gguf':\n"
        "        raise m.PackageNotFoundError(name)\n"
        "    return _version(name)\n"
        "m.version = version\n"
    )
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode != 0 and done.stderr.strip().splitlines() == [
        "bench/gpu.py: gguf is missing: carry the wheels listed in docs/RESULTS.md, 'GPU'"
    ]
