"""Skipped steps end to end: export writes no graph for them, every backend runs the computed
steps on the folded sampler plan, and the result is the sampler with the skipped steps reusing
the last model output (DDIM, η = 0) or, with skip_forecast, running on x0 forecast from the last
two computed steps."""

import json
import shutil
from dataclasses import replace as dataclass_replace

import numpy as np
import pytest
import torch
from diffsparse.export.bundle import ExportConfig, export_bundle
from diffsparse.export.cli import main as export_main
from diffsparse.runtime import Pipeline
from diffsparse.runtime.bundle import Bundle, BundleError
from diffsparse.runtime.profile import ProfileConfig, profile
from diffsparse.runtime.report import write_report

from diffsparse.builtin_schedules import fewer_steps_schedule, fora_schedule, toca_schedule
from diffsparse.manifest import Manifest
from diffsparse.models.base import SpecError
from diffsparse.models.zoo import make_spec
from diffsparse.sampler import initial_noise
from diffsparse.schedule import Schedule

STEPS = 6


def _with_skips(sched: Schedule, skipped: set[int]) -> Schedule:
    data = sched.to_dict()
    zero = [0] * sched.num_layers
    data["keep"] = [zero if t in skipped else row for t, row in enumerate(sched.keep)]
    data["skip"] = [t in skipped for t in range(sched.num_steps)]
    data["full_steps"] = [f and t not in skipped for t, f in enumerate(sched.full_steps)]
    return Schedule.from_dict(data)


@pytest.fixture(scope="module")
def skip_bundles(tmp_path_factory, tiny_spec):
    root = tmp_path_factory.mktemp("skip")
    toca = toca_schedule(tiny_spec, STEPS, 0.5, full_every=3)
    scheds = {"mixed": _with_skips(toca, {2, 5}), "fewer": fewer_steps_schedule(tiny_spec, STEPS, 0.5)}
    out = {}
    for name, sched in scheds.items():
        out[name] = root / name
        export_bundle(tiny_spec, sched, out[name], source={"model": "dit-tiny", "seed": 0}, config=ExportConfig())
    return out, scheds


def test_manifest_lists_only_the_computed_steps(skip_bundles, tiny_spec):
    folders, scheds = skip_bundles
    m = Manifest.load(folders["mixed"])
    assert [s["index"] for s in m.steps] == [0, 1, 3, 4] == m.schedule.computed_steps
    assert len(m.sampler.timesteps) == 4 and len(m.macs["per_step"]) == 4
    assert m.macs["total"] == tiny_spec.schedule_macs(scheds["mixed"]) < tiny_spec.schedule_macs(
        toca_schedule(tiny_spec, STEPS, 0.5, full_every=3))
    assert all(g.parity_max_abs_err is not None and g.parity_max_abs_err < 1e-4 for g in m.graphs)
    fewer = Manifest.load(folders["fewer"])
    assert not fewer.layer_cache and len(fewer.graphs) == 1 and [s["index"] for s in fewer.steps] == [0, 2, 4]
    assert fewer.macs["ratio"] == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["mixed", "fewer"])
def test_backends_agree_on_skipped_steps(skip_bundles, tiny_spec, name):
    folders, scheds = skip_bundles
    ort = Pipeline.from_bundle(folders[name]).generate([0, 3], seed=5, guidance_scale=3.0)
    torch_bundle = Pipeline.from_bundle(folders[name], backend="torch").generate([0, 3], seed=5, guidance_scale=3.0)
    reference = Pipeline.from_model("dit-tiny", scheds[name], batch_size=2).generate([0, 3], seed=5, guidance_scale=3.0)
    assert len(ort.step_seconds) == len(scheds[name].computed_steps)
    for other in (torch_bundle, reference):
        assert np.abs(ort.samples - other.samples).max() < 1e-3


def test_fewer_steps_bundle_is_ddim_reusing_the_last_model_output(skip_bundles, tiny_spec):
    """The definition of a skip: the 6-step DDIM scheduler of diffusers, where a skipped step
    steps on the model output of the step before it."""
    folders, scheds = skip_bundles
    labels, guidance = np.array([4, 8]), 4.0
    result = Pipeline.from_bundle(folders["fewer"]).generate(labels, seed=1, guidance_scale=guidance)
    sched = tiny_spec.sampler.scheduler()
    sched.set_timesteps(STEPS)
    x = torch.from_numpy(initial_noise(1, 2, (4, 16, 16)))
    eps = None
    for t, skip in zip(sched.timesteps, scheds["fewer"].skip):
        if not skip:
            with torch.no_grad():
                out = tiny_spec.model(torch.cat([x, x]), timestep=t.expand(4),
                                      class_labels=torch.tensor([4, 8, 10, 10])).sample
            cond, uncond = out.chunk(2)
            eps = uncond + guidance * (cond - uncond)
        x = sched.step(eps, t, x).prev_sample
    scale = max(1.0, float(x.abs().max()))
    assert np.abs(result.samples - x.numpy()).max() / scale < 1e-4


def test_fora_and_fewer_steps_are_built_in_for_dsexport(tmp_path, tiny_spec):
    for name in ("fora", "fewer-steps"):
        out = tmp_path / name
        assert export_main(["--model", "dit-tiny", "--schedule", name, "--steps", "6", "--ratio", "0.5",
                            "--batch", "2", "--out", str(out), "--quiet"]) == 0
        m = Manifest.load(out)
        assert m.schedule.provenance["method"] == name and abs(m.macs["ratio"] - 0.5) < 0.2
    fora = fora_schedule(tiny_spec, STEPS, 0.5)
    assert all(set(row) in ({tiny_spec.num_tokens}, {0}) for row in fora.keep) and not any(fora.skip)


