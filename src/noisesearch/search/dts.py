"""Diffusion Tree Sampling (Jain et al., arXiv 2506.20701): a tree over the denoising steps whose
nodes are states of earlier rollouts, with soft values backed up from final rewards.

The paper's terms, on the ``P`` trees of a problem (one per search):

* **tree**: a node at depth ``d`` is a state at the ``d``-th noise step (the root: the state reached
  from one ``x_T`` draw); the leaves at depth ``T`` are finished samples. Every rollout adds its whole
  path to the tree, so later iterations start from (reuse) the states earlier ones computed.
* **selection**: from the root, a node with fewer than ``children`` children is expanded; otherwise a
  child is drawn with probability proportional to ``exp(lambda V(child))`` (``selection="boltzmann"``,
  the paper's sampler) or taken greedily (``"greedy"``, the search variant DTS*).
* **expansion and rollout**: a new child takes the step with a fresh noise, and the rollout continues
  with fresh noise to a finished sample, a node at every noise step; the sample is scored (one reward
  call). A descent that ends on a leaf re-uses its reward at no cost.
* **soft value backup**: a leaf's value is its reward; an inner node's is the soft Bellman value of
  its children, ``V(n) = (1 / lambda) log mean_c exp(lambda V(c))``, recomputed along the path.

The returned sample is the best leaf of the tree (every leaf is a complete sample, already scored).

Budget: ``iterations=0`` (default) fits ``S``, the reward calls (one per rollout). The network
calls allowed are ``S`` rollouts of ``rollout_share`` of a full one each (at least one full one): a
rollout from a node at depth ``d`` costs only the steps below it, so reusing the tree buys more
rollouts per NFE. A search stops when the rollout its descent chose would not fit its allowance, when
it has made ``S`` rollouts, or after ``4 S`` descents. The plan is the allowance (a bound: the spend is at most it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from noisesearch.budget import Cost
from noisesearch.errors import NoiseSearchError
from noisesearch.sampling.samplers import State
from noisesearch.search.base import Problem, SearchResult, Strategy, nfe_between, noise_steps

SELECTIONS = ("boltzmann", "greedy")


class Tree:
    """The ``P`` trees as tensors indexed ``[tree, node]`` (node 0 = root); ``child[tree, node, k]`` is
    the ``k``-th child (-1: none yet)."""

    def __init__(self, trees: int, max_nodes: int, children: int, shape, device, dtype):
        self.child = torch.full((trees, max_nodes, children), -1, dtype=torch.long)
        self.depth = torch.zeros(trees, max_nodes, dtype=torch.long)
        self.value = torch.zeros(trees, max_nodes, dtype=torch.float64)
        self.x = torch.zeros((trees, max_nodes, *shape), device=device, dtype=dtype)
        self.x0 = torch.zeros_like(self.x)
        self.count = torch.ones(trees, dtype=torch.long)
        self.best_value = torch.full((trees,), float("-inf"), dtype=torch.float64)
        self.best_node = torch.zeros(trees, dtype=torch.long)

    def n_children(self, trees: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        return (self.child[trees, nodes] >= 0).sum(1)

    def add(self, trees: torch.Tensor, parents: torch.Tensor, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """A new child of each ``parents[i]`` in tree ``trees[i]`` holding (x, x0); its node ids."""
        new = self.count[trees].clone()
        slot = self.n_children(trees, parents)
        self.child[trees, parents, slot] = new
        self.depth[trees, new] = self.depth[trees, parents] + 1
        dev = self.x.device
        self.x[trees.to(dev), new.to(dev)], self.x0[trees.to(dev), new.to(dev)] = x, x0
        self.count[trees] += 1
        return new

    def soft_backup(self, trees: torch.Tensor, path: list[torch.Tensor], lam: float) -> None:
        """Recompute ``V(n) = (1/lambda) log mean_c exp(lambda V(c))`` bottom-up along each path
        (path[d][i]: the node of tree ``trees[i]`` at depth d; -1 past the end)."""
        for nodes in reversed(path):
            ok = nodes >= 0
            t, n = trees[ok], nodes[ok]
            ch = self.child[t, n]
            has = ch >= 0
            inner = has.any(1)
            if not bool(inner.any()):
                continue
            v = self.value[t.unsqueeze(1).expand_as(ch), ch.clamp_min(0)] * lam
            v = torch.where(has, v, torch.tensor(float("-inf"), dtype=v.dtype))
            soft = (torch.logsumexp(v, 1) - torch.log(has.sum(1).double())) / lam
            self.value[t[inner], n[inner]] = soft[inner]


@dataclass
class DTS(Strategy):
    """Diffusion tree sampling: grow a tree of rollouts, back soft values up, descend by them."""

    name = "dts"
    size_option = "iterations"
    plan_is_exact = False  # a rollout from a deeper node costs less: the plan is the allowance, a bound
    iterations: int = 0  # S: rollouts (reward calls) per search; 0 = fit to the budget
    children: int = 3  # B: children a node gets before the descent goes through it
    inverse_temperature: float = 10.0  # lambda of the soft values and of the Boltzmann selection
    selection: str = "boltzmann"  # boltzmann (DTS) | greedy (DTS*)
    rollout_share: float = 0.5  # network calls allowed per rollout, as a share of a full one

    def validate(self) -> None:
        if self.iterations < 0:
            raise NoiseSearchError("--iterations must be >= 0 (0 = fit to the budget)")
        if self.children < 1:
            raise NoiseSearchError("--children must be at least 1")
        if not 0 < self.inverse_temperature < float("inf"):
            raise NoiseSearchError(f"--inverse-temperature must be positive and finite, got {self.inverse_temperature}")
        if self.selection not in SELECTIONS:
            raise NoiseSearchError(f"--selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if not 0 < self.rollout_share <= 1:
            raise NoiseSearchError(f"--rollout-share must be in (0, 1], got {self.rollout_share}")

    # -- planning --
    def levels(self, problem: Problem) -> list[int]:
        """Sampler step of each depth: the noise steps, then the end (the leaves)."""
        return noise_steps(problem.sampler) + [problem.sampler.num_steps]

    def allowance(self, problem: Problem, size: int) -> int:
        """Network calls per search for the rollouts: ``size`` shares of a full one, at least one."""
        full = problem.sampler.nfe_to_end(self.levels(problem)[0])
        return max(full, math.ceil(size * self.rollout_share * full))

    def describe(self, size: int) -> str:
        return f"DTS with {size} rollout(s)"

    def cost(self, problem: Problem, size: int) -> Cost:
        s = problem.sampler
        prefix = s.start_nfe + nfe_between(s, 0, self.levels(problem)[0])
        return problem.nfe_cost(prefix + self.allowance(problem, size)) + problem.score_cost(size)

    # -- search --
    def run(self, problem: Problem, size: int) -> SearchResult:
        s, P = problem.sampler, problem.num_searches
        levels = self.levels(problem)
        T, ar = len(levels) - 1, torch.arange(P)
        root = problem.rollout(problem.start(1), until=levels[0])
        tree = Tree(P, 1 + size * T, self.children, s.noise_shape, s.denoiser.device, s.denoiser.dtype)
        tree.x[:, 0], tree.x0[:, 0] = root.x, root.x0
        allowance, cheapest = self.allowance(problem, size), s.nfe_to_end(levels[T - 1])
        to_end = torch.tensor([s.nfe_to_end(st) for st in levels])
        spent = torch.zeros(P, dtype=torch.long)
        rollouts = torch.zeros(P, dtype=torch.long)
        done = torch.zeros(P, dtype=torch.bool)  # out of rollouts or of network calls
        for _ in range(4 * size):
            done |= (rollouts >= size) | (spent + cheapest > allowance)
            if bool(done.all()):
                break
            path, stop = self.select(problem, tree, T)
            depth = tree.depth[ar, stop]
            leaf = depth >= T  # a descent to a leaf re-uses its reward at no cost
            done |= ~leaf & (spent + to_end[depth] > allowance)  # the next rollout does not fit: stop
            go = ~leaf & ~done
            trees = go.nonzero().flatten()
            if not trees.numel():
                continue
            below = self.expand_and_roll_out(problem, tree, trees, stop[trees], levels)
            spent[trees] += to_end[depth[trees]]
            rollouts[trees] += 1
            below = [torch.full((P,), -1, dtype=torch.long).index_put((trees,), n) for n in below]
            tree.soft_backup(ar, path + below, self.inverse_temperature)
        return SearchResult(x0=tree.x0[ar, tree.best_node], rewards=tree.best_value.float(), info={
            "iterations": size, "rollouts_mean": round(float(rollouts.double().mean()), 2),
            "nodes_mean": round(float(tree.count.double().mean()), 1),
            "nfe_unused_mean": round(float((allowance - spent).double().mean()), 1)})

    def select(self, problem: Problem, tree: Tree, T: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every tree's descent from the root, through nodes that have all their ``children`` (by
        Boltzmann sampling or greedily on the soft values), to a node to expand or a leaf. Returns the
        path (node per depth, -1 below a tree's stop) and the stop node of each tree."""
        P = tree.count.numel()
        ar = torch.arange(P)
        node = torch.zeros(P, dtype=torch.long)
        path = [node.clone()]
        # one uniform per tree and depth, drawn at once (each tree's from its own stream)
        u = problem.noise.uniform(ar.repeat_interleave(T), torch.float64).view(P, T) if self.selection != "greedy" else None
        for d in range(T):
            full = (tree.n_children(ar, node) >= self.children) & (tree.depth[ar, node] < T)
            if not bool(full.any()):
                break
            ch = tree.child[ar, node].clamp_min(0)
            logits = self.inverse_temperature * tree.value.gather(1, ch)
            if self.selection == "greedy":
                pick = logits.argmax(1)
            else:
                pick = (torch.softmax(logits, 1).cumsum(1) < u[:, d : d + 1]).sum(1).clamp_max(self.children - 1)
            nxt = ch[ar, pick]
            node = torch.where(full, nxt, node)
            path.append(torch.where(full, nxt, torch.full_like(nxt, -1)))
        return path, node

    def expand_and_roll_out(self, problem: Problem, tree: Tree, trees: torch.Tensor, parents: torch.Tensor,
                            levels: list[int]) -> list[torch.Tensor]:
        """Expand a child of each ``parents[i]`` and roll it out to a leaf, adding a node at every noise
        step; score the leaves. Trees advance in lockstep from the shallowest parent. Returns the new
        nodes per depth below the parents ([P-subset] each, -1 where a tree has none at that depth)."""
        depth = tree.depth[trees, parents]
        new_path = [torch.full((len(trees),), -1, dtype=torch.long) for _ in range(len(levels))]
        last = parents.clone()
        state: State | None = None
        rows = torch.zeros(0, dtype=torch.long)  # which of ``trees`` each row of ``state`` is
        for d in range(int(depth.min()), len(levels) - 1):
            joining = (depth == d).nonzero().flatten()
            if joining.numel():
                dev = tree.x.device
                t, p = trees[joining].to(dev), parents[joining].to(dev)
                fresh = State(x=tree.x[t, p], x0=tree.x0[t, p], step=levels[d], cond=problem.cond_rows(trees[joining]),
                              owner=trees[joining])
                state = fresh if state is None else State.cat([state, fresh])
                rows = torch.cat([rows, joining])
            state = problem.rollout(state, until=levels[d + 1])
            added = tree.add(trees[rows], last[rows], state.x, state.x0)
            last[rows] = added
            new_path[d + 1][rows] = added
        rewards = problem.score(state).double()
        t = trees[rows]
        leaves = last[rows]
        tree.value[t, leaves] = rewards
        better = rewards > tree.best_value[t]
        tree.best_value[t[better]], tree.best_node[t[better]] = rewards[better], leaves[better]
        return new_path[1:]


__all__ = ["DTS", "Tree", "SELECTIONS"]
