"""Hostile and broken files through the commands users run (issue 19 items 1, 2, 5): nothing from a file runs a
command, nothing from a file grows memory without bound, and each case is one paragraph with exit 2.

The cases that bound memory (or need a file-size limit) run as subprocesses under an address-space cap
(RLIMIT_AS), so a regression fails here instead of taking the machine's memory; peaks are the child's
``ru_maxrss``. The refusals that bound nothing else run the commands' ``main`` in this process: the check comes
before any work, and a subprocess would only add seconds of imports (the brace bomb keeps one real `evaluate`
process refusing a planted shard setting).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from capsdist.checkpoint import __main__ as convert
from capsdist.checkpoint.weights import CONFIG_KEY
from capsdist.model import CapsNet
from capsdist.tools import evaluate, figures, pretrained
from capsdist.training import cli as train
from tests.conftest import REPO, TINY, TINY_MODEL, TINY_NET, refused, subprocess_env, tiny_checkpoint

AS_CAP = 4 << 30  # bytes of address space per command: far above a good run (~1.5 GB), far below a bomb
PEAK = "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
PEAK += "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)"
TINY_RUN = [*TINY[:4], *(f"--model.{k}={json.dumps(v)}" for k, v in TINY_MODEL.items()), "--wandb_mode=disabled"]


def run(*args: str, fsize: int | None = None, timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m ARGS`` as a user runs it, under the address-space cap (and a file-size limit, SIGXFSZ ignored so
    a write past it fails with EFBIG like a full disk); (the run, its peak resident memory in MB)."""

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (AS_CAP, AS_CAP))
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    cmd = [sys.executable, "-c", PEAK, sys.executable, "-m", *args]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                          env=subprocess_env(), preexec_fn=limits, start_new_session=True) as proc:  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the command too, not only the measuring parent
            raise
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    peak = next(int(line[8:]) / 1024 for line in reversed(done.stderr.splitlines()) if line.startswith("PEAK_KB"))
    print(f"{' '.join(args[:2])}: exit {done.returncode}, peak {peak:.0f} MB")  # shown with pytest -s
    return done, peak


