"""The command-line tools end to end on the tiny built-in model."""

import json

from diffsparse.export.cli import main as dsexport
from diffsparse.runtime.cli import profile_main as dsprofile
from diffsparse.runtime.cli import run_main as dsrun


def test_export_run_profile(tmp_path, capsys):
    sparse, dense = tmp_path / "sparse", tmp_path / "dense"
    assert dsexport(["--model", "dit-tiny", "--schedule", "toca", "--steps", "6", "--batch", "2",
                     "--out", str(sparse), "--write-schedule", str(tmp_path / "s.json")]) == 0
    assert "parity max err" in capsys.readouterr().out
    assert dsexport(["--model", "dit-tiny", "--schedule", "dense", "--steps", "6", "--batch", "2",
                     "--out", str(dense), "-q"]) == 0
    # a saved schedule file exports to the same graphs
    assert dsexport(["--model", "dit-tiny", "--schedule", str(tmp_path / "s.json"), "--batch", "2",
                     "--out", str(tmp_path / "again"), "-q"]) == 0
    a = json.loads((sparse / "manifest.json").read_text())
    b = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert [g["keep"] for g in a["graphs"]] == [g["keep"] for g in b["graphs"]]

    assert dsrun([str(sparse), "--labels", "1,2,3", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert dsprofile([str(sparse), "--baseline", str(dense), "--out", str(tmp_path / "rep"), "--runs", "1"]) == 0
    assert "Speed-up" in capsys.readouterr().out


def test_cli_errors_are_clear(tmp_path, capsys):
    assert dsexport(["--model", "no-such-model", "--out", str(tmp_path / "x")]) == 2
    assert "neither a built-in" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert dsexport(["--model", "dit-tiny", "--schedule", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "'format' must be" in capsys.readouterr().err
    assert dsexport(["--model", "dit-tiny", "--schedule", "toca", "--ratio", "1.5", "--out", str(tmp_path / "x")]) == 2
    assert "target MACs ratio" in capsys.readouterr().err
    assert dsrun([str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_text_model_from_the_command_line(tmp_path, capsys):
    """dsexport with a family option, then dsrun with the text conditioning in an .npz file."""
    import numpy as np

    from diffsparse.models.zoo import make_spec

    out = tmp_path / "pixart"
    assert dsexport(["--model", "pixart-tiny", "--schedule", "toca", "--steps", "5", "--option", "text_len=6",
                     "--out", str(out), "-q"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["spec_options"] == {"text_len": 6} and m["sampler"]["kind"] == "dpmpp_2m"
    spec = make_spec("pixart-tiny", options={"text_len": 6})
    rng = np.random.default_rng(0)
    cond = {k: np.concatenate([v, v]) for k, v in spec.example_conditioning(rng).items()}  # two samples
    np.savez(tmp_path / "cond.npz", **cond)
    assert dsrun([str(out), "--conditioning", str(tmp_path / "cond.npz"), "--out", str(tmp_path / "p.png")]) == 0
    assert "2 samples" in capsys.readouterr().out
    np.savez(tmp_path / "short.npz", prompt_embeds=cond["prompt_embeds"][:, :3])
    assert dsrun([str(out), "--conditioning", str(tmp_path / "short.npz")]) == 2
    assert "'prompt_embeds' must have shape (1, 6, 24), got (1, 3, 24)" in capsys.readouterr().err
    assert dsexport(["--model", "pixart-tiny", "--option", "txt_len=6", "--out", str(tmp_path / "y")]) == 2
    assert "unknown option" in capsys.readouterr().err


def test_dsrun_checks_the_output_path_before_generating(tiny_bundles, tmp_path, capsys, monkeypatch):
    """A bad --out is refused first (exit 2, one line, no traceback); a failure at the end too."""
    import os

    import numpy as np

    from diffsparse.runtime import NonFiniteOutputError, Pipeline

    def no_generation(*args, **kwargs):
        raise AssertionError("generated before checking --out")

    bundle = str(tiny_bundles["toca"])
    with monkeypatch.context() as m:
        m.setattr(Pipeline, "from_bundle", no_generation)
        assert dsrun([bundle, "--out", str(tmp_path / "no" / "such" / "x.png")]) == 2
        err = capsys.readouterr().err
        assert "does not exist: create it (mkdir -p" in err and "Traceback" not in err
        (tmp_path / "file").write_text("")
        assert dsrun([bundle, "--out", str(tmp_path / "file" / "x.png")]) == 2
        assert "is not a folder" in capsys.readouterr().err
        assert dsrun([bundle, "--out", str(tmp_path)]) == 2
        assert "is a folder; give a file name" in capsys.readouterr().err
        assert dsrun([bundle, "--out", str(tmp_path / "x.nope")]) == 2
        assert "unknown image type '.nope'" in capsys.readouterr().err
        m.setattr(os, "access", lambda *a, **k: False)  # as on a read-only folder (root ignores permissions)
        assert dsrun([bundle, "--out", str(tmp_path / "x.png")]) == 2
        assert "is not writable" in capsys.readouterr().err

    def nan(self, *args, **kwargs):
        raise NonFiniteOutputError("samples [0] (batch 0) ended with non-finite latents")

    monkeypatch.setattr(Pipeline, "generate", nan)
    assert dsrun([bundle, "--out", str(tmp_path / "x.png")]) == 2
    assert "non-finite latents" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
    np_file = tmp_path / "one.npy"
    np.save(np_file, np.zeros(3))
    assert dsrun([bundle, "--conditioning", str(np_file), "--out", str(tmp_path / "y.png")]) == 2
    assert "one unnamed array" in capsys.readouterr().err


def test_dsrun_compile_needs_the_torch_backend(tiny_bundles, tmp_path, capsys):
    """--compile on another backend is refused in one line (exit 2) before anything runs."""
    args = [str(tiny_bundles["toca"]), "--compile", "--backend", "onnxruntime", "--out", str(tmp_path / "x.png")]
    assert dsrun(args) == 2
    err = capsys.readouterr().err
    assert "compile=True is for the torch backend" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()
