"""The startup warning for bf16 on a CPU that emulates it: detection from /proc/cpuinfo text, and when it is said."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
from lightning_utilities.core.rank_zero import rank_zero_only

from capsdist.training import guards

ZEN3 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma sha_ni vaes\n"
ICE_LAKE = "flags\t\t: fpu avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bitalg\n"
COOPER_LAKE = "flags\t\t: avx2 avx512f avx512_vnni avx512_bf16\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
NEOVERSE_V1 = "Features\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize(
    ("cpuinfo", "kind"),
    [
        (ZEN3, "none"),
        (ICE_LAKE, "avx512"),
        (COOPER_LAKE, "native"),
        (SAPPHIRE_RAPIDS, "native"),
        (NEOVERSE_V1, "native"),
        ("processor\t: 0\n", None),
    ],
    ids=["zen3", "ice_lake", "cooper_lake", "sapphire_rapids", "neoverse_v1", "no_flags"],
)
def test_bf16_kind_from_the_flags(cpuinfo: str, kind: str | None) -> None:
    assert guards.cpu_bf16(cpuinfo) == kind
    assert guards.cpu_bf16("model name\t: avx512_bf16 in a name, not a flag\n" + ZEN3) == "none"


def _warnings(precision: str, monkeypatch: pytest.MonkeyPatch, kind: str | None, rank: int = 0) -> list[str]:
    """The bf16 warnings a CPU trainer of ``precision`` gets on a host whose bf16 is ``kind``, at ``rank``."""
    monkeypatch.setattr(guards, "host_cpu_bf16", lambda: kind)
    monkeypatch.setattr(rank_zero_only, "rank", rank)
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False, enable_progress_bar=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guards.warn_emulated_bf16(trainer)
    return [str(w.message) for w in caught if "bf16 hardware" in str(w.message)]


def test_bf16_on_a_cpu_without_bf16_hardware_is_said_once_with_the_cost_and_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (said,) = _warnings("bf16-mixed", monkeypatch, "none")
    assert "bf16-mixed" in said and "30x slower" in said and "--trainer.precision 32-true" in said
    (said,) = _warnings("bf16-true", monkeypatch, "avx512")
    assert "emulated with AVX-512" in said and "--trainer.precision 32-true" in said
    assert not _warnings("bf16-mixed", monkeypatch, "none", rank=1)  # rank 0 only
    assert not _warnings("bf16-mixed", monkeypatch, "native")
    assert not _warnings("bf16-mixed", monkeypatch, None)  # no /proc/cpuinfo: nothing known, nothing said
    assert not _warnings("32-true", monkeypatch, "none")
