"""Monte Carlo tree search over noise trajectories, in the formulation of Ramesh & Mardani.

The tree of a search has one level per decision: every step that injects noise (and the initial
noise first when ``search_init``; by default ``x_T`` is one Gaussian draw, as in eps-greedy). ``N`` candidate noises are drawn once per depth and shared by every node
of that depth: child ``k`` of a node at depth ``t`` is the state reached by injecting noise
``Z[t, k]``. At every step the strategy runs ``S`` simulations from the current root:

1. selection: descend by UCT, ``mean + c * sqrt(ln(visits(parent)) / visits(child))`` with
   ``c = 1.414``, until a node with an unexpanded child (children are expanded in order ``k = 0,
   1, ...``) or a terminal node;
2. expansion: step the node with its child's fixed noise (the child's state is kept in the tree);
3. rollout: continue the child with fresh Gaussian noise to ``x0`` and score it with the reward
   (one reward call); a terminal node is deterministic and re-uses its stored reward at no cost;
4. backup: add the reward to the visit statistics of every node on the path.

After ``S`` simulations the root moves to the child with the best mean reward; its subtree and
statistics are kept. The returned sample is the best finished sample the search scored (any
rollout, or the terminal node reached after the last move): every rollout is a complete sample of
the same sampler, already paid for. ``return_best=False`` returns the terminal node reached after
the last move, as in the paper. Rewards enter UCT normalised to [0, 1] by the range seen in the
tree (``normalize=True``), so that the exploration constant does not depend on the reward's scale
(docs/search.md, "MCTS").

Batching: the ``P`` searches' trees run their simulations in lockstep. The selected leaves may lie at
different depths, so expansions and rollouts are advanced step by step from the shallowest one,
every row that is at step ``j`` (expanding with its fixed noise or rolling out with fresh noise)
going into one network call.

Budget: ``simulations=0`` (default) fits ``S`` to the budget. A simulation from the root at depth
``t`` costs at most the NFEs from the root's step to the end (less when the leaf is deeper, none
when it is terminal) and one reward call; leftover budget adds one simulation at the earliest depths.
With 18 Euler-ancestral steps one simulation per step costs 1 + 17 + 16 + ... + 1 = 154 NFEs
(171 with ``search_init``). ``score_every = k`` makes only every k-th decision a tree level (decisions
1, 1 + k, ...: ``scored_decision``; between levels an expansion continues with fresh noise), so a
simulation per level costs less; ``score_every=0`` (default) lets the sizer choose k with S
(``Budget.fit_options``: the affordable k nearest 1), and MCTS runs below 154 NFEs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from noisesearch.budget import Cost
from noisesearch.errors import NoiseSearchError
from noisesearch.sampling.samplers import State
from noisesearch.search.base import Problem, SearchResult, Strategy, nfe_between, noise_steps, scored_decision


class Forest:
    """The ``P`` search trees, one per search, as tensors indexed ``[tree, node]`` (node 0 = root).

    A node at depth ``t`` holds the state at sampler step ``node_steps[t]``; ``child[tree, node, k]``
    is the node reached with candidate noise ``k`` (-1 while unexpanded).
    """

    def __init__(self, trees: int, max_nodes: int, children: int, shape, device, dtype):
        self.child = torch.full((trees, max_nodes, children), -1, dtype=torch.long)
        self.depth = torch.zeros(trees, max_nodes, dtype=torch.long)
        self.visits = torch.zeros(trees, max_nodes, dtype=torch.float64)
        self.value_sum = torch.zeros(trees, max_nodes, dtype=torch.float64)
        self.final_reward = torch.zeros(trees, max_nodes, dtype=torch.float64)  # of terminal nodes
        self.x = torch.zeros((trees, max_nodes, *shape), device=device, dtype=dtype)
        self.x0 = torch.zeros_like(self.x)
        self.count = torch.ones(trees, dtype=torch.long)
        self.low = torch.full((trees,), float("inf"), dtype=torch.float64)  # reward range seen per tree
        self.high = torch.full((trees,), float("-inf"), dtype=torch.float64)
        self.best_value = torch.full((trees,), float("-inf"), dtype=torch.float64)  # best scored sample per tree
        self.best_x0 = torch.zeros((trees, *shape), device=device, dtype=dtype)
        self.x0_at_x: dict[int, bool] = {}  # per sampler step: whether a stored x0 is D(x) (see State)

    def add_child(self, trees: torch.Tensor, parents: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        new = self.count[trees].clone()
        self.count[trees] += 1
        self.child[trees, parents, k] = new
        self.depth[trees, new] = self.depth[trees, parents] + 1
        return new

    def store(self, trees: torch.Tensor, nodes: torch.Tensor, x: torch.Tensor, x0: torch.Tensor) -> None:
        dev = self.x.device
        self.x[trees.to(dev), nodes.to(dev)] = x
        self.x0[trees.to(dev), nodes.to(dev)] = x0

    def children_value(self, node: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean value, visits) of every child of ``node[p]`` in tree p, each [P, N]."""
        ar = torch.arange(node.numel())
        ch = self.child[ar, node].clamp_min(0)
        visits = self.visits.gather(1, ch)
        mean = self.value_sum.gather(1, ch) / visits.clamp_min(1)
        if normalize:
            span = (self.high - self.low).clamp_min(1e-12).view(-1, 1)
            mean = torch.where(torch.isfinite(span), (mean - self.low.view(-1, 1)) / span, mean)
        return mean, visits

    def keep_best(self, trees: torch.Tensor, rewards: torch.Tensor, x0: torch.Tensor) -> None:
        """Remember each finished sample that beats its tree's best so far."""
        better = rewards > self.best_value[trees]
        if bool(better.any()):
            rows = trees[better]
            self.best_value[rows] = rewards[better]
            self.best_x0[rows.to(self.best_x0.device)] = x0[better.to(x0.device)]

    def backup(self, path: list[torch.Tensor], values: torch.Tensor) -> None:
        """Add ``values[p]`` to the statistics of every node on tree p's path (-1 = no node)."""
        nodes = torch.stack(path)  # [L, P]
        ok = nodes >= 0
        trees = torch.arange(nodes.shape[1]).expand_as(nodes)[ok]
        vals = values.expand_as(nodes)[ok]
        self.visits.index_put_((trees, nodes[ok]), torch.ones_like(vals), accumulate=True)
        self.value_sum.index_put_((trees, nodes[ok]), vals, accumulate=True)
        self.low = torch.minimum(self.low, values)
        self.high = torch.maximum(self.high, values)


