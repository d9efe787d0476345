"""Fuzzed manifests and schedules (benchmarks/fuzz_bundles.py): seeded mutants of the tiny bundles'
manifest.json and of a schedule file, each loaded and run in-process. No mutant may end in an
exception other than the project's own, and none may be accepted with a different output unless
the field it changed is informational (or a setting, meant to change it)."""

import json

import pytest

from diffsparse.manifest import INFORMATIONAL_FIELDS, BundleError

@pytest.fixture(scope="module")
def fuzz(benchmark_script):
    return benchmark_script("fuzz_bundles")


@pytest.mark.parametrize("name, n, seed", [("dense", 150, 0), ("toca", 150, 1)])
def test_fuzzed_manifests_are_refused_cleanly_or_run_the_same(fuzz, tiny_bundles, tmp_path, name, n, seed):
    counts = fuzz.fuzz_manifest(tiny_bundles[name], n=n, seed=seed, workdir=tmp_path)
    assert counts["tried"] == n
    assert counts["crashed"] == 0, counts["examples"]["crashed"]
    assert counts["accepted_changed_output"] == 0, counts["examples"]["accepted_changed_output"]
    assert counts["refused_cleanly"] > n // 2   # most mutations break something the loader checks
    assert counts["accepted_informational"] + counts["accepted_same_output"] > 0
    assert sum(counts[k] for k in ("refused_cleanly", "accepted_informational", "accepted_setting",
                                   "accepted_same_output")) == n


def test_fuzzed_schedules_are_refused_cleanly_or_valid(fuzz, tiny_schedules, tiny_spec, tmp_path):
    path = tiny_schedules["toca"].save(tmp_path / "toca.json")
    counts = fuzz.fuzz_schedule(path, n=300, seed=0, workdir=tmp_path / "work", spec=tiny_spec)
    assert counts["tried"] == 300
    assert counts["crashed"] == 0, counts["examples"]["crashed"]
    assert counts["accepted_invalid"] == 0, counts["examples"]["accepted_invalid"]
    assert counts["refused_cleanly"] > 150


def test_the_fuzzer_tells_library_errors_from_ours(fuzz):
    assert fuzz._ours(BundleError("bad"))
    assert not fuzz._ours(TypeError("unsupported operand"))
    assert not fuzz._ours(KeyError("x"))
    try:
        json.loads("{")   # a ValueError raised by a library, not by diffsparse
    except ValueError as e:
        assert not fuzz._ours(e)


def test_informational_fields_are_matched_by_path(fuzz):
    assert "graphs[].ops" in INFORMATIONAL_FIELDS
    assert fuzz.is_informational(["graphs", 2, "ops", 1])
    assert fuzz.is_informational(["source"]) and fuzz.is_informational(["macs", "per_step", 0])
    assert not fuzz.is_informational(["graphs", 2, "keep"])
    assert not fuzz.is_informational(["sampler", "coefficients", 0, 1])
    assert fuzz.path_name(["graphs", 2, "keep", 0]) == "graphs[2].keep[0]"


def test_the_cli_prints_the_counts(fuzz, tiny_bundles, tmp_path, capsys):
    assert fuzz.main([str(tiny_bundles["dense"]), "--n", "10", "--workdir", str(tmp_path)]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["tried"] == 10 and counts["crashed"] == 0
