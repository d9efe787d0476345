"""Faults during export lose nothing: SIGKILL at chosen points, a full disk, leftovers of dead exports.

The kill trials run in benchmarks/export_faults.py (one worker process forks a child export per
trial and kills it with SIGKILL at a named point or after a random delay); this file checks its
figures and the recovery rules on their own."""

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from diffsparse.export import bundle as bundle_mod
from diffsparse.export import cli as export_cli
from diffsparse.export.bundle import ExportConfig, ExportError, export_bundle, recover_interrupted
from diffsparse.export.weights import WeightStore

from diffsparse.manifest import Manifest

posix_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@posix_only
def test_sigkill_at_any_point_loses_nothing(tmp_path, benchmark_script):
    """Kills while writing graphs, while pruning (the manifest names deleted graphs), before the swap,
    after the atomic swap, between the two renames of the fallback swap, and at random moments."""
    points = ["graph-1", "pruning", "synced", "swapped", "fallback:moved-aside", "fallback:renamed"]
    result = benchmark_script("export_faults").run(tmp_path, kill_points=points, seed=0, random_kills=2, disk_full=True)
    trials = {t["point"]: t for t in result["trials"]}
    assert result["kill_points_tried"] == 8 and not result["unreached_points"], result
    assert all(t["killed"] for t in result["trials"][:6]), "a random kill may come after the export finished"
    assert result["partial_bundles_loadable"] == 0 and result["bundle_lost"] == 0, result
    assert result["next_export_ok"] == 8, result
    for point in ("graph-1", "pruning", "synced", "fallback:moved-aside"):
        assert trials[point]["after_recovery"] == "old", trials[point]
    assert trials["fallback:moved-aside"]["after_kill"] == "missing", "the kill lands between the two renames"
    assert any("restored" in line for line in trials["fallback:moved-aside"]["recovery"])
    for point in ("swapped", "fallback:renamed"):
        assert trials[point]["after_kill"] == "new", trials[point]
    if result["atomic_exchange"]:  # the target never goes missing
        assert all(t["after_kill"] in ("old", "new") for t in result["trials"] if not t["point"].startswith("fallback:"))
    full = result["disk_full"]
    assert full["ok"] and full["exit_code"] == 2 and "no space left" in full["message"], full
    assert result["ok"]


def test_disk_full_gives_a_clear_error_and_keeps_the_old_bundle(tmp_path, tiny_bundles, tiny_spec, tiny_schedules,
                                                                 monkeypatch):
    out = tmp_path / "b"
    shutil.copytree(tiny_bundles["dense"], out)
    before = (out / "manifest.json").read_text()

    def full(self, array):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(WeightStore, "_add", full)
    with pytest.raises(ExportError, match=r"writing the bundle .*b failed: no space left.*free space on") as e:
        export_bundle(tiny_spec, tiny_schedules["toca"], out, config=ExportConfig(overwrite=True))
    assert str(out) in str(e.value) and "unchanged" in str(e.value)
    assert (out / "manifest.json").read_text() == before
    Manifest.load(out, verify=True)
    assert _hidden(tmp_path) == [], "no temporary folder may be left"


def test_a_full_disk_wrapped_by_a_library_is_still_named(tmp_path, tiny_spec, tiny_schedules, monkeypatch):
    def wrapped(*a, **k):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            raise RuntimeError("exporter failed") from e

    monkeypatch.setattr(bundle_mod, "export_step", wrapped)
    with pytest.raises(ExportError, match="no space left"):
        export_bundle(tiny_spec, tiny_schedules["dense"], tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_dsexport_on_a_full_disk_exits_2_without_traceback(tmp_path, tiny_bundles, monkeypatch, capsys):
    out = tmp_path / "b"
    shutil.copytree(tiny_bundles["dense"], out)

    def full(self, array):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(WeightStore, "_add", full)
    code = export_cli.main(["--model", "dit-tiny", "--batch", "2", "--steps", "6", "--out", str(out), "--overwrite",
                            "--no-verify", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith("dsexport: error: writing the bundle") and "no space left" in err and "--out" in err
    Manifest.load(out, verify=True)
    assert _hidden(tmp_path) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.skipif(os.name == "nt", reason="liveness by pid is not checked on Windows")
def test_recovery_restores_moved_aside_bundle_and_spares_live_exports(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _dead_pid()
        out = tmp_path / "b"
        for name in (f".b.old-{dead}", f".b.tmp-{dead}", f".b.tmp-{live.pid}", f".b.old-{live.pid}", f".c.tmp-{dead}"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "manifest.json").write_text(name)
        done = recover_interrupted(out)
        assert (out / "manifest.json").read_text() == f".b.old-{dead}", "the moved-aside bundle is back"
        assert len(done) == 2 and "restored" in done[0]
        assert _hidden(tmp_path) == sorted([f".b.old-{live.pid}", f".b.tmp-{live.pid}", f".c.tmp-{dead}"]), \
            "folders of a live export and of another target stay"
        (tmp_path / f".b.old-{dead}").mkdir()
        recover_interrupted(out)  # the target exists: a dead export's backup is deleted, not restored
        assert (out / "manifest.json").read_text() == f".b.old-{dead}"
        assert not (tmp_path / f".b.old-{dead}").exists()
    finally:
        live.kill()
        live.wait()


def test_fallback_swap_replaces_the_bundle(tmp_path, tiny_bundles, tiny_spec, tiny_schedules, monkeypatch):
    """Without an atomic exchange (not Linux, or a file system without it) two renames do the swap."""
    out = tmp_path / "b"
    shutil.copytree(tiny_bundles["dense"], out)
    points = []
    monkeypatch.setattr(bundle_mod, "_exchange", lambda a, b: False)
    monkeypatch.setattr(bundle_mod, "FAULT_HOOK", points.append)
    export_bundle(tiny_spec, tiny_schedules["toca"], out, config=ExportConfig(overwrite=True, verify=False))
    assert points[-3:] == ["moved-aside", "renamed", "cleaned"]
    assert Manifest.load(out, verify=True).schedule.provenance["method"] != "dense"
    assert _hidden(tmp_path) == []
