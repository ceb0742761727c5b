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
from bisect import bisect_right
from dataclasses import dataclass, replace

import numpy as np
import torch

from noisesearch.budget import Cost
from noisesearch.errors import NoiseSearchError
from noisesearch.models.base import cond_index
from noisesearch.sampling.samplers import State
from noisesearch.search.base import Problem, SearchResult, Strategy, nfe_between, noise_steps

SELECTIONS = ("boltzmann", "greedy")


def chain_value(value: np.ndarray, lam: float) -> np.ndarray:
    """The soft value of a node whose one child has ``value``: ``(1/lambda) log exp(lambda v)``
    computed as :meth:`Tree.backup_level` computes it (a one-term log-sum-exp is ``0 + lambda v``,
    the log of one child ``0``), without the reductions."""
    return (value * lam + 0.0) / lam


class Tree:
    """The ``P`` trees in flat arrays: node ``n`` of tree ``p`` is row ``p * max_nodes + n`` (its root is
    row ``base[p]``); ``child[row, k]`` is the row of the node's ``k``-th child (-1: none yet). The
    bookkeeping is in numpy arrays (small and many operations: cheaper than tensors); the states
    ``x``/``x0`` are tensors on the denoiser's device, and the log-sum-exp and softmax are torch's.

    What selection needs of a node with all its children is cached with its soft value: ``cum[row]``,
    the cumulative Boltzmann probabilities of its children, and ``greedy[row]``, the slot of its best child. Both
    change only when a child's value does, on a backup through the node, which recomputes them."""

    def __init__(self, trees: int, max_nodes: int, children: int, shape, device, dtype):
        rows = trees * max_nodes
        self.base = np.arange(trees, dtype=np.int64) * max_nodes
        self.child = np.full((rows, children), -1, dtype=np.int64)
        self.n_children = np.zeros(rows, dtype=np.int64)
        self.full = np.zeros(rows, dtype=bool)  # has all its children: selection goes through it
        self.depth = np.zeros(rows, dtype=np.int64)
        # one more: the value of "no child" (row -1), -inf, which the soft value's mean leaves out
        self.value = np.zeros(rows + 1, dtype=np.float64)
        self.value[-1] = -np.inf
        self.log_count = torch.log(torch.arange(children + 1, dtype=torch.float64)).numpy()  # log of a node's children
        self.cum = np.zeros((rows, children), dtype=np.float64)
        self.greedy = np.zeros(rows, dtype=np.int64)
        self.x = torch.empty((rows, *shape), device=device, dtype=dtype)  # a node's rows are written when it is made
        self.x0 = torch.empty_like(self.x)
        self.count = np.ones(trees, dtype=np.int64)
        self.best_value = np.full(trees, -np.inf)
        self.best_node = self.base.copy()

    def add_paths(self, parents: np.ndarray, first: np.ndarray, nodes: np.ndarray, depth: np.ndarray,
                  values: np.ndarray, leaves: int) -> None:
        """New paths: ``nodes`` (rows, at ``depth``, holding ``values``; the last ``leaves`` of them the
        leaves) form a chain of single children below each ``parents[i]``, whose new child is ``first[i]``
        (``nodes`` are consecutive rows within a path: a node's child is the next row)."""
        slot = self.n_children[parents]
        self.child[parents, slot] = first
        self.n_children[parents] = slot + 1
        self.full[parents] = slot + 1 >= self.child.shape[1]
        inner = nodes[: nodes.size - leaves]
        self.child[inner, 0] = inner + 1
        self.n_children[inner] = 1
        self.full[inner] = self.child.shape[1] == 1
        self.depth[nodes] = depth
        self.value[nodes] = values

    def backup_level(self, nodes: np.ndarray, lam: float, boltzmann: bool) -> None:
        """``V(n) = (1/lambda) log mean_c exp(lambda V(c))`` for each of ``nodes`` (every one with a
        child), and its selection cache."""
        v = torch.from_numpy(self.value[self.child[nodes]] * lam)  # -inf where no child
        self.value[nodes] = (torch.logsumexp(v, 1).numpy() - self.log_count[self.n_children[nodes]]) / lam
        if boltzmann:
            self.cum[nodes] = torch.softmax(v, 1).cumsum(1).numpy()
        else:
            self.greedy[nodes] = v.argmax(1).numpy()


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
        T = len(levels) - 1
        root = problem.rollout(problem.start(1), until=levels[0])
        tree = Tree(P, 1 + size * T, self.children, s.noise_shape, s.denoiser.device, s.denoiser.dtype)
        base = torch.from_numpy(tree.base).to(tree.x.device)
        tree.x[base], tree.x0[base] = root.x, root.x0
        allowance, cheapest = self.allowance(problem, size), s.nfe_to_end(levels[T - 1])
        to_end = np.array([s.nfe_to_end(st) for st in levels], dtype=np.int64)
        spent = np.zeros(P, dtype=np.int64)
        rollouts = np.zeros(P, dtype=np.int64)
        done = np.zeros(P, dtype=bool)  # out of rollouts or of network calls
        for _ in range(4 * size):
            done |= (rollouts >= size) | (spent + cheapest > allowance)
            if done.all():
                break
            path, stop = self.select(problem, tree, T)
            depth = tree.depth[stop]
            leaf = depth >= T  # a descent to a leaf re-uses its reward at no cost
            done |= ~leaf & (spent + to_end[depth] > allowance)  # the next rollout does not fit: stop
            trees = np.flatnonzero(~leaf & ~done)
            if not trees.size:
                continue
            self.expand_and_roll_out(problem, tree, trees, stop[trees], path, levels)
            spent[trees] += to_end[depth[trees]]
            rollouts[trees] += 1
        best = torch.from_numpy(tree.best_node).to(tree.x0.device)
        return SearchResult(x0=tree.x0[best], rewards=torch.from_numpy(tree.best_value).float(), info={
            "iterations": size, "rollouts_mean": round(float(rollouts.mean()), 2),
            "nodes_mean": round(float(tree.count.mean()), 1),
            "nfe_unused_mean": round(float((allowance - spent).mean()), 1)})

    def select(self, problem: Problem, tree: Tree, T: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Every tree's descent from the root, through nodes that have all their ``children`` (by
        Boltzmann sampling or greedily on the soft values), to a node to expand or a leaf. Returns the
        path (node row per depth; below a tree's stop, its stop node again) and the stop node of each tree."""
        P, B = tree.count.size, self.children
        node = tree.base
        path = [node]
        # one uniform per tree and depth, drawn at once (each tree's from its own stream)
        greedy = self.selection == "greedy"
        u = None if greedy else problem.noise.uniform(torch.arange(P).repeat_interleave(T), torch.float64).view(P, T).numpy()
        for d in range(T):
            full = tree.full[node]  # a leaf has no children: never full
            if not full.any():
                break
            pick = tree.greedy[node] if greedy else np.minimum((tree.cum[node] < u[:, d : d + 1]).sum(1), B - 1)
            node = np.where(full, tree.child[node, pick], node)
            path.append(node)
        return path, node

    def expand_and_roll_out(self, problem: Problem, tree: Tree, trees: np.ndarray, parents: np.ndarray,
                            path: list[np.ndarray], levels: list[int]) -> None:
        """Expand a child of each ``parents[i]`` and roll it out to a leaf, adding a node at every noise
        step; score the leaves and back the values up. Trees advance in lockstep from the shallowest
        parent (rows ordered by the depth they join at); the new nodes of a tree are consecutive rows."""
        T, dev = len(levels) - 1, tree.x.device
        depth = tree.depth[parents]
        order = np.argsort(depth, kind="stable")
        trees, parents, depth = trees[order], parents[order], depth[order]
        first = tree.base[trees] + tree.count[trees]  # row of each tree's new child
        off = first - depth - 1  # row of a tree's new node at depth e: off + e
        starts, owner, at = depth.tolist(), torch.from_numpy(trees), torch.from_numpy(parents).to(dev)
        x, x0, cond = tree.x[at], tree.x0[at], problem.cond_rows(owner)  # the parents' states, every row's condition
        state: State | None = None
        joined, offs, sizes, xs, x0s = 0, [], [], [], []
        for d in range(starts[0], T):
            n = bisect_right(starts, d)
            if state is None:
                state = State(x=x[:n], x0=x0[:n], step=levels[d], cond=cond_index(cond, slice(0, n)), owner=owner[:n])
            elif n > joined:  # rows join at their parent's step (as ``State.cat`` would join them)
                state = replace(state, x=torch.cat([state.x, x[joined:n]]), x0=torch.cat([state.x0, x0[joined:n]]),
                                cond=cond_index(cond, slice(0, n)), owner=owner[:n])
            joined = n
            state = problem.rollout(state, until=levels[d + 1])
            offs.append(off[:n])
            sizes.append(n)
            xs.append(state.x)
            x0s.append(state.x0)
        rewards = problem.score(state).double().numpy()
        self.store(tree, trees, parents, first, offs, sizes, (xs, x0s), rewards, T)
        tree.count[trees] += T - depth
        top = starts[-1]  # the deepest stop: above it, back up along the descents
        at = np.arange(top + 1)[:, None]
        nodes = np.where(depth >= at, np.stack(path[: top + 1])[:, trees], off + at)  # [depth, tree]: descent, new path
        for d in range(top, -1, -1):
            tree.backup_level(nodes[d], self.inverse_temperature, self.selection != "greedy")

    def store(self, tree: Tree, trees, parents, first, offs, sizes, states, rewards: np.ndarray, T: int) -> None:
        """Write the new paths into the tree: states (``states``: x and x0 per step), depths, and values (a
        leaf's is its reward, a node's on the new path the soft value of its one child); remember each
        tree's best leaf."""
        depth = np.repeat(np.arange(T - len(sizes) + 1, T + 1), sizes)
        nodes = np.concatenate(offs) + depth
        at = torch.from_numpy(nodes).to(tree.x.device)
        tree.x.index_copy_(0, at, torch.cat(states[0]))
        tree.x0.index_copy_(0, at, torch.cat(states[1]))
        chain = [rewards]  # chain[j]: the value j levels above the leaf
        for _ in range(len(sizes) - 1):
            chain.append(chain_value(chain[-1], self.inverse_temperature))
        values = np.concatenate([chain[len(sizes) - 1 - i][:n] for i, n in enumerate(sizes)])
        tree.add_paths(parents, first, nodes, depth, values, leaves=trees.size)
        leaves = nodes[nodes.size - trees.size:]
        better = rewards > tree.best_value[trees]
        tree.best_value[trees] = np.where(better, rewards, tree.best_value[trees])
        tree.best_node[trees] = np.where(better, leaves, tree.best_node[trees])


__all__ = ["DTS", "Tree", "SELECTIONS"]
