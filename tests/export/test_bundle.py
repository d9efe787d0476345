"""dsexport's bundle: parity of every graph, TensorRT subset, weights once, atomic writes."""

import json

import numpy as np
import onnx
import pytest
from diffsparse.bundle_format import in_place_writes
from diffsparse.export.bundle import ExportConfig, ExportError, export_bundle
from diffsparse.export.trt_compat import tensorrt_problems
from diffsparse.tokencache import TOPK_LIMIT
from diffsparse.export.verify import verify_graphs
from onnx import TensorProto, helper

from diffsparse.manifest import VERSION, Manifest


def test_every_graph_matches_pytorch(tiny_bundles, tiny_spec):
    for name, folder in tiny_bundles.items():
        errors = verify_graphs(folder, tiny_spec)
        assert max(errors) < 1e-4, (name, errors)
        m = Manifest.load(folder)
        assert all(g.parity_max_abs_err is not None and g.parity_max_abs_err < 1e-4 for g in m.graphs)


def test_identical_steps_share_a_graph(tiny_bundles, tiny_schedules):
    """One graph per (sparsity pattern, cache entries written): steps that agree on both share it."""
    for name, folder in tiny_bundles.items():
        m = Manifest.load(folder)
        sched = tiny_schedules[name]
        variants = {(tuple(g.keep), tuple(g.cache_writes)) for g in m.graphs}
        assert len(variants) == len(m.graphs) >= len(sched.distinct_signatures())
        assert len(m.graphs) < sched.num_steps
        for step in m.steps:
            assert m.graphs[step["graph"]].keep == sched.keep[step["index"]]


def test_graphs_write_only_what_a_later_step_reads(tiny_bundles, tiny_spec):
    """The last step writes no layer cache but the entries its scatters update in place (free for
    the runtime, a copy of the whole entry for ONNX Runtime if pruned); a full step before partial
    ones writes the outputs of every layer they reuse; a carried-over entry is never an output (its
    buffer is kept)."""
    m = Manifest.load(tiny_bundles["toca"])
    last = m.graphs[m.steps[-1]["graph"]]
    assert 0 < sum(last.keep) < sum(tiny_spec.dense_keep())   # a partial step
    last_model = onnx.load(str(tiny_bundles["toca"] / last.file), load_external_data=False)
    assert last.cache_writes and set(last.cache_writes) == in_place_writes(last_model.graph, m.cache.names)
    assert not [n for n in last.cache_writes if n.startswith(("reuse.", "vnorm."))]
    first = m.graphs[m.steps[0]["graph"]]
    assert {n for n in first.cache_writes if n.startswith("out.")} == {n for n in m.cache.names if n.startswith("out.")}
    for g in m.graphs:
        model = onnx.load(str(tiny_bundles["toca"] / g.file), load_external_data=False)
        assert not [n for n in model.graph.node if n.op_type == "Identity" and n.output[0].startswith("next.")]


def test_dense_bundle_is_the_plain_model(tiny_bundles, tiny_spec):
    """A schedule that never reuses exports graphs without the layer cache: the dense baseline
    pays nothing for caching (no cache outputs, no attention map for token scores)."""
    dense, toca = Manifest.load(tiny_bundles["dense"]), Manifest.load(tiny_bundles["toca"])
    assert not dense.layer_cache and len(dense.cache) == 0
    assert toca.layer_cache and toca.cache == tiny_spec.cache_layout(toca.schedule.selector, True,
                                                                     tiny_spec.conditioning_plan(toca.schedule))
    model = onnx.load(str(tiny_bundles["dense"] / dense.graphs[0].file), load_external_data=False)
    assert [o.name for o in model.graph.output] == ["next_latent"]
    assert not {"TopK", "ScatterElements", "GatherElements"} & set(dense.graphs[0].ops)


def test_manifest_without_layer_cache_for_a_sparse_schedule_is_refused(tiny_bundles, tmp_path):
    import shutil

    from diffsparse.manifest import BundleError

    folder = tmp_path / "b"
    shutil.copytree(tiny_bundles["toca"], folder)
    data = json.loads((folder / "manifest.json").read_text())
    data["cache"] = [c for c in data["cache"] if c["name"].startswith("sampler.")]  # no layer entries
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="reuses tokens but the bundle records no layer cache"):
        Manifest.load(folder, verify=False)


def test_weights_are_stored_once(tiny_bundles, tiny_spec):
    folder = tiny_bundles["toca"]
    m = Manifest.load(folder)
    params = sum(p.numel() * 4 for p in tiny_spec.model.parameters())
    weights = (folder / "weights.bin").stat().st_size
    assert weights < 1.1 * params, "weights.bin must hold about one copy of the parameters"
    for g in m.graphs:
        model = onnx.load(str(folder / g.file), load_external_data=False)
        inline = sum(len(i.raw_data) for i in model.graph.initializer)
        assert inline < 0.05 * params
        external = [i for i in model.graph.initializer if i.data_location == TensorProto.EXTERNAL]
        assert external and all(e.external_data[0].value == "weights.bin" for e in external)
    # each graph still loads on its own with its weights
    full = onnx.load(str(folder / m.graphs[1].file))
    onnx.checker.check_model(full)


