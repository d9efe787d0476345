"""The MNIST recipe: sampling with the project's DDIM, grids, the eval check, and its CLI end to end
on a 1-block model."""

import json

import pytest
import torch
from PIL import Image

from diffsparse.mnist import metrics, recipe
from diffsparse.mnist.dataset import default_data_dir
from diffsparse.mnist.recipe import NULL_CLASS, MnistDiTConfig, build_model
from diffsparse.models.zoo import WEIGHTS_DIR

TINY = MnistDiTConfig(num_layers=1, num_attention_heads=2, attention_head_dim=8, dit_init=False)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(TINY).eval()


@torch.no_grad()
def _diffusers_ddim_sample(model, labels, steps, guidance, seed, batch_size):
    """The recipe's former loop: diffusers' DDIMScheduler.step (eta 0) with the shipped settings."""
    outs, gen = [], torch.Generator().manual_seed(seed)
    for s in range(0, len(labels), batch_size):
        y = labels[s : s + batch_size]
        sch = recipe.sampling_scheduler()
        sch.set_timesteps(steps)
        x = torch.randn((len(y), 1, 32, 32), generator=gen)
        y2 = torch.cat([y, torch.full_like(y, NULL_CLASS)])
        for t in sch.timesteps:
            tt = torch.full((2 * len(y),), int(t), dtype=torch.long)
            ec, eu = model(torch.cat([x, x]), timestep=tt, class_labels=y2).sample.chunk(2)
            x = sch.step(eu + guidance * (ec - eu), t, x, eta=0.0, generator=gen).prev_sample
        outs.append(x.clamp(-1, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("steps", [1, 4, 10])
def test_sample_matches_diffusers_ddim(tiny_model, steps):
    labels = torch.arange(10)[:7]
    ours = recipe.sample(tiny_model, labels, steps=steps, guidance=2.0, seed=3, batch_size=3)
    ref = _diffusers_ddim_sample(tiny_model, labels, steps, 2.0, 3, 3)
    assert ours.shape == (7, 1, 32, 32)
    assert (ours - ref).abs().max().item() <= 1e-6


def test_sample_grid_png_has_one_column_per_digit(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "model")
    images, labels = recipe.sample_grid(tmp_path / "model", n_per_class=2, steps=2, out_png=tmp_path / "g.png")
    assert images.shape == (20, 1, 32, 32) and labels.tolist() == list(range(10)) * 2
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == (10 * 32 * 2, 2 * 32 * 2) and im.mode == "L"


def test_evaluate_checks_the_classifier_before_sampling(monkeypatch, tmp_path):
    def missing():
        raise metrics.ClassifierUnavailable(f"install it with: {metrics.INSTALL_HINT}")

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before the classifier check")

    monkeypatch.setattr(metrics, "classifier_weights_path", missing)
    monkeypatch.setattr(recipe, "sample_grid", no_sampling)
    with pytest.raises(metrics.ClassifierUnavailable, match="pip install --no-deps digit-recognizer-py"):
        recipe.evaluate(tmp_path / "model", n_per_class=1)


def test_cli_trains_resumes_packages_and_evaluates(tmp_path):
    out = tmp_path / "run"
    small = ["--num-layers", "1", "--num-attention-heads", "2", "--attention-head-dim", "8", "--batch-size", "8",
             "--log-every", "1", "--ckpt-every", "1", "--threads", "1", "--lr", "1e-3", "--warmup-steps", "1",
             "--ema-decay", "0.9", "--seed", "1", "--epochs", "1"]
    recipe.main(["--out", str(out), "--max-steps", "2", *small])
    recipe.main(["--out", str(out), "--max-steps", "3", "--resume", *small])
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert (out / "model" / "config.json").is_file() and (out / "checkpoints" / "latest.pt").is_file()

    recipe.main(["--out", str(out), "--package", str(tmp_path / "pipeline")])
    assert (tmp_path / "pipeline" / "scheduler" / "scheduler_config.json").is_file()
    assert (tmp_path / "pipeline" / "train_log.jsonl").is_file()
    def sched(folder):
        cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        return {k: v for k, v in cfg.items() if k != "_diffusers_version"}
    assert sched(tmp_path / "pipeline") == sched(WEIGHTS_DIR / "mnist-dit")  # the shipped model's sampler

    recipe.main(["--out", str(out), "--eval", "--model-dir", str(tmp_path / "pipeline"), "--n-per-class", "1",
                 "--sample-steps", "2", "--guidance", "1.5", "--data-dir", str(default_data_dir())])
    res = json.loads((out / "eval.json").read_text())
    assert res["n"] == 10 and res["steps"] == 2 and res["guidance"] == 1.5 and 0 <= res["accuracy"] <= 1
    assert (out / "samples.png").is_file()
