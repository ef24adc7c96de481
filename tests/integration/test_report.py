"""`python -m capsdist.report`: Table 1 rows read back from real run folders, and the ablation as a SLURM array."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
import yaml

from capsdist.tools import report
from capsdist.training.cli import main as train
from tests.conftest import REPO, TINY, TINY_MODEL
from tests.slurm_cluster import SlurmCluster, free_port
from tests.wandb_records import finished_records


def fit_summary(root: Path, capsys: pytest.CaptureFixture, *flags: str) -> dict:
    """A tiny fit into `root` (4 steps unless flags say otherwise); the JSON summary it prints."""
    train(["fit", *TINY, "--trainer.max_steps=4", "--data.train_samples=128", "--data.val_samples=64",
           "--trainer.val_check_interval=2", f"--trainer.default_root_dir={root}", "--wandb_mode=disabled",
           *flags])  # fmt: skip
    return json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1])


def test_report_rows_of_two_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ablated = fit_summary(tmp_path / "r1", capsys, "--model.routing_iterations=1", "--model.reconstruction=false")
    fit_summary(tmp_path / "r3", capsys, "--trainer.max_steps=2")
    full = fit_summary(tmp_path / "r3", capsys, "--ckpt_path=last")  # resumed: a second CSV version
    runs = [str(tmp_path / "r1"), str(tmp_path / "r3")]

    report.main([*runs, "--format", "json"])
    rows = json.loads(capsys.readouterr().out)
    assert [(r["run"], r["routing_iterations"], r["reconstruction"], r["steps"]) for r in rows] == [
        ("r1", 1, False, 4),
        ("r3", 3, True, 4),
    ]
    for row, summary in zip(rows, (ablated, full), strict=True):
        assert row["final_val_error"] == pytest.approx(summary["val/error"], abs=1e-5)  # the summary rounds
        assert row["best_val_error"] <= row["final_val_error"]
        assert row["images_per_s"] > 0 and 0 < row["wall_time_s"] < 120 and row["test_error"] is None

    versions = [list(csv.DictReader(p.open())) for p in sorted((tmp_path / "r3" / "csv").glob("*/metrics.csv"))]
    elapsed = [max(float(r["time/elapsed_s"]) for r in v if r["time/elapsed_s"]) for v in versions]
    assert len(elapsed) == 2 and rows[1]["wall_time_s"] == pytest.approx(sum(elapsed))  # both processes' time

    report.main(runs)
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| run | routing iterations | reconstruction | steps | best val error")
    assert table[2].startswith("| r1 | 1 | no | 4 | ") and table[3].startswith("| r3 | 3 | yes | 4 | ")
    assert f"{100 * full['val/error']:.2f}%" in table[3]

    report.main([*runs, "--format", "csv"])
    parsed = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["routing_iterations"] for r in parsed] == ["1", "3"]


def test_report_of_a_folder_that_is_no_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "not a capsdist run folder" in err and "Traceback" not in err


def test_report_prints_the_rows_it_can_and_names_what_it_skipped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`capsdist-report runs/*` over a finished run, a short one with no CSV metrics (W&B off: config.yaml still in
    the run folder), a crashed one (damaged checkpoint) and a folder that is no run: two rows, two named skips."""
    fit_summary(tmp_path / "done", capsys)
    fit_summary(tmp_path / "short", capsys, "--trainer.max_steps=1", "--trainer.log_every_n_steps=50",
                "--trainer.limit_val_batches=0")  # fmt: skip
    assert (tmp_path / "short" / "config.yaml").is_file() and not list(tmp_path.glob("short/csv/*/metrics.csv"))
    (tmp_path / "crashed" / "checkpoints").mkdir(parents=True)
    (tmp_path / "crashed" / "config.yaml").write_text((tmp_path / "done" / "config.yaml").read_text())
    (tmp_path / "crashed" / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 torn")
    (tmp_path / "notes").mkdir()
    report.main([str(tmp_path / name) for name in ("crashed", "done", "notes", "short")] + ["--format", "json"])
    out, err = capsys.readouterr()
    assert [(r["run"], r["steps"]) for r in json.loads(out)] == [("done", 4), ("short", 1)]
    skipped = [line for line in err.splitlines() if "skipped" in line]
    assert len(skipped) == 2 and "crashed" in skipped[0] and "not a capsdist run folder" in skipped[1], err
    assert "Traceback" not in err


@pytest.mark.slurm
@pytest.mark.slow
def test_ablation_array_runs_each_row_into_its_own_folder(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """`sbatch --array=0-1 slurm/ablation.sbatch` (tiny model on top of configs/mnist.yaml + the row overlays):
    both tasks COMPLETED, one run folder per row in W&B group `ablation`, and the report has both rows."""
    tiny = {
        "trainer": {"accelerator": "cpu", "precision": 32, "max_steps": 3, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "log_every_n_steps": 1},
        "model": {**TINY_MODEL, "caps_layers": [[10, 8]]},
        "data": {"batch_size": 8, "num_workers": 0, "train_samples": 24, "val_samples": 16},
    }  # fmt: skip
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()),
           "CAPSDIST_HOME": str(REPO)}  # fmt: skip
    job = slurm_cluster.sbatch(
        REPO / "slurm" / "ablation.sbatch", "--config", str(tmp_path / "tiny.yaml"), "--wandb_mode=offline",
        options=["--array=0-1", "--gpus-per-node=0", "--cpus-per-task=1", f"--chdir={tmp_path}"], env=env,
    )  # fmt: skip
    logs = lambda: "\n".join(p.read_text(errors="replace")[-3000:] for p in tmp_path.glob("*.out"))  # noqa: E731
    for task in (0, 1):
        assert slurm_cluster.wait_for_state(f"{job}_{task}", [], timeout=300) == "COMPLETED", logs()
    runs = sorted((tmp_path / "runs" / "ablation").iterdir())
    assert [r.name for r in runs] == ["routing1_norecon", "routing1_recon"]
    for run in runs:
        (wandb_run,) = run.glob("wandb/offline-run-*")
        groups = {r.run.run_group for r in finished_records(wandb_run) if r.WhichOneof("record_type") == "run"}
        assert groups == {"ablation"}
    rows = [report.summarize(run) for run in runs]
    assert [(r["routing_iterations"], r["reconstruction"], r["steps"]) for r in rows] == [(1, False, 3), (1, True, 3)]
