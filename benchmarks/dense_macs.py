"""Dense MACs of the full-size built-in models at their reference settings, counted by each family's
spec on the meta device (no weights are materialised, so FLUX's 12B parameters cost nothing).
Prints the README's table.

    python benchmarks/dense_macs.py
"""

from __future__ import annotations

import argparse
import json

from diffsparse.models.zoo import BUILTINS, spec_from_config

# name: (sampler steps of the paper's setting, classifier-free guidance)
MODELS = {
    "dit-xl-2": (50, True),
    "pixart-alpha-256": (20, True),
    "flux-schnell-256": (4, False),
    "wan2.1-1.3b": (20, True),
}


def dense_macs(name: str, steps: int, guidance: bool) -> dict:
    b = BUILTINS[name]
    spec = spec_from_config(b.family, b.diffusers_class, b.config, 1, guidance, {}, b.options)
    params = sum(p.numel() for p in spec.model.parameters())
    per_step = spec.step_macs(spec.dense_keep())
    floor = spec.step_macs([0] * len(spec.layers))  # every layer reused from the cache
    return {"model": name, "family": b.family, "params": params, "tokens": spec.num_tokens,
            "cacheable_layers": len(spec.layers), "options": b.options, "steps": steps, "guidance": guidance,
            "macs_per_step": per_step, "removable_share": 1 - floor / per_step, "macs_per_image": per_step * steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()
    rows = [dense_macs(name, *setting) for name, setting in MODELS.items()]
    print("| model | params | tokens N | cacheable layers L | steps (CFG) | dense TMACs / step | dense TMACs / image "
          "| removable by token reuse |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        cfg = "CFG" if r["guidance"] else "no CFG"
        print(f"| {r['model']} | {r['params'] / 1e9:.2f} B | {r['tokens']:,} | {r['cacheable_layers']} | "
              f"{r['steps']} ({cfg}) | {r['macs_per_step'] / 1e12:.3f} | {r['macs_per_image'] / 1e12:.2f} | "
              f"{100 * r['removable_share']:.1f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
