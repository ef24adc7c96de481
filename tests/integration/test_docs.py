"""Documented entry points cannot rot: every config in configs/, every `python -m` command and every ```python
example in README.md and docs/*.md runs; the site builds with `mkdocs build --strict`; README stays short."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from capsdist.training.cli import main as train_main
from tests.conftest import REPO, TINY

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]  # where commands are documented
README_MAX_LINES = 150  # the README is the front page; the manual is docs/

CONFIG_STACKS = [
    ["quickstart.yaml"],
    ["mnist.yaml"],
    ["mnist_large_batch.yaml"],
    *[["mnist.yaml", f"ablation/{p.name}"] for p in sorted((REPO / "configs/ablation").glob("*.yaml"))],
    ["multimnist.yaml"],
    ["multimnist.yaml", "multimnist_onthefly.yaml"],
    ["multimnist.yaml", "multimnist_onthefly.yaml", "multimnist_cpu.yaml"],
    ["large.yaml"],
    ["large_cpu.yaml"],
    *[["large.yaml", f"strategy/{p.name}"] for p in sorted((REPO / "configs/strategy").glob("*.yaml"))],
]
# what makes any config quick on CPU: the tiny model and data settings, two steps, one validation batch
QUICK = [
    *TINY[:-3],
    "--trainer.precision=32",
    "--trainer.max_steps=2",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--model.log_images_every_n_steps=0",
    "--data.batch_size=8",
    "--data.num_workers=0",
    "--wandb_mode=disabled",
]


def test_every_config_is_in_a_stack() -> None:
    used = {name for stack in CONFIG_STACKS for name in stack}
    assert {str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml")} == used


@pytest.mark.parametrize("stack", CONFIG_STACKS, ids="+".join)
def test_config_parses(stack: list[str], capsys: pytest.CaptureFixture) -> None:
    """Each config (stack) parses and resolves in the CLI, legacy `data.source` included."""
    configs = [arg for name in stack for arg in ("--config", str(REPO / "configs" / name))]
    with pytest.raises(SystemExit) as exit_:
        train_main(["fit", *configs, "--print_config"])
    assert exit_.value.code in (0, None)
    assert "source: " in capsys.readouterr().out


@pytest.mark.parametrize(
    "stack", [["quickstart.yaml"], ["mnist.yaml"], ["multimnist.yaml"], ["multimnist.yaml", "multimnist_onthefly.yaml"]]
)
def test_config_trains_two_steps(stack: list[str], shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Each data source's config really trains (tiny model, shards from the fixture)."""
    configs = [arg for name in stack for arg in ("--config", str(REPO / "configs" / name))]
    data = [f"--data.train_shards={shards}", f"--data.val_shards={shards}"] if stack == ["multimnist.yaml"] else []
    data += ["--data.train_batches_per_epoch=4", "--data.shuffle_buffer=10"] if stack == ["multimnist.yaml"] else []
    train_main(["fit", *configs, *QUICK, *data, f"--trainer.default_root_dir={tmp_path}"])
    assert '"global_step": 2' in capsys.readouterr().out


def readme_commands() -> list[list[str]]:
    """Every `python -m ...` (and `torchrun ... -m ...`) command in the code blocks of README.md and docs/*.md, as argv.

    Continuation lines are joined and comments dropped; a command documented on several pages is listed once."""
    commands = []
    for page in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                for part in line.split("&&"):
                    argv = shlex.split(part, comments=True)
                    if argv[:2] == ["python", "-m"]:
                        argv = argv[2:]
                    elif argv[:1] == ["torchrun"] and "-m" in argv:  # torchrun [launcher flags] -m module ...
                        argv = argv[argv.index("-m") + 1 :]
                    else:
                        continue
                    if argv not in commands:
                        commands.append(argv)
    return commands


