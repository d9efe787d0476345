"""Baselines under the same budget as the learned schedule (paper §4, A.5.4). The hand
baselines (FORA-style reuse, fewer steps, ToCa) are built-in schedules (diffsparse/builtin_schedules.py).

- `random_search` / `genetic_search`: populations of allocations that meet the budget exactly,
  scored by a fitness function (lower is better). The paper scores by FID; we score by the same
  distillation loss the trainer minimises on a fixed evaluation batch (`loss_fitness`), which is
  what can be afforded on a CPU. Random candidates are DP solutions for random costs; GA children
  (uniform crossover, mutation with probability 0.01 per gene) are repaired onto the budget by a DP
  whose costs prefer the child's own choices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from diffsparse.train.costs import Budget, allocate_unified


log = logging.getLogger(__name__)

Fitness = Callable[[list[list[int]]], float]


def _random_costs(rng: np.random.Generator, shape) -> torch.Tensor:
    return torch.from_numpy(rng.random(shape)).to(torch.float32)


def random_search(budget: Budget, units: int, shape: tuple[int, int, int], fitness: Fitness,
                  iterations: int = 32, seed: int = 0) -> tuple[list[list[int]], float, list[float]]:
    """Best of `iterations` random allocations that meet the budget; also the fitness trace."""
    rng = np.random.default_rng(seed)
    best, best_f, trace = None, np.inf, []
    for _ in range(iterations):
        keep = allocate_unified(_random_costs(rng, shape), budget, units).keep
        f = fitness(keep)
        if f < best_f:
            best, best_f = keep, f
        trace.append(best_f)
    return best, best_f, trace


def genetic_search(budget: Budget, units: int, shape: tuple[int, int, int], fitness: Fitness,
                   population: int = 50, generations: int = 10, mutation: float = 0.01, elite: int = 2,
                   seed: int = 0, initial: list[list[list[int]]] | None = None
                   ) -> tuple[list[list[int]], float, list[float]]:
    """A GA over allocations (A.5.4): tournament parents, uniform crossover, per-gene mutation,
    DP repair onto the exact budget, `elite` best kept. Returns the best, its fitness, the trace."""
    rng = np.random.default_rng(seed)
    counts = budget.token_counts
    col = {k: j for j, k in enumerate(counts)}

    def to_choice(keep):
        return np.array([[col[k] for k in row] for row in keep])

    def repair(choice):
        cost = torch.from_numpy(rng.random(shape) * 1e-3).to(torch.float32)
        cost -= torch.nn.functional.one_hot(torch.from_numpy(choice), shape[2]).to(torch.float32)
        return allocate_unified(cost, budget, units).keep

    pop = [allocate_unified(_random_costs(rng, shape), budget, units).keep for _ in range(population)]
    if initial:
        pop[: len(initial)] = [repair(to_choice(k)) for k in initial]
    scores = [fitness(k) for k in pop]
    trace = [float(min(scores))]
    for gen in range(generations):
        order = np.argsort(scores)
        nxt = [pop[i] for i in order[:elite]]
        nxt_scores = [scores[i] for i in order[:elite]]
        while len(nxt) < population:
            a, b = (min(rng.choice(population, 2, replace=False), key=lambda i: scores[i]) for _ in range(2))
            ca, cb = to_choice(pop[a]), to_choice(pop[b])
            child = np.where(rng.random(ca.shape) < 0.5, ca, cb)
            flip = rng.random(child.shape) < mutation
            child[flip] = rng.integers(0, shape[2], int(flip.sum()))
            keep = repair(child)
            nxt.append(keep)
            nxt_scores.append(fitness(keep))
        pop, scores = nxt, nxt_scores
        trace.append(float(min(scores)))
        log.info("GA generation %d best fitness %.5g", gen + 1, trace[-1])
    i = int(np.argmin(scores))
    return pop[i], float(scores[i]), trace


def loss_fitness(rollout, loss_fn, latents: torch.Tensor, conditioning, guidance_scale: float) -> Fitness:
    """Fitness = distillation loss of an allocation on a fixed batch (teacher sampled once)."""
    teacher = rollout.teacher(latents, conditioning, guidance_scale)

    @torch.no_grad()
    def fitness(keep) -> float:
        student = rollout.sample(latents, conditioning, guidance_scale, rollout.weights_for(keep))
        return float(loss_fn(student, teacher)[0])

    return fitness
