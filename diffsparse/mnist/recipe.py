"""A small class-conditional DiT trained on MNIST in pixel space, on CPU.

The model is diffusers' ``DiTTransformer2DModel``: 1 input/output channel (epsilon prediction),
32x32 images (MNIST padded by 2 px), patch 2 -> 16x16 = 256 tokens, ada_norm_zero conditioning
on timestep + class (``num_embeds_ada_norm=10``; label row 10 is the null class for
classifier-free guidance).

Class dropout: diffusers drops labels inside *each block's own* ``LabelEmbedding`` independently
(and once more for the output head), so with its built-in dropout the fully unconditional input
(null label in every block) is practically never seen in training.  We therefore switch the
built-in dropout off and replace the label of a random 10% of each batch by the null class 10
ourselves, consistently for the whole network.

Usage::

    python -m diffsparse.mnist.recipe --out /work/mnist_run --threads 1          # train
    python -m diffsparse.mnist.recipe --out /work/mnist_run --resume             # continue
    python -m diffsparse.mnist.recipe --out /work/mnist_run --eval               # sample + score

Outputs in ``--out``: ``model/`` (EMA weights, ``save_pretrained`` safetensors), ``train_log.jsonl``,
``train_config.json``, ``checkpoints/latest.pt`` (resumable) and ``checkpoints/ema_model/``
(EMA weights at the last checkpoint), and after ``--eval`` ``eval.json`` and ``samples.png``.
The training data is the MNIST *test* split (the only one available offline).

Sampling uses the project's DDIM (`diffsparse.sampler`, the arithmetic the exported step graphs run)
with the settings in `SAMPLER_SETTINGS`; image grids are `GenerationResult.grid`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffsparse.mnist.dataset import load_mnist_test
from diffsparse.mnist.metrics import evaluate_images, require_classifier
from diffsparse.models.zoo import BUILTINS, load_model
from diffsparse.runtime.pipeline import GenerationResult
from diffsparse.sampler import sampler_config

logger = logging.getLogger(__name__)

NUM_CLASSES = 10
NULL_CLASS = 10  # the extra LabelEmbedding row used as "no class" for CFG
GUIDANCE = BUILTINS["mnist-dit"].guidance_scale  # the shipped model's default, kept in one place
# The DDIM settings the demo model samples with (also shipped as its scheduler config, see
# sampling_scheduler).  No clip_sample: diffusers' DDIM clamps the predicted x0 but steps with the
# unclamped noise prediction, and that mismatch piles up stray strokes as steps are added (the
# shipped model fell from 97% accuracy at 10 steps to 71% at 50 with clipping; README, "Sampler").
SAMPLER_SETTINGS = dict(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                        set_alpha_to_one=False, timestep_spacing="trailing")
SAMPLER = sampler_config("ddim", SAMPLER_SETTINGS)  # the project's DDIM (eta 0), as the runtime runs it


@dataclass
class MnistDiTConfig:
    """Model and training recipe (defaults = the CPU recipe, ~90 min with one thread).

    Throughput measured on this machine's AMD EPYC (AVX2) with ``torch.set_num_threads(1)``, one
    full training step (forward + backward + AdamW), batch 64, 256 tokens:

    ======================================  ========  =======
    width x depth (heads x head_dim), act   params    img/s
    ======================================  ========  =======
    128 x 6 (4x32), gelu-approximate        2.12 M    18.9
    128 x 6 (4x32), gelu                    2.12 M    21.8
    128 x 6 (2x64), gelu                    2.12 M    23.5
    192 x 6 (6x32), gelu-approximate        4.61 M    11.2
    96  x 6 (3x32), gelu  <- default        1.23 M    35.6
    ======================================  ========  =======

    (exact-erf ``gelu`` is ~15% faster than the tanh approximation on this CPU.)  Default: 20 epochs
    x 156 steps of 64 = 3120 steps = 200k images -> ~90-95 min at ~36-37 img/s on one thread
    (36-38 img/s measured in the training loop itself, EMA and data handling included).
    """

    # model (diffusers DiTTransformer2DModel)
    num_layers: int = 6
    num_attention_heads: int = 3
    attention_head_dim: int = 32  # width = heads * head_dim = 96
    activation_fn: str = "gelu"
    dit_init: bool = True  # DiT paper init (zero adaLN gates and output layer); see dit_init_
    sample_size: int = 32
    patch_size: int = 2  # -> 256 tokens
    # diffusion
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    class_dropout_prob: float = 0.1  # fraction of labels replaced by NULL_CLASS (CFG training)
    # optimisation
    lr: float = 1.5e-3
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05  # cosine decay from lr to lr * min_lr_ratio
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    batch_size: int = 64
    epochs: int = 20
    max_steps: int | None = None  # overrides epochs when set
    ema_decay: float = 0.999  # with warm-up min(decay, (1+n)/(10+n)); EMA weights are saved
    # bookkeeping
    seed: int = 0
    threads: int = 1
    log_every: int = 20
    ckpt_every: int = 200
    data_dir: str | None = None  # default: see diffsparse.mnist.dataset.default_data_dir

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


def build_model(cfg: MnistDiTConfig | None = None):
    """A freshly initialised pixel-space class-conditional DiT for 32x32 MNIST."""
    from diffusers import DiTTransformer2DModel

    cfg = cfg or MnistDiTConfig()
    model = DiTTransformer2DModel(
        num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim,
        in_channels=1,
        out_channels=1,
        num_layers=cfg.num_layers,
        sample_size=cfg.sample_size,
        patch_size=cfg.patch_size,
        activation_fn=cfg.activation_fn,
        num_embeds_ada_norm=NUM_CLASSES,
        norm_type="ada_norm_zero",
    )
    if cfg.dit_init:
        dit_init_(model)
    return model


@torch.no_grad()
def dit_init_(model) -> None:
    """Initialise like the DiT reference code (Peebles & Xie, ``DiT.initialize_weights``): xavier
    linears, N(0, 0.02) label table and timestep MLP, and zeros for every adaLN-zero modulation and
    the output projection, so each block starts as the identity.  diffusers' own init is PyTorch's
    default; on a pilot (350 steps) this trained faster."""
    from diffusers.models.embeddings import LabelEmbedding, TimestepEmbedding
    from diffusers.models.normalization import AdaLayerNormZero

    nn = torch.nn
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    w = model.pos_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.pos_embed.proj.bias)
    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            nn.init.normal_(m.embedding_table.weight, std=0.02)
        elif isinstance(m, TimestepEmbedding):
            nn.init.normal_(m.linear_1.weight, std=0.02)
            nn.init.normal_(m.linear_2.weight, std=0.02)
        elif isinstance(m, AdaLayerNormZero):
            nn.init.zeros_(m.linear.weight)
            nn.init.zeros_(m.linear.bias)
    for lin in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)


def disable_builtin_class_dropout(model) -> None:
    """Turn off diffusers' per-block label dropout (we drop labels consistently ourselves)."""
    from diffusers.models.embeddings import LabelEmbedding

    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = 0.0