@dataclass
class _Selection:
    node: torch.Tensor  # [P] where the descent stopped
    parent: torch.Tensor  # [P] node to expand (-1: none, the descent ended on a terminal node)
    k: torch.Tensor  # [P] which child of ``parent`` to expand
    path: list  # nodes visited per level, [P] each (-1 past the end of a tree's path)


@dataclass
class MCTS(Strategy):
    """UCT tree search with fixed per-depth candidate noises and full rollouts (see module docstring)."""

    name = "mcts"
    size_option = "simulations"
    plan_is_exact = False  # a simulation from a deeper leaf costs less than the plan's worst case
    n_candidates: int = 4  # N: children per node (candidate noises, fixed per depth)
    simulations: int = 0  # S: simulations per step; 0 = fit to the budget
    c_uct: float = 1.414  # UCT exploration constant (rewards normalised to [0, 1] when normalize)
    search_init: bool = False  # the initial noise x_T is the first decision (as for eps-greedy)
    normalize: bool = True  # UCT on rewards scaled to [0, 1] by the range seen in the tree
    return_best: bool = True  # return the best scored sample (False: the last move's terminal node)
    score_every: int = 0  # tree levels at every k-th decision only (fresh noise between); 0 = chosen with the size

    def validate(self) -> None:
        if self.n_candidates < 1:
            raise NoiseSearchError("--n-candidates must be at least 1")
        if self.simulations < 0:
            raise NoiseSearchError("--simulations must be >= 0 (0 = fit to the budget)")
        if not 0 <= self.c_uct < float("inf"):
            raise NoiseSearchError(f"--c-uct must be finite and >= 0, got {self.c_uct}")
        if self.score_every < 0:
            raise NoiseSearchError("--score-every must be >= 0 (0 = chosen with the budget)")

    # -- planning: the size is the total number of simulations, spread over depths earliest first --
    def node_steps(self, s) -> list:
        """Sampler step of each tree level (None: x_T), the finished sample last: the decisions
        ``scored_decision`` keeps for ``score_every`` (all of them for k = 1)."""
        init = [None] if self.search_init and scored_decision(0, self.score_every) else []
        steps = [st for d, st in enumerate(noise_steps(s), 1) if scored_decision(d, self.score_every)]
        return init + steps + [s.num_steps]

    def configurations(self, problem: Problem) -> list[tuple[Strategy, int]]:
        if self.score_every:
            return [(self, self.min_size(problem))]
        configs = [replace(self, score_every=k) for k in range(1, len(noise_steps(problem.sampler)) + 1)]
        return [(c, c.min_size(problem)) for c in configs]

    def knobs(self) -> dict:
        return {"score_every": self.score_every}

    def simulations_per_depth(self, s, size: int) -> list[int]:
        depths = len(self.node_steps(s)) - 1
        return [size // depths + (1 if t < size % depths else 0) for t in range(depths)]

    def min_size(self, problem: Problem) -> int:
        return len(self.node_steps(problem.sampler)) - 1

    def requested_size(self, problem: Problem) -> int | None:
        return self.simulations * self.min_size(problem) or None

    def describe(self, size: int) -> str:
        return f"MCTS with {size} simulation(s) over the searched steps"

    def cost(self, problem: Problem, size: int) -> Cost:
        """Worst case: a simulation from a root at step j rolls out from j to the end."""
        s = problem.sampler
        steps = self.node_steps(s)
        nfe = sum(k * (s.nfe_per_trajectory if st is None else s.nfe_to_end(st))
                  for k, st in zip(self.simulations_per_depth(s, size), steps[:-1]))
        if steps[0] is not None:  # x_T is one draw, not a tree level
            nfe += s.start_nfe + nfe_between(s, 0, steps[0])
        return problem.nfe_cost(nfe) + problem.score_cost(size)

    # -- search --
    def run(self, problem: Problem, size: int) -> SearchResult:
        s, P, N = problem.sampler, problem.num_searches, self.n_candidates
        steps = self.node_steps(s)
        T = len(steps) - 1  # terminal depth
        sims = self.simulations_per_depth(s, size)
        forest = Forest(P, 1 + size, N, s.noise_shape, s.denoiser.device, s.denoiser.dtype)
        ar = torch.arange(P)
        # candidate noises, fixed per depth: Z[t, p, k] from search p's stream
        Z = problem.noise.normal(ar.repeat_interleave(T * N)).view(P, T, N, *s.noise_shape).transpose(0, 1)
        if steps[0] is not None:  # x_T is one draw, not a tree level
            root_state = problem.rollout(problem.start(1), until=steps[0])
            forest.store(ar, torch.zeros(P, dtype=torch.long), root_state.x, root_state.x0)
            forest.x0_at_x[root_state.step] = root_state.x0_at_x
        root = torch.zeros(P, dtype=torch.long)
        for t in range(T):
            for _ in range(sims[t]):
                sel = self.select(forest, root, T)
                values = self.expand_and_rollout(problem, forest, sel, steps, Z)
                forest.backup(sel.path, values)
            root = self.move(forest, root)
        best_value, best_x0 = forest.best_value, forest.best_x0
        final = forest.final_reward[ar, root]
        if self.return_best:
            use = best_value > final
            x0 = torch.where(use.view(-1, *[1] * len(s.noise_shape)).to(best_x0.device), best_x0, forest.x0[ar, root])
            rewards = torch.where(use, best_value, final).float()
        else:
            x0, rewards = forest.x0[ar, root], final.float()
        return SearchResult(x0=x0, rewards=rewards, info={
            "n_candidates": N, "simulations_per_step": sims, "nodes_mean": round(float(forest.count.double().mean()), 1),
            "returned_a_rollout": int((best_value > final).sum()) if self.return_best else 0})

    def select(self, forest: Forest, root: torch.Tensor, T: int) -> _Selection:
        """Descend every tree by UCT to the first node with an unexpanded child (children are
        expanded in order) or to a terminal node."""
        P, N = root.numel(), forest.child.shape[2]
        ar = torch.arange(P)
        node, active = root.clone(), torch.ones(P, dtype=torch.bool)
        parent = torch.full((P,), -1, dtype=torch.long)
        k = torch.full((P,), -1, dtype=torch.long)
        path = [root.clone()]
        while bool(active.any()):
            active &= forest.depth[ar, node] < T  # a terminal node ends the descent
            expanded = (forest.child[ar, node] >= 0).sum(1)
            expand = active & (expanded < N)
            parent = torch.where(expand, node, parent)
            k = torch.where(expand, expanded, k)
            active &= ~expand
            if not bool(active.any()):
                break
            mean, visits = forest.children_value(node, self.normalize)
            log_n = torch.log(forest.visits[ar, node].clamp_min(1)).unsqueeze(1)
            uct = mean + self.c_uct * torch.sqrt(log_n / visits.clamp_min(1))
            nxt = forest.child[ar, node, uct.argmax(1)]
            node = torch.where(active, nxt, node)
            path.append(torch.where(active, nxt, torch.full_like(nxt, -1)))
        return _Selection(node, parent, k, path)

    def expand_and_rollout(self, problem: Problem, forest: Forest, sel: _Selection, steps: list, Z) -> torch.Tensor:
        """Expand the selected children, roll them out and score the finished samples; a descent that
        ended on a terminal node re-uses its stored reward at no cost. Returns every tree's value [P]."""
        P = sel.node.numel()
        values = forest.final_reward[torch.arange(P), sel.node].clone()
        groups = self.expand(problem, forest, sel, steps, Z)
        if not groups:
            return values
        state, nodes, store = self.rollout(problem, forest, groups)
        rewards = problem.score(state).double()
        values[state.owner] = rewards
        terminal = store == problem.sampler.num_steps
        forest.final_reward[state.owner[terminal], nodes[terminal]] = rewards[terminal]
        forest.keep_best(state.owner, rewards, state.x0)
        return values

    def expand(self, problem: Problem, forest: Forest, sel: _Selection, steps: list, Z) -> dict:
        """Add the selected children; their parents' states, grouped by sampler step, as
        ``{step: [(state, new node ids, step to store at, fixed noise or None)]}``."""
        s, P = problem.sampler, sel.node.numel()
        trees = (sel.parent >= 0).nonzero().flatten()
        if not trees.numel():
            return {}
        parents, k = sel.parent[trees], sel.k[trees]
        depth = forest.depth[trees, parents]
        new = forest.add_child(trees, parents, k)
        sel.path.append(torch.full((P,), -1, dtype=torch.long).index_put((trees,), new))
        store_at = torch.tensor([steps[d + 1] for d in depth.tolist()])
        fixed = Z[depth.to(Z.device), trees.to(Z.device), k.to(Z.device)]
        start_step = [steps[d] for d in depth.tolist()]  # None: a child of the virtual root
        groups: dict[int, list] = {}
        for j in sorted({-1 if st is None else st for st in start_step}):
            r = torch.tensor([i for i, st in enumerate(start_step) if (-1 if st is None else st) == j])
            noise = fixed[r.to(fixed.device)]
            if j < 0:  # children of the virtual root: their noise is the initial noise
                groups.setdefault(0, []).append((s.start(problem.cond_rows(trees[r]), noise, trees[r]), new[r], store_at[r], None))
                continue
            dev = forest.x.device
            t, p = trees[r].to(dev), parents[r].to(dev)
            state = State(x=forest.x[t, p], x0=forest.x0[t, p], step=j, cond=problem.cond_rows(trees[r]), owner=trees[r],
                          x0_at_x=forest.x0_at_x[j])
            groups.setdefault(j, []).append((state, new[r], store_at[r], noise))
        return groups

    def rollout(self, problem: Problem, forest: Forest, groups: dict):
        """Advance every row to the end, all trees in lockstep from the shallowest step: a row's first
        step injects its child's fixed noise, later steps fresh noise from its search's stream; a row
        reaching its new node's step leaves its state there. Returns (final state, nodes, store steps)."""
        s = problem.sampler
        while True:
            j = min(groups)
            group = groups.pop(j)
            if len(group) == 1:  # no row joins at this step: nothing to concatenate
                state, nodes, store, _ = group[0]
            else:
                state = State.cat([g[0] for g in group])
                nodes, store = torch.cat([g[1] for g in group]), torch.cat([g[2] for g in group])
            hit = (store == j).nonzero().flatten()
            if hit.numel():
                at = hit.to(state.x.device)
                forest.store(state.owner[hit], nodes[hit], state.x[at], state.x0[at])
                forest.x0_at_x[j] = state.x0_at_x
            if j >= s.num_steps:
                return state, nodes, store
            noise = None
            if s.uses_noise(j):
                parts = [g[3] if g[3] is not None else problem.noise.normal(g[0].owner) for g in group]
                noise = torch.cat(parts) if len(parts) > 1 else parts[0]
            groups.setdefault(j + 1, []).insert(0, (s.step(state, noise), nodes, store, None))

    def move(self, forest: Forest, root: torch.Tensor) -> torch.Tensor:
        """Move every root to its child with the best mean reward (unvisited children never)."""
        ar = torch.arange(root.numel())
        ch = forest.child[ar, root]
        mean, visits = forest.children_value(root, normalize=False)
        mean = torch.where((ch >= 0) & (visits > 0), mean, torch.tensor(float("-inf"), dtype=torch.float64))
        new_root = ch[ar, mean.argmax(1)]
        if bool((new_root < 0).any()):
            raise RuntimeError("MCTS moved to an unexpanded child")
        return new_root


__all__ = ["MCTS", "Forest"]
