"""W&B as its users expect it: its environment variables honoured, the run named after the run folder, the config
nested, the best val/error as the summary, one W&B run across `--ckpt_path` resumes, a one-line error for a
missing API key. Read back from the offline .wandb files (tests/wandb_records.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from capsdist.training.cli import main
from tests.conftest import TINY_MODEL, subprocess_env
from tests.wandb_records import read_run, wandb_files


def fit(root: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    """`python -m capsdist.train fit` of a tiny model into `root`, validating every 2 steps, with `env` added."""
    config = root.parent / "tiny.yaml"
    config.write_text(json.dumps({"model": TINY_MODEL}))
    argv = ["fit", f"--config={config}", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
            "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1", "--data.batch_size=16",
            "--data.num_workers=0", "--data.train_samples=160", "--data.val_samples=32",
            f"--trainer.default_root_dir={root}", *extra]  # fmt: skip
    clean = {k: v for k, v in subprocess_env(**env).items() if not k.startswith("WANDB_") or k in env}
    proc = subprocess.run([sys.executable, "-m", "capsdist.train", *argv], env=clean, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.slow
def test_wandb_env_vars_run_name_nested_config_best_summary_and_resume(tmp_path: Path) -> None:
    root, wandb_dir = tmp_path / "mnist-tiny", tmp_path / "wandb-here"
    env = {"WANDB_PROJECT": "from-env", "WANDB_ENTITY": "team-env", "WANDB_RUN_GROUP": "group-env",
           "WANDB_DIR": str(wandb_dir)}  # fmt: skip
    fit(root, env, "--trainer.max_steps=6")
    assert not (root / "wandb").exists() and (root / "config.yaml").is_file()  # W&B files in $WANDB_DIR only
    (first,) = wandb_files(wandb_dir)
    run = read_run(first)
    assert run["run"] == {"id": run["run"]["id"], "name": "mnist-tiny", "project": "from-env",
                          "entity": "team-env", "group": "group-env"}  # fmt: skip
    assert run["config"]["model"]["primary_dim"] == TINY_MODEL["primary_dim"]  # nested, not one YAML string
    assert run["config"]["data"]["source"] == "mnist" and run["config"]["trainer"]["max_steps"] == 6
    errors = [row["val/error"] for row in run["history"] if "val/error" in row]
    assert len(errors) == 3 and run["metric"]["val/error"].summary.min
    assert run["summary"]["val/error"] == {"min": min(errors)}

    fit(root, env, "--trainer.max_steps=8", "--ckpt_path=last")  # a local resume continues the same W&B run
    files = wandb_files(wandb_dir)
    assert len(files) == 2 and {read_run(f)["run"]["id"] for f in files} == {run["run"]["id"]}


def test_wandb_mode_from_the_environment(tmp_path: Path) -> None:
    """WANDB_MODE=disabled (no flag) means no W&B at all, as for any W&B program."""
    fit(tmp_path / "run", {"WANDB_MODE": "disabled"}, "--trainer.max_steps=2")
    assert not list(tmp_path.rglob("*.wandb")) and not (tmp_path / "run" / "wandb").exists()


def test_online_without_api_key_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--wandb_mode=online", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1"])
    assert exit_.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("capsdist")]
    assert len(err) == 1 and "API key" in err[0] and "wandb login" in err[0]
