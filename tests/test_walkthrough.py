"""The walkthrough (docs/YOUR-DATA.md, the README's Start here in full), run line by line as written (issue 16):
a folder of real Fashion-MNIST PNGs ->
data -> train -> evaluate -> export -> serve -> curl, with the served answer and the test accuracy checked."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def walkthrough_lines() -> list[str]:
    """The command lines of docs/YOUR-DATA.md's block between the walkthrough markers."""
    text = (REPO / "docs" / "YOUR-DATA.md").read_text()
    block = re.search(r"<!-- walkthrough:begin -->\n```bash\n(.*?)```\n<!-- walkthrough:end -->", text, re.S)
    assert block, "docs/YOUR-DATA.md has no walkthrough block"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def argv_of(line: str, port: int) -> list[str]:
    """A README line as argv: `tailwise` is this checkout's (python -m tailwise), `benchmarks/` and `experiments/` this
    checkout's, port 3000 a free one. Nothing else changes."""
    words = shlex.split(line.replace("3000", str(port)))
    if words[0] == "tailwise":
        return [sys.executable, "-m", "tailwise", *words[1:]]
    if words[0] == "python":
        return [sys.executable, *(str(REPO / w) if w.startswith(("benchmarks/", "experiments/")) else w for w in words[1:])]
    return words


def curl_with_httpx(argv: list[str], cwd: Path) -> dict:
    """`curl -F name=@file -F name=value URL`, run in `cwd`, sent as the same multipart POST (no curl binary
    needed)."""
    files, fields, url = [], {}, None
    it = iter(argv[1:])
    for word in it:
        if word == "-F":
            name, _, value = next(it).partition("=")
            if value.startswith("@"):
                path = cwd / value[1:]
                files.append((name, (path.name, path.read_bytes(), "image/png")))
            else:
                fields[name] = value
        else:
            url = word
    response = httpx.post(url, files=files, data=fields, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.slow
@pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST not installed at /usr/share/datasets/fashion-mnist "
                           "(apt-get install dataset-fashion-mnist)")
def test_readme_walkthrough_from_a_folder_to_a_served_model(tmp_path):
    lines = walkthrough_lines()
    assert [shlex.split(line)[:2] for line in lines] == [
        ["python", "experiments/make_folder.py"], ["tailwise", "data"], ["tailwise", "train"],
        ["tailwise", "evaluate"], ["tailwise", "export"], ["tailwise", "evaluate"], ["tailwise", "serve"],
        ["curl", "-F"]]
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "BENTOML_HOME": str(tmp_path / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "true"}
    outputs, server = {}, None
    try:
        for line in lines:
            argv = argv_of(line.removesuffix("&").strip(), port)
            if line.endswith("&"):
                server = subprocess.Popen(argv, cwd=tmp_path, env=env, start_new_session=True,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                deadline = time.monotonic() + 180
                while True:
                    assert server.poll() is None, f"{line}: exited with {server.returncode}: {server.stderr.read()}"
                    try:
                        if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert time.monotonic() < deadline, f"{line}: not ready after 180 s"
                    time.sleep(0.5)
            elif argv[0] == "curl":
                outputs["curl"] = curl_with_httpx(argv, tmp_path)
            else:
                done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
                assert done.returncode == 0, f"{line}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
                key = argv[3] if argv[2] == "tailwise" or argv[1] == "-m" else "make"
                outputs[key + (" --data" if key == "evaluate" and "--data" in argv else "")] = done.stdout
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)

    data_out = tmp_path / "runs" / "fmnist-folder-data"
    card = json.loads((data_out / "data.json").read_text())
    assert (data_out / "class_counts.png").stat().st_size > 0 and len(card["class_names"]) == 10
    assert "many: more than" in outputs["data"] and "#" in outputs["data"]
    assert "plan (each line" in outputs["train"] and "estimated time:" in outputs["train"]
    assert "data.image_size       = 28" in outputs["train"]
    report = json.loads((tmp_path / "runs" / "fmnist-folder" / "eval" / "report.json").read_text())
    assert report["num_samples"] == 500
    assert report["logit_adjusted"]["top1"] > 0.4, report["logit_adjusted"]["top1"]   # chance: 0.1
    assert "served" in outputs["evaluate"] and "Ankle boot" in outputs["evaluate"]
    assert (tmp_path / "models" / "fmnist-folder" / "model.onnx").exists()
    # the exported model on the test folder as a labelled folder: the run's served numbers (issue 25, item 9)
    folder_report = outputs["evaluate --data"]
    assert folder_report.startswith("data/fmnist-folder/test, 500 images")
    served_top1 = float(re.search(r"^overall \(top-1\) +[\d.]+ % +([\d.]+) %", folder_report, re.M).group(1))
    assert abs(served_top1 - 100 * report["logit_adjusted"]["top1"]) <= 0.5, (served_top1, report["logit_adjusted"])
    answer = outputs["curl"]["predictions"]
    assert len(answer) == 3 and answer[0]["label"] in card["class_names"]
    assert {p["group"] for p in answer} <= {"many", "medium", "few"}
    assert abs(sum(p["probability"] for p in answer) - 1) < 1 and answer[0]["probability"] >= answer[1]["probability"]
