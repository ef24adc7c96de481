"""The wheel works outside a checkout: built with `pip wheel`, installed (not editable) into a fresh virtual
environment, and run from a folder outside the checkout with no PYTHONPATH, as a user who ran `pip install` would.

torch and Lightning come from the interpreter running the tests, wherever its packages are (the system's, or a
virtual environment's: `--system-site-packages` would give the base interpreter's instead), through a path file
that lists its site-packages folders and so runs none of their own path files (an editable capsdist stays out);
nothing is downloaded. The assertion on `capsdist.__file__` proves the checkout is not what runs.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, SHIPPED

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip wheel --no-deps` of a copy of the checkout's files (git's tracked and unignored ones): no stale build/
    folder of an earlier build leaks into the wheel, and nothing is written into the checkout."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)]
    subprocess.run(cmd, check=True, env=user_env(out), cwd=out, timeout=300)
    (built,) = out.glob("capsdist-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel installed (its bin/ folder), by this interpreter's pip pointed at
    the venv's Python (`pip --python`, pip 22.3 or later): a venv of its own pip costs 5 s of CPU in ensurepip and
    tests nothing here."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=300)
    ask = [str(root / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    purelib = Path(subprocess.run(ask, capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "test-host-packages.pth").write_text("\n".join(host_site_packages()) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(root / "bin" / "python"), "install", "-q", "--no-deps",
           "--no-index", str(wheel)]
    subprocess.run(pip, check=True, env=user_env(root), timeout=300)
    return root / "bin"


def host_site_packages() -> list[str]:
    """The site-packages folders of the interpreter running the tests (a venv's own, then its base's, if any)."""
    return [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]


def user_env(home: Path, **extra: str) -> dict[str, str]:
    """A user's environment: no PYTHONPATH (the checkout is not importable), its own HOME, no GPU."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith(("WANDB_", "CAPSDIST_"))}
    return {**env, "HOME": str(home), "CUDA_VISIBLE_DEVICES": "", **extra}


def run(cmd: list[str], cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    """A command of the venv, run from `cwd` (outside the checkout)."""
    (cwd / "home").mkdir(parents=True, exist_ok=True)
    env = user_env(cwd / "home", **extra)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def mirror() -> Iterator[str]:
    """The shipped MNIST files served over loopback HTTP: a download mirror for a machine without network."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(SHIPPED))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_wheel_holds_configs_weights_and_license_and_one_top_level_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"capsdist", f"{wheel.name.split('-py3')[0]}.dist-info"}
    configs = {str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")}
    assert {f"capsdist/{c}" for c in configs} <= set(names)
    assert "capsdist/weights/capsnet-mnist.safetensors" in names
    code = {str(p.relative_to(REPO)) for p in (REPO / "capsdist").rglob("*.py")}
    assert code - set(names) == set(), "add the new package to pyproject's [tool.setuptools] packages"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_quickstart_evaluate_and_console_scripts_outside_the_checkout(venv: Path, tmp_path: Path) -> None:
    where = run([str(venv / "python"), "-c", "import capsdist; print(capsdist.__file__)"], tmp_path)
    assert where.stdout.startswith(str(venv.parent)), where.stdout + where.stderr
    # README's quickstart by its shipped name, for 3 steps, MNIST from the repository's copy via the documented variable
    fit = [str(venv / "capsdist-train"), "fit", "--config", "quickstart", "--trainer.max_steps", "3"]
    fit += ["--data.train_samples", "256", "--data.val_samples", "64", "--data.num_workers", "0"]
    done = run([*fit, "--trainer.default_root_dir", "runs/quickstart"], tmp_path, CAPSDIST_MNIST_DIR=str(SHIPPED))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["global_step"] == 3
    assert (tmp_path / "runs/quickstart/config.yaml").is_file()
    assert (tmp_path / "runs/quickstart/checkpoints/last.ckpt").is_file()
    # the shipped pretrained model by name
    score = [str(venv / "capsdist-evaluate"), "--weights", "capsnet-mnist", "--data.val_samples", "200"]
    scored = run([*score, "--device", "cpu"], tmp_path, CAPSDIST_MNIST_DIR=str(SHIPPED))
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert json.loads(scored.stdout)["acc"] > 0.95 and json.loads(scored.stdout)["samples"] == 200
    report = run([str(venv / "capsdist-report"), "runs/quickstart", "--format", "json"], tmp_path)
    assert json.loads(report.stdout)[0]["steps"] == 3, report.stderr
    usage = run([str(venv / "capsdist-report"), "--help"], tmp_path)
    assert usage.stdout.startswith("usage: capsdist-report"), usage.stdout
    listed = run([str(venv / "capsdist-train"), "configs"], tmp_path)
    assert "quickstart" in listed.stdout and "strategy/fsdp" in listed.stdout
    assert run([str(venv / "capsdist-train"), "--help"], tmp_path).stdout.startswith("usage: capsdist-train")
    shards = [str(venv / "capsdist-shards"), "--split", "test", "--num_samples", "20", "--shard_size", "10"]
    made = run([*shards, "--workers", "1", "--out", "shards"], tmp_path, CAPSDIST_MNIST_DIR=str(SHIPPED))
    assert made.returncode == 0 and len(list((tmp_path / "shards").glob("*.tar"))) == 2, made.stderr[-3000:]


def test_mnist_downloads_into_the_cache_or_fails_before_any_run_output(venv: Path, tmp_path: Path, mirror: str) -> None:
    """No MNIST outside a checkout: `capsdist-mnist` downloads it into ~/.cache/capsdist/mnist from a mirror; with
    no reachable mirror, training stops with the fix before a run folder or W&B run exists."""
    fit = [str(venv / "capsdist-train"), "fit", "--config", "quickstart", "--trainer.default_root_dir", "runs/q"]
    failed = run(fit, tmp_path / "offline", CAPSDIST_MNIST_MIRRORS="http://127.0.0.1:9/")
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "could not download" in failed.stderr and "CAPSDIST_MNIST_DIR" in failed.stderr
    assert "`capsdist-mnist --dir" in failed.stderr and "data_prep" not in failed.stderr  # the wheel's command
    assert "Traceback" not in failed.stderr and not (tmp_path / "offline" / "runs").exists()
    fetched = run([str(venv / "capsdist-mnist")], tmp_path / "online", CAPSDIST_MNIST_MIRRORS=mirror)
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    cache = tmp_path / "online" / "home" / ".cache" / "capsdist" / "mnist"
    assert fetched.stdout.strip().splitlines()[-1] == str(cache)
    assert len(list(cache.glob("*-ubyte.gz"))) == 4