def test_profile_of_a_bundle_with_skipped_steps_against_dense(skip_bundles, tiny_bundles, tmp_path):
    """The report lines steps up by their index t (a skipped step has no timing), also by part."""
    folders, _ = skip_bundles
    report = profile(folders["mixed"], tiny_bundles["dense"],
                     ProfileConfig(runs=1, warmup=0, memory=False, ops=True, ops_runs=1))
    d = report.to_dict()
    assert d["sparse"]["step_indices"] == [0, 1, 3, 4] and d["baseline"]["step_indices"] == list(range(STEPS))
    assert len(d["sparse"]["per_step_ms"]) == 4 == len(d["sparse"]["ops"]["per_step"])
    paths = write_report(report, tmp_path / "report")
    assert "| steps (computed) / distinct graphs | 6 (4) /" in paths["md"].read_text()
    for png in ("step_latency.png", "step_parts.png"):
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def forecast_bundle(tmp_path_factory, tiny_spec):
    sched = fewer_steps_schedule(tiny_spec, STEPS, 0.5).forecasting()
    folder = tmp_path_factory.mktemp("forecast") / "fewer"
    export_bundle(tiny_spec, sched, folder, source={"model": "dit-tiny", "seed": 0}, config=ExportConfig())
    return folder, sched


def test_forecasting_skips_run_the_same_on_every_backend(forecast_bundle):
    folder, sched = forecast_bundle
    m = Manifest.load(folder)
    assert m.schedule.skip_forecast and m.sampler.config["skip_forecast"] and m.sampler.coefficients.shape == (3, 5)
    assert [e.name for e in m.cache.tensors] == ["sampler.prev_x0"]
    ort = Pipeline.from_bundle(folder).generate([0, 3], seed=5, guidance_scale=3.0)
    torch_bundle = Pipeline.from_bundle(folder, backend="torch").generate([0, 3], seed=5, guidance_scale=3.0)
    reference = Pipeline.from_model("dit-tiny", sched, batch_size=2).generate([0, 3], seed=5, guidance_scale=3.0)
    reusing = Pipeline.from_model("dit-tiny", dataclass_replace(sched, skip_forecast=False), batch_size=2)
    for other in (torch_bundle, reference):
        assert np.abs(ort.samples - other.samples).max() < 1e-3
    assert np.abs(ort.samples - reusing.generate([0, 3], seed=5, guidance_scale=3.0).samples).max() > 1e-2


def test_forecasting_bundle_is_ddim_on_forecast_x0(forecast_bundle, tiny_spec):
    """The definition of a forecasting skip on diffusers' own DDIM scheduler: a skipped step runs
    DDIM's step on the ε that gives x0 extrapolated linearly from the last two computed steps."""
    folder, sched = forecast_bundle
    labels, guidance = np.array([4, 8]), 4.0
    result = Pipeline.from_bundle(folder).generate(labels, seed=1, guidance_scale=guidance)
    ddim = tiny_spec.sampler.scheduler()
    ddim.set_timesteps(STEPS)
    acp = ddim.alphas_cumprod
    x = torch.from_numpy(initial_noise(1, 2, (4, 16, 16))).double()
    history = []
    for j, (t, skip) in enumerate(zip(ddim.timesteps, sched.skip)):
        a = acp[t].double()
        if not skip:
            with torch.no_grad():
                out = tiny_spec.model(torch.cat([x, x]).float(), timestep=t.expand(4),
                                      class_labels=torch.tensor([4, 8, 10, 10])).sample.double()
            cond, uncond = out.chunk(2)
            history.append((j, (x - (1 - a).sqrt() * (uncond + guidance * (cond - uncond))) / a.sqrt()))
        (i1, x1), x0 = history[-1], history[-1][1]
        if skip and len(history) > 1:
            i0, x_0 = history[-2]
            x0 = x1 + (j - i1) / (i1 - i0) * (x1 - x_0)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        x = ddim.step(eps, t, x).prev_sample
    scale = max(1.0, float(x.abs().max()))
    assert np.abs(result.samples - x.numpy()).max() / scale < 1e-4


def test_forecasting_is_refused_where_the_sampler_cannot(tmp_path):
    spec = make_spec("pixart-tiny", batch_size=1)
    sched = fewer_steps_schedule(spec, 4, 0.5).forecasting()
    with pytest.raises(SpecError, match="not yet supported with the 'dpmpp_2m' sampler"):
        export_bundle(spec, sched, tmp_path / "b", config=ExportConfig())
    assert not (tmp_path / "b").exists()
    assert export_main(["--model", "dit-tiny", "--schedule", "toca", "--steps", "6", "--skip-forecast",
                        "--batch", "2", "--out", str(tmp_path / "c"), "--quiet"]) == 2


def test_a_manifest_whose_schedule_and_sampler_disagree_on_forecasting_is_refused(forecast_bundle, tmp_path):
    folder, _ = forecast_bundle
    edited = tmp_path / "edited"
    shutil.copytree(folder, edited)
    data = json.loads((edited / "manifest.json").read_text())
    data["schedule"]["skip_forecast"] = False
    (edited / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="skip_forecast differs"):
        Bundle(edited, verify=False).spec