def one_paragraph(done: subprocess.CompletedProcess, phrase: str) -> None:
    """Exit 2 with ``capsdist: error:`` and ``phrase`` on one line, no traceback."""
    errors = [line for line in done.stderr.splitlines() if line.startswith("capsdist: error:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(errors) == 1 and phrase in errors[0], done.stderr[-3000:]


# ------------------------------------------------------------------------------------------- item 1: no shell

FIT_FLAGS = [*TINY_RUN, "--data.source=multimnist_onthefly", "--data.batch_size=8", "--data.num_workers=0",
             "--data.train_samples=64", "--data.val_samples=8", "--checkpoint_every_n_steps=1"]  # fmt: skip


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of a real 1-step tiny MultiMNIST fit (its checkpoints/last.ckpt is what users hold)."""
    root = tmp_path_factory.mktemp("fitted")
    train.main(["fit", *FIT_FLAGS, f"--trainer.default_root_dir={root}", "--trainer.max_steps=1"])
    return root


def _planted(fitted: Path, dest: Path, val_shards: str) -> Path:
    """A copy of the fitted run's last.ckpt whose saved data settings are MultiMNIST shards ``val_shards``."""
    state = torch.load(fitted / "checkpoints" / "last.ckpt", weights_only=True)
    state["datamodule_hyper_parameters"].update(source="multimnist_shards", val_shards=val_shards)
    torch.save(state, dest)
    return dest


FORMS = {"brace": "{{pipe:touch {m},pipe:true}}", "colon": "{e}::pipe:touch {m}"}  # main refused only a leading pipe:


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cli", ["evaluate", "figures"])
def test_planted_shard_setting_never_runs(cli: str, form: str, fitted: Path, tmp_path: Path, capsys) -> None:
    """A checkpoint whose saved val_shards hides a pipe: or URL behind braces or `::`: exit 2, nothing runs."""
    marker = tmp_path / "MARKER"
    ckpt = _planted(fitted, tmp_path / "planted.ckpt", FORMS[form].format(m=marker, e=REPO / "README.md"))
    out = ["--out", str(tmp_path)] if cli == "figures" else []
    main = {"evaluate": evaluate.main, "figures": figures.main}[cli]
    error = refused(main, ["--ckpt", str(ckpt), "--device", "cpu", "--data.num_workers=0", *out], capsys)
    assert "may name local files only, never a pipe: command or a URL" in error
    assert not marker.exists()


class _Touch:
    """Unpickled, runs ``touch path`` (what a planted DCP .metadata would do under plain pickle.load)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("how", ["evaluate", "convert"])
def test_planted_sharded_checkpoint_never_runs(how: str, tmp_path: Path, capsys) -> None:
    """A NAME.ckpt/ directory (a sharded checkpoint) whose DCP .metadata pickle runs a command: refused, nothing
    runs (DCP itself would unpickle it with plain pickle.load)."""
    marker, planted = tmp_path / "MARKER", tmp_path / "planted.ckpt"
    planted.mkdir()
    torch.save({"hyper_parameters": {}, "global_step": 1}, planted / "meta.pt")
    (planted / ".metadata").write_bytes(__import__("pickle").dumps(_Touch(marker)))
    if how == "convert":
        error = refused(convert.main, ["convert", str(planted), str(tmp_path / "out.ckpt")], capsys)
    else:
        error = refused(evaluate.main, ["--ckpt", str(planted), "--device", "cpu"], capsys)
    assert "nothing in it was run" in error
    assert not marker.exists()


@pytest.mark.parametrize("command", ["test", "predict", "fit"])
def test_planted_shard_setting_is_never_read_by_training(command: str, fitted: Path, tmp_path: Path, capsys) -> None:
    """train test/predict/fit --ckpt_path never take data settings from the checkpoint: the planted spec is not
    used (the user's own data settings are; here none, so the missing shards are the error)."""
    marker = tmp_path / "MARKER"
    ckpt = _planted(fitted, tmp_path / "planted.ckpt", FORMS["brace"].format(m=marker))
    flags = [f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.max_steps=2"]
    error = refused(train.main, [command, *FIT_FLAGS, *flags, "--data.source=multimnist_shards",
                                 "--data.train_shards=/nonexistent"], capsys)  # fmt: skip
    assert ("does not exist" if command == "fit" else "no shard setting was given") in error
    assert not marker.exists()


def test_brace_bomb_in_a_checkpoint_is_refused_unexpanded(fitted: Path, tmp_path: Path) -> None:
    """x{0..999999999} (braceexpand materialises ranges) is sized before it is expanded."""
    ckpt = _planted(fitted, tmp_path / "planted.ckpt", f"{tmp_path}/x{{0..999999999}}.tar")
    done, peak = run("capsdist.evaluate", "--ckpt", str(ckpt), "--device", "cpu")
    one_paragraph(done, "expands to more than 1,000,000 shard names")
    assert peak < 1000


# --------------------------------------------------------------------------------------- item 2: bounded memory


def _png_bomb(inflated: int) -> bytes:
    """A valid 36x36 grayscale PNG header with an IDAT of zeros that inflates to ``inflated`` bytes (~1000:1)."""
    deflate, zeros = zlib.compressobj(9), bytes(1 << 20)
    idat = b"".join([deflate.compress(zeros) for _ in range(inflated >> 20)] + [deflate.flush()])
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))  # noqa: E731
    ihdr = struct.pack(">IIBBBBB", 36, 36, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _hostile_shard(good: Path, dest: Path, huge: int) -> None:
    """A copy of ``good`` (no manifest) where sample 0's input.png is a 1 GiB PNG bomb and sample 1's digit0.png a
    ``huge``-byte member (sparse on disk)."""
    with tarfile.open(good) as tin, dest.open("wb") as out:
        members = tin.getmembers()
        first = [m.name.split(".")[0] for m in members]
        for m in members:
            payload = tin.extractfile(m).read()
            if m.name == f"{first[0]}.input.png":
                payload = _png_bomb(1 << 30)
            m.size = len(payload) if m.name != f"{sorted(set(first))[1]}.digit0.png" else huge
            out.write(m.tobuf(tarfile.USTAR_FORMAT))
            if m.size == huge:
                out.seek(huge + -huge % 512, os.SEEK_CUR)  # a hole: 200 MB member, no disk
            else:
                out.write(payload + bytes(-len(payload) % 512))
        out.write(bytes(1024))


def test_png_bomb_and_huge_member_are_skipped_in_bounded_memory(shards: Path, tmp_path: Path) -> None:
    """evaluate on a shard with a 1 GiB PNG bomb and a 200 MB member: both samples skipped, the rest scored, peak
    memory that of a plain run (main: 2.5 GB)."""
    (tmp_path / "val").mkdir()
    _hostile_shard(shards / "test-000000.tar", tmp_path / "val" / "hostile.tar", 200 << 20)
    data = {"source": "multimnist_shards", "batch_size": 8}
    ckpt = tiny_checkpoint(tmp_path / "mm.ckpt", data, image_size=36, num_targets=2)
    done, peak = run("capsdist.evaluate", "--ckpt", str(ckpt), "--device", "cpu", "--data.num_workers=0",
                     f"--data.val_shards={tmp_path / 'val'}")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1])["samples"] == 28  # 30 less the two
    assert "or more or a filter type" in done.stderr and "over the member cap" in done.stderr
    assert peak < 900, peak


def _forged_weights(path: Path, **config: object) -> Path:
    """A tiny model's safetensors whose capsnet_config is TINY_NET overridden by ``config``."""
    tensors = {k: v.half().contiguous() for k, v in CapsNet(**TINY_NET).state_dict().items()}
    save_file(tensors, str(path), metadata={CONFIG_KEY: json.dumps({**TINY_NET, **config})})
    return path


@pytest.mark.parametrize("how", ["pretrained check", "evaluate --weights", "evaluate --ckpt"])
def test_forged_model_size_is_refused_before_any_allocation(how: str, tmp_path: Path) -> None:
    """conv_channels 2,000,000 in a 42 KB file (166 GB if built): refused from the file's own tensor shapes, at the
    memory of a plain start."""
    if how == "evaluate --ckpt":
        ckpt = tiny_checkpoint(tmp_path / "forged.ckpt", {"source": "mnist"})
        state = torch.load(ckpt, weights_only=True)
        state["hyper_parameters"]["conv_channels"] = 2_000_000
        torch.save(state, ckpt)
        args = ["capsdist.evaluate", "--ckpt", str(ckpt), "--device", "cpu"]
    else:
        weights = str(_forged_weights(tmp_path / "forged.safetensors", conv_channels=2_000_000))
        args = ["capsdist.pretrained", "check", "--weights", weights, "--limit", "10"]
        args = args if how == "pretrained check" else ["capsdist.evaluate", "--weights", weights, "--device", "cpu"]
    done, peak = run(*args)
    one_paragraph(done, "does not hold the tensors its model settings describe (conv1.bias: settings (2000000,)")
    assert peak < 900, peak


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.mark.parametrize("kind", ["alias bomb", "24 MB"])
def test_hostile_config_is_refused_at_once(kind: str, tmp_path: Path) -> None:
    """A 0.3 KB alias bomb (main: 4.6 GB) or a 24 MB config (main: parsing for minutes) as --config: exit 2."""
    config = tmp_path / "config.yaml"
    config.write_text(BOMB if kind == "alias bomb" else "model:\n  lr: 0.001\n" + "# padding\n" * ((24 << 20) // 10))
    root = f"--trainer.default_root_dir={tmp_path / 'run'}"
    done, peak = run("capsdist.train", "fit", "--config", str(config), root, timeout=120)
    one_paragraph(done, "through its aliases" if kind == "alias bomb" else "a config is refused above 1,048,576 bytes")
    assert peak < 900, peak


# ------------------------------------------------------------------------- item 5: errors that are one paragraph

UNSAFE = "holds the Python object argparse.Namespace, which a safe (weights_only) load refuses"


@pytest.mark.parametrize("cli", ["evaluate", "figures", "test", "predict", "fit"])
def test_checkpoint_refused_by_weights_only_is_named_unsafe(cli: str, tmp_path: Path, capsys) -> None:
    """A pickle with a Python object: one paragraph saying it may be unsafe and how to inspect it; nothing runs."""
    import argparse

    ckpt = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": argparse.Namespace(lr=1)}, ckpt)
    with pytest.raises(SystemExit) as stop:
        if cli in ("evaluate", "figures"):
            {"evaluate": evaluate, "figures": figures}[cli].main(["--ckpt", str(ckpt), "--device", "cpu"])
        else:
            train.main([cli, *TINY, f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and UNSAFE in err and "python -m pickletools" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("metadata", "phrase"),
    [
        ({CONFIG_KEY: "{conv_channels: 16"}, "its metadata 'capsnet_config' is not JSON"),
        ({CONFIG_KEY: "[16, 4]"}, "capsnet_config must be an object of CapsNet arguments, it has a list"),
        ({CONFIG_KEY: json.dumps({**TINY_NET, "conv_channels": "16"})}, "--model.conv_channels '16'"),
        ({CONFIG_KEY: json.dumps(TINY_NET), "global_step": '"ten"'}, "global_step 'ten' is not an integer"),
    ],
    ids=["not JSON", "config a list", "a string size", "step a string"],
)
def test_bad_safetensors_metadata_is_one_paragraph(metadata: dict, phrase: str, tmp_path: Path, capsys) -> None:
    """`pretrained check` on weights whose metadata is not JSON or has the wrong types."""
    path = tmp_path / "bad.safetensors"
    save_file({k: v.half().contiguous() for k, v in CapsNet(**TINY_NET).state_dict().items()}, str(path), metadata)
    with pytest.raises(SystemExit) as stop:
        pretrained.main(["check", "--weights", str(path), "--limit", "10"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "is not a capsdist weights file" in err and phrase in err, err


FIT = ["fit", *TINY, "--wandb_mode=disabled", "--trainer.max_steps=1", "--data.train_samples=32"]
BAD_FLAGS = [
    ("--trainer.max_steps=-5", "--trainer.max_steps -5 is out of range: it must be -1 (no limit) or an integer >= 0"),
    ("--checkpoint_every_n_steps=-1", "--checkpoint_every_n_steps -1 is out of range: it must be an integer >= 0"),
    ("--model.conv_channels=0", "--model.conv_channels 0 is out of range: it must be an integer >= 1"),
    ("--model.primary_dim=-8", "--model.primary_dim -8 is out of range"),
    ("--model.decoder_hidden=[512, 0]", "--model.decoder_hidden [512, 0] is out of range: it must be a list of"),
    ("--model.caps_layers=[[10, -16]]", "--model.caps_layers [(10, -16)] is out of range"),
    ("--model.caps_layers=[]", "--model.caps_layers [] is out of range"),
    ("--model.routing_chunk_size=0", "--model.routing_chunk_size 0 is out of range: it must be an integer >= 1"),
    # main: accepted, and the first step never finished
    ("--model.routing_iterations=1000", "--model.routing_iterations 1000 is out of range: it must be an integer from 1"
                                        " to 20"),
]  # fmt: skip


@pytest.mark.parametrize(("flag", "phrase"), BAD_FLAGS, ids=[f for f, _ in BAD_FLAGS])
def test_bad_setting_is_one_paragraph(flag: str, phrase: str, tmp_path: Path, capsys) -> None:
    """Each bad number stops `fit` before anything is built or written: exit 2 naming the flag and the range."""
    error = refused(train.main, [*FIT, f"--trainer.default_root_dir={tmp_path / 'run'}", flag], capsys)
    assert phrase in error, error
    assert not (tmp_path / "run").exists()


def test_disk_full_save_is_one_paragraph_and_keeps_the_oldtiny_checkpoint(fitted: Path, tmp_path: Path) -> None:
    """A file-size limit hit while saving step 2: exit 2 with the disk-full paragraph naming the file, last.ckpt of
    step 1 byte-identical, and the temp file a killed save had left is gone."""
    root = tmp_path / "run"
    shutil.copytree(fitted, root)
    last = root / "checkpoints" / "last.ckpt"
    before = hashlib.sha256(last.read_bytes()).hexdigest()
    stale = root / "checkpoints" / ".snapshot-step=7.ckpt.k1ll3d.tmp"  # a save killed mid-write, long ago
    stale.write_bytes(b"half a checkpoint")
    os.utime(stale, (1, 1))
    done, _ = run("capsdist.train", "fit", *FIT_FLAGS, f"--trainer.default_root_dir={root}", "--trainer.max_steps=2",
                  "--ckpt_path=last", fsize=last.stat().st_size // 2)  # fmt: skip
    snapshot = root / "checkpoints" / "snapshot-step=2.ckpt"
    one_paragraph(done, f"cannot write {snapshot}: File too large. Fix: free space")
    assert hashlib.sha256(last.read_bytes()).hexdigest() == before
    assert not stale.exists() and not list(root.rglob("*.tmp"))


@pytest.mark.parametrize("planted", ["config.yaml alias bomb", "pickled last.ckpt"])
def test_report_reads_run_folders_as_data(planted: str, tmp_path: Path) -> None:
    """`capsdist.report` on a run folder with a planted config.yaml bomb (main: all memory) or a pickled last.ckpt
    (main: a traceback): the folder is skipped with its one-paragraph reason, and with nothing readable, exit 2."""
    import argparse

    (tmp_path / "csv" / "version_0").mkdir(parents=True)
    (tmp_path / "csv" / "version_0" / "metrics.csv").write_text("step,val/error\n0,0.5\n")
    bomb = planted == "config.yaml alias bomb"
    (tmp_path / "config.yaml").write_text(BOMB + "model:\n  routing_iterations: *i\n" if bomb else "model: {}\n")
    if not bomb:
        (tmp_path / "checkpoints").mkdir()
        torch.save({"global_step": argparse.Namespace(n=1)}, tmp_path / "checkpoints" / "last.ckpt")
    done, peak = run("capsdist.report", str(tmp_path))
    one_paragraph(done, "none of the 1 folder(s) could be read")
    skipped = [line for line in done.stderr.splitlines() if line.startswith("capsdist: skipped")]
    assert len(skipped) == 1 and ("through its aliases" if bomb else UNSAFE) in skipped[0], done.stderr
    assert peak < 900, peak