def test_readme_is_the_front_page() -> None:
    """README.md stays short (the manual lives in docs/) and keeps the test command CI runs verbatim."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    ci = "bash scripts/install_slurm.sh && pip install torch==2.13.0 -e '.[test]'"
    ci += " && ruff check . && python -m pytest -q"  # .ci/run runs exactly this line
    assert f"```bash\n{ci}\n```" in readme


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs not installed: pip install -e '.[docs]'")
def test_docs_site_builds_strict(tmp_path: Path) -> None:
    """`mkdocs build --strict`: every page in the nav, no broken link or anchor, every API object found."""
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "api" / "index.html").is_file()


PYTHON_PAGES = [page for page in DOCS if "```python" in page.read_text()]
ONNX = ("onnx", "onnxscript")  # what an example's torch.onnx.export(dynamo=True) needs (the export extra)


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=lambda page: page.name)
def test_python_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    """Each ```python block of a page runs as written: in order, in one namespace (a later example goes on from an
    earlier one's objects), in a temporary folder; on one torch thread (their tensors are small)."""
    text = page.read_text()
    if "torch.onnx.export" in text and not all(importlib.util.find_spec(name) for name in ONNX):
        pytest.skip(f"{page.name} exports to ONNX: pip install -e '.[test]' (the export extra: onnx, onnxscript)")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", text, re.S), 1):
        exec(compile(block, f"{page.name}, python block {i}", "exec"), namespace)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained checkpoint standing in for the README's runs/*/checkpoints/*.ckpt."""
    root = tmp_path_factory.mktemp("ckpt")
    quick = [*QUICK, "--trainer.val_check_interval=2"]  # a validation, so a best-*.ckpt for `--ckpt_path best`
    train_main(["fit", *quick, "--data.source=mnist", "--data.train_samples=64", f"--trainer.default_root_dir={root}"])
    return root / "checkpoints" / "last.ckpt"


def _replace(argv: list[str], flag: str, value: str) -> list[str]:
    """argv with ``flag``'s value replaced (or the flag added)."""
    if flag in argv:
        i = argv.index(flag)
        return [*argv[: i + 1], value, *argv[i + 2 :]]
    return [*argv, flag, value]


def test_readme_commands_run(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Each documented command runs: for real where it is quick (tiny overrides), else through its full parser."""
    from capsdist import bench
    from capsdist.checkpoint import __main__ as checkpoint_cli
    from capsdist.tools import evaluate, figures, report
    from data_prep import mnist, multimnist

    commands = readme_commands()
    assert len(commands) >= 15, commands
    seen = set()
    for i, (module, *argv) in enumerate(commands):
        seen.add(module)
        if module == "capsdist.train" and argv[0] in ("test", "predict"):  # quick for real on the tiny checkpoint
            root = checkpoint.parents[1]
            limits = ["--trainer.limit_test_batches=2", "--trainer.limit_predict_batches=2"]
            train_main([*argv, *QUICK, *limits, f"--trainer.default_root_dir={root}"])
            out = capsys.readouterr().out
            assert '"test/acc"' in out if argv[0] == "test" else (root / "predictions.csv").is_file(), out
        elif module == "capsdist.train":
            with pytest.raises(SystemExit) as exit_:
                train_main([*argv, "--print_config"])
            assert exit_.value.code in (0, None), argv
        elif module == "capsdist.bench":
            bench.parse_args(argv)  # a GPU, compile and the full CPU sweep are too slow here; the flags must parse
        elif module in ("capsdist.evaluate", "capsdist.figures"):
            if "--weights" not in argv:  # the shipped pretrained weights are real; a README checkpoint is made here
                argv = _replace(argv, "--ckpt", str(checkpoint))
            argv = _replace(argv, "--data.val_samples", "32")
            argv = _replace(argv, "--out", str(tmp_path / f"fig{i}")) if "--out" in argv else argv
            (evaluate if module == "capsdist.evaluate" else figures).main([*argv, "--device", "cpu"])
        elif module == "data_prep.mnist":
            assert mnist.main(argv) == 0
        elif module == "data_prep.multimnist":
            if argv[:1] == ["verify"]:  # the folder the docs' previous shard command wrote, made small above
                argv = ["verify", str(max(tmp_path.glob("shards*"), key=lambda p: int(p.name.removeprefix("shards"))))]
            elif "--benchmark" in argv:
                argv = [*argv, "--num_samples", "100"]
            else:
                if "--per_digit" in argv:  # the paper's 60M samples: make it 20
                    i_per = argv.index("--per_digit")
                    argv = argv[:i_per] + argv[i_per + 2 :]
                argv = _replace(_replace(argv, "--num_samples", "20"), "--out", str(tmp_path / f"shards{i}"))
                argv = _replace(_replace(argv, "--workers", "1"), "--shard_size", "10")
            assert multimnist.main(argv) == 0, argv
        elif module == "capsdist.report":  # the fixture's run folder stands in for runs/ablation/*
            report.main([str(checkpoint.parents[1]), *(a for a in argv if a.startswith("--"))])
            assert capsys.readouterr().out.startswith("| run | routing iterations |")
        elif module == "capsdist.checkpoint":  # needs a sharded run: tests/integration/test_large_run.py
            checkpoint_cli.parser().parse_args(argv)
        elif module == "pytest":
            continue  # the test command itself
        elif module == "venv":
            continue  # "Install from a wheel": tests/integration/test_wheel.py runs that section
        else:
            pytest.fail(f"the docs document `python -m {module}`, which this test does not know how to run")
        capsys.readouterr()
    assert seen >= {"capsdist.train", "capsdist.bench", "capsdist.evaluate", "capsdist.figures", "data_prep.multimnist"}