def make_train_scheduler(cfg: MnistDiTConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule)


def lr_at(step: int, total: int, cfg: MnistDiTConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def _ema_update(ema, model, decay: float) -> None:
    e, m = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(e, m, 1.0 - decay)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(cfg: MnistDiTConfig, out_dir: str | os.PathLike, resume: bool = False) -> Path:
    """Train and write ``out_dir/model`` (EMA weights); returns that path."""
    out = Path(out_dir)
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = ckpt_dir / "latest.pt"
    ck = None
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        # the run's length, logging and threads may change on resume; the recipe may not
        keep = {k: getattr(cfg, k) for k in ("epochs", "max_steps", "threads", "log_every", "ckpt_every")}
        saved = dataclasses.replace(MnistDiTConfig(**ck["config"]), **keep)
        if saved != cfg:
            logger.warning("resuming with the checkpoint's recipe, not the one given: %s", saved)
        cfg = saved
    elif resume:
        logger.warning("--resume given but %s does not exist; starting fresh", ckpt_path)
    torch.set_num_threads(cfg.threads)

    images, labels = load_mnist_test(cfg.data_dir)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    n = len(x_all)
    steps_per_epoch = n // cfg.batch_size  # drop_last
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch

    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    disable_builtin_class_dropout(model)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    sched = make_train_scheduler(cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # noise, timesteps, label dropout
    step, elapsed_before = 0, 0.0

    if ck is not None:
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        step, elapsed_before = ck["step"], ck["elapsed"]
        logger.info("resumed from %s at step %d", ckpt_path, step)
        del ck
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    log_f = open(out / "train_log.jsonl", "a" if step > 0 else "w")

    nparams = sum(p.numel() for p in model.parameters())
    logger.info("DiT width %d depth %d: %.2fM params; %d steps (%d/epoch), batch %d, %d thread(s)",
                cfg.width, cfg.num_layers, nparams / 1e6, total, steps_per_epoch, cfg.batch_size, cfg.threads)

    def save_checkpoint() -> None:
        _atomic_torch_save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                            "gen": gen.get_state(), "step": step, "elapsed": elapsed_before + time.time() - t_start,
                            "config": dataclasses.asdict(cfg)}, ckpt_path)
        ema.save_pretrained(ckpt_dir / "ema_model", safe_serialization=True)

    model.train()
    t_start = time.time()
    t_log, loss_acc, n_acc, seen_since = time.time(), 0.0, 0, 0
    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        for i in range(offset, steps_per_epoch):
            if step >= total:
                break
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            x0, y = x_all[idx], y_all[idx].clone()
            b = len(idx)
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, cfg.num_train_timesteps, (b,), generator=gen)
            y[torch.rand(b, generator=gen) < cfg.class_dropout_prob] = NULL_CLASS
            xt = sched.add_noise(x0, noise, t)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg)
            pred = model(xt, timestep=t, class_labels=y).sample
            loss = torch.nn.functional.mse_loss(pred, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            _ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
            step += 1
            loss_acc, n_acc, seen_since = loss_acc + loss.item(), n_acc + 1, seen_since + b

            if step % cfg.log_every == 0 or step == total:
                now = time.time()
                rec = {"step": step, "epoch": step / steps_per_epoch, "loss": loss_acc / n_acc,
                       "lr": opt.param_groups[0]["lr"], "img_s": seen_since / (now - t_log),
                       "elapsed": elapsed_before + now - t_start}
                log_f.write(json.dumps(rec) + "\n")
                log_f.flush()
                eta = (total - step) * cfg.batch_size / max(rec["img_s"], 1e-9)
                logger.info("step %d/%d epoch %.2f loss %.4f lr %.2e %.1f img/s elapsed %.0fs eta %.0fs",
                            step, total, rec["epoch"], rec["loss"], rec["lr"], rec["img_s"], rec["elapsed"], eta)
                t_log, loss_acc, n_acc, seen_since = now, 0.0, 0, 0
            if step % cfg.ckpt_every == 0 and step < total:
                save_checkpoint()
    save_checkpoint()
    log_f.close()
    model_dir = out / "model"
    ema.save_pretrained(model_dir, safe_serialization=True)
    logger.info("saved EMA model to %s (%.0fs total)", model_dir, elapsed_before + time.time() - t_start)
    return model_dir


@torch.no_grad()
def sample(model, labels, steps: int = 10, guidance: float = GUIDANCE, seed: int = 0,
           batch_size: int = 250) -> torch.Tensor:
    """DDIM (eta 0, `SAMPLER`) + classifier-free guidance (null class 10). Returns images
    (N,1,32,32) in [-1, 1]. The starting noise of each batch is drawn in turn from one torch
    generator seeded with `seed`, so samples depend on batch_size."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    model.eval()
    cfgm = model.config
    plan = SAMPLER.plan(steps)
    timesteps = [int(t) for t in plan.timesteps]
    coefficients = torch.from_numpy(plan.coefficients)
    outs = []
    gen = torch.Generator().manual_seed(seed)
    for s in range(0, len(labels), batch_size):
        y = labels[s : s + batch_size]
        b = len(y)
        x = torch.randn((b, cfgm.in_channels, cfgm.sample_size, cfgm.sample_size), generator=gen)
        y2 = torch.cat([y, torch.full_like(y, NULL_CLASS)])
        state = [torch.zeros_like(x) for _ in SAMPLER.state]
        for t, coef in zip(timesteps, coefficients):
            tt = torch.full((2 * b,), t, dtype=torch.long)
            eps = model(torch.cat([x, x]), timestep=tt, class_labels=y2).sample
            ec, eu = eps.chunk(2)
            x, state = SAMPLER.update(x, eu + guidance * (ec - eu), coef, state)
        outs.append(x.clamp(-1, 1))
    return torch.cat(outs)


def sample_grid(model_dir, n_per_class: int = 10, steps: int = 10, guidance: float = GUIDANCE, seed: int = 0,
                out_png: str | os.PathLike | None = None, threads: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``n_per_class`` images of each digit from ``model_dir`` (a transformer or pipeline
    folder, or the built-in name ``mnist-dit``); optionally save a PNG grid (one column per digit,
    row i = i-th sample, pixels doubled).  Returns ``(images, labels)``."""
    torch.set_num_threads(threads)
    _, model, _ = load_model(model_dir)
    labels = torch.arange(NUM_CLASSES).repeat(n_per_class)
    t0 = time.perf_counter()
    images = sample(model, labels, steps=steps, guidance=guidance, seed=seed)
    if out_png is not None:
        result = GenerationResult(samples=images.numpy(), class_labels=labels.numpy(), step_seconds=[],
                                  total_seconds=time.perf_counter() - t0, backend="torch", device="cpu")
        result.grid(columns=NUM_CLASSES, scale=2).save(out_png)
    return images, labels


def evaluate(model_dir, n_per_class: int = 50, steps: int = 10, guidance: float = GUIDANCE, seed: int = 0,
             n_real: int = 1000, out_png: str | os.PathLike | None = None, threads: int = 1,
             data_dir: str | None = None) -> dict:
    """Sample ``n_per_class`` per digit and score with diffsparse.mnist.metrics: class accuracy and
    MNIST-FID against ``n_real`` real test images (a fixed random subset)."""
    require_classifier()  # before minutes of sampling
    t0 = time.time()
    images, labels = sample_grid(model_dir, n_per_class, steps, guidance, seed, out_png, threads)
    real, _ = load_mnist_test(data_dir)
    real = real[np.random.default_rng(1234).permutation(len(real))[:n_real]]
    res = evaluate_images(images, labels, real_images=real)
    res.update(steps=steps, guidance=guidance, n_per_class=n_per_class, seconds=time.time() - t0)
    return res


def sampling_scheduler():
    """diffusers' DDIMScheduler with `SAMPLER_SETTINGS`: the scheduler config shipped with the model."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SAMPLER_SETTINGS)


def package_model(model_dir: str | os.PathLike, dest: str | os.PathLike,
                  train_log: str | os.PathLike | None = None) -> Path:
    """Write the trained model as a diffusers pipeline folder (the layout of the built-in
    `mnist-dit`): transformer/ (config + safetensors), scheduler/ (DDIM config), SHA256SUMS and a
    copy of the training log. Written to a temporary folder and renamed when complete."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _, model, _ = load_model(model_dir)
    model.save_pretrained(tmp / "transformer", safe_serialization=True)
    sampling_scheduler().save_config(tmp / "scheduler")
    if train_log is not None:
        shutil.copy(train_log, tmp / "train_log.jsonl")
    sums = []
    for f in sorted(tmp.rglob("*")):
        if f.is_file():
            sums.append(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.relative_to(tmp).as_posix()}")
    (tmp / "SHA256SUMS.txt").write_text("\n".join(sums) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def main(argv: list[str] | None = None) -> None:
    defaults = MnistDiTConfig()
    p = argparse.ArgumentParser(prog="python -m diffsparse.mnist.recipe", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest.pt")
    p.add_argument("--eval", action="store_true", help="sample OUT/model (or --model-dir) and score it")
    p.add_argument("--model-dir", default=None, help="model to evaluate or package (default OUT/model)")
    p.add_argument("--package", default=None, metavar="DEST",
                   help="write OUT/model as a pipeline folder to DEST (e.g. diffsparse/weights/mnist-dit)")
    p.add_argument("--n-per-class", type=int, default=50)
    # the shipped model's best setting (sweep in the README)
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=GUIDANCE)
    for f in ("epochs", "max_steps", "batch_size", "lr", "warmup_steps", "num_layers", "num_attention_heads",
              "attention_head_dim", "seed", "threads", "log_every", "ckpt_every", "ema_decay", "data_dir"):
        d = getattr(defaults, f)
        typ = {"lr": float, "ema_decay": float, "data_dir": str, "max_steps": int}.get(f, type(d))
        p.add_argument("--" + f.replace("_", "-"), type=typ, default=d, help=f"default {d}")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    if a.package:
        log = out / "train_log.jsonl"
        print(package_model(a.model_dir or out / "model", a.package, log if log.is_file() else None))
        return
    if a.eval:
        out.mkdir(parents=True, exist_ok=True)
        res = evaluate(a.model_dir or out / "model", a.n_per_class, a.sample_steps, a.guidance, a.seed,
                       out_png=out / "samples.png", threads=a.threads, data_dir=a.data_dir)
        (out / "eval.json").write_text(json.dumps(res, indent=2))
        print(json.dumps(res))
        return
    cfg = dataclasses.replace(defaults, **{k: getattr(a, k) for k in (
        "epochs", "max_steps", "batch_size", "lr", "warmup_steps", "num_layers", "num_attention_heads",
        "attention_head_dim", "seed", "threads", "log_every", "ckpt_every", "ema_decay", "data_dir")})
    train(cfg, out, resume=a.resume)


if __name__ == "__main__":
    main()