def test_graphs_stay_in_tensorrt_subset(tiny_bundles):
    for folder in tiny_bundles.values():
        m = Manifest.load(folder)
        for g in m.graphs:
            model = onnx.load(str(folder / g.file), load_external_data=False)
            assert tensorrt_problems(model) == []
            for node in model.graph.node:
                assert node.op_type != "NonZero"
        assert any("TopK" in g.ops and "ScatterElements" in g.ops for g in m.graphs) or all(
            all(k == m.schedule.num_tokens for k in g.keep) for g in m.graphs)


def _graph(nodes, inputs, outputs, inits=()):
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                             opset_imports=[helper.make_opsetid("", 18)])


def test_tensorrt_check_catches_violations():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5000])
    k = helper.make_tensor("k", TensorProto.INT64, [1], [TOPK_LIMIT + 1])
    vals = helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, TOPK_LIMIT + 1])
    idx = helper.make_tensor_value_info("i", TensorProto.INT64, [1, TOPK_LIMIT + 1])
    model = _graph([helper.make_node("TopK", ["x", "k"], ["v", "i"])], [x], [vals, idx], [k])
    assert any("K=3841" in p for p in tensorrt_problems(model))

    data = helper.make_tensor_value_info("d", TensorProto.FLOAT, [2, 4])
    ind = helper.make_tensor_value_info("ind", TensorProto.INT64, [2, 2])
    out = helper.make_tensor_value_info("o", TensorProto.FLOAT, [2, 2])
    model = _graph([helper.make_node("GatherElements", ["d", "ind"], ["o"], axis=1)], [data, ind], [out])
    assert any("not INT32" in p for p in tensorrt_problems(model))

    dyn = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    out = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4])
    model = _graph([helper.make_node("NonZero", ["y"], ["z"])], [dyn], [out])
    problems = tensorrt_problems(model)
    assert any("dynamic shape" in p for p in problems) and any("NonZero" in p for p in problems)


def test_existing_bundle_is_kept_without_overwrite(tiny_bundles, tiny_spec, tiny_schedules):
    folder = tiny_bundles["dense"]
    before = (folder / "manifest.json").read_text()
    with pytest.raises(ExportError, match="already exists"):
        export_bundle(tiny_spec, tiny_schedules["dense"], folder)
    assert (folder / "manifest.json").read_text() == before


def test_failed_export_leaves_nothing_behind(tmp_path, tiny_spec, tiny_schedules, monkeypatch):
    import diffsparse.export.bundle as bundle_mod

    good = tmp_path / "good"
    export_bundle(tiny_spec, tiny_schedules["dense"], good)
    before = sorted(p.name for p in good.iterdir())

    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(bundle_mod, "export_step", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_bundle(tiny_spec, tiny_schedules["toca"], good, config=ExportConfig(overwrite=True))
    assert sorted(p.name for p in good.iterdir()) == before, "the old bundle must survive a failed overwrite"
    assert Manifest.load(good).schedule.provenance["method"] == "dense"
    assert [p.name for p in tmp_path.iterdir()] == ["good"], "no temporary folder may be left"


def test_parity_failure_stops_the_export(tmp_path, tiny_spec, tiny_schedules, monkeypatch):
    import diffsparse.export.verify as verify_mod

    monkeypatch.setattr(verify_mod, "compare", lambda a, b: 0.5)
    with pytest.raises(ExportError, match="differ from the PyTorch step"):
        export_bundle(tiny_spec, tiny_schedules["toca"], tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_manifest_records_what_the_runtime_needs(tiny_bundles):
    data = json.loads((tiny_bundles["toca"] / "manifest.json").read_text())
    assert data["format"] == "diffsparse-bundle" and data["version"] == VERSION
    assert data["schedule"]["format"] == "diffsparse-schedule"
    assert len(data["sampler"]["timesteps"]) == data["schedule"]["num_steps"]
    assert [i["name"] for i in data["inputs"]][:2] == ["latent", "timestep"]
    assert 0.3 < data["macs"]["ratio"] < 0.7
    assert np.isclose(sum(data["macs"]["per_step"]), data["macs"]["total"])
    assert data["guidance_scale"] == 4.0  # the DiT family's default: the tiny built-in sets none


def test_too_little_disk_fails_before_writing(tmp_path, tiny_spec, tiny_schedules, monkeypatch):
    from collections import namedtuple

    import diffsparse.export.bundle as bundle_mod

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(bundle_mod.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(ExportError, match="GiB free; the bundle's weights alone need"):
        export_bundle(tiny_spec, tiny_schedules["dense"], tmp_path / "b")
    assert list(tmp_path.iterdir()) == []
