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
statistics are kept. The returned sample is the terminal node reached after the last move.

Batching: the ``P`` searches' trees run their simulations in lockstep. The selected leaves may lie at
different depths, so expansions and rollouts are advanced step by step from the shallowest one,
every row that is at step ``j`` (expanding with its fixed noise or rolling out with fresh noise)
going into one network call.

Budget: ``simulations=0`` (default) fits ``S`` to the budget. A simulation from the root at depth
``t`` costs at most the NFEs from the root's step to the end (less when the leaf is deeper, none
when it is terminal) and one reward call; leftover budget adds one simulation at the earliest depths.
With 18 Euler-ancestral steps one simulation per step costs 1 + 17 + 16 + ... + 1 = 154 NFEs
(171 with ``search_init``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from noisesearch.errors import NoiseSearchError
from noisesearch.models.base import cond_index
from noisesearch.sampling.samplers import State
from noisesearch.search.base import Problem, SearchResult, Strategy, advance, fit_count, nfe_between, noise_steps


@dataclass
class MCTS(Strategy):
    """UCT tree search with fixed per-depth candidate noises and full rollouts (see module docstring)."""

    name = "mcts"
    n_candidates: int = 4  # N: children per node (candidate noises, fixed per depth)
    simulations: int = 0  # S: simulations per step; 0 = fit to the budget
    c_uct: float = 1.414  # UCT exploration constant
    search_init: bool = False  # the initial noise x_T is the first decision (as for eps-greedy)

    # -- planning --
    def _node_steps(self, s) -> list:
        return ([None] if self.search_init else []) + noise_steps(s) + [s.num_steps]

    def _sim_cost(self, s, node_steps: list) -> list[float]:
        """Worst-case NFEs of one simulation from a root at each decision depth."""
        return [s.nfe_per_trajectory if st is None else s.nfe_to_end(st) for st in node_steps[:-1]]

    def _cost(self, s, sims: list[int]) -> tuple[float, float]:
        ns = self._node_steps(s)
        nfe = sum(k * c for k, c in zip(sims, self._sim_cost(s, ns)))
        if not self.search_init:
            nfe += s.start_nfe + nfe_between(s, 0, ns[0])
        return nfe, sum(sims)

    def plan(self, problem: Problem) -> list[int]:
        s = problem.sampler
        depths = len(self._node_steps(s)) - 1
        what = lambda k: f"MCTS with {k} simulation(s) per step"
        if self.simulations:
            sims = [self.simulations] * depths
            problem.check_affords(what(self.simulations), *self._cost(s, sims))
            return sims
        k = fit_count(problem, lambda k: self._cost(s, [k] * depths), what)
        sims = [k] * depths
        for t in range(depths):
            sims[t] += 1
            if not problem.budget.affords(*self._cost(s, sims)):
                sims[t] -= 1
        return sims

    # -- search --
    def search(self, problem: Problem) -> SearchResult:
        if self.n_candidates < 1:
            raise NoiseSearchError("--n-candidates must be at least 1")
        if self.simulations < 0:
            raise NoiseSearchError("--simulations must be >= 0 (0 = fit to the budget)")
        s, g = problem.sampler, problem.generator
        P, N = problem.num_searches, self.n_candidates
        node_steps = self._node_steps(s)
        T = len(node_steps) - 1  # terminal depth
        sims = self.plan(problem)
        M = 1 + sum(sims)
        dev, dt = s.denoiser.device, s.denoiser.dtype
        shape = s.noise_shape
        ar = torch.arange(P)

        child = torch.full((P, M, N), -1, dtype=torch.long)
        depth = torch.zeros(P, M, dtype=torch.long)
        visits = torch.zeros(P, M, dtype=torch.float64)
        vsum = torch.zeros(P, M, dtype=torch.float64)
        tval = torch.zeros(P, M, dtype=torch.float64)
        X = torch.zeros((P, M, *shape), device=dev, dtype=dt)
        X0 = torch.zeros_like(X)
        x0_at_x: dict[int, bool] = {}
        cnt = torch.ones(P, dtype=torch.long)
        root = torch.zeros(P, dtype=torch.long)
        Z = s.noise(T * P * N, g).view(T, P, N, *shape)  # candidate noises, fixed per depth
        if not self.search_init:
            st = advance(s, problem.start(1))
            X[:, 0], X0[:, 0] = st.x, st.x0
            x0_at_x[st.step] = st.x0_at_x

        for t in range(T):
            for _ in range(sims[t]):
                self._simulate(problem, t, T, node_steps, root, child, depth, visits, vsum, tval, X, X0, x0_at_x, cnt, Z)
            ch = child[ar, root]  # [P, N]
            chc = ch.clamp_min(0)
            vis = visits.gather(1, chc)
            mean = torch.where((ch >= 0) & (vis > 0), vsum.gather(1, chc) / vis.clamp_min(1), torch.tensor(float("-inf"), dtype=torch.float64))
            root = ch[ar, mean.argmax(1)]
            if bool((root < 0).any()):
                raise RuntimeError("MCTS moved to an unexpanded child")
        return SearchResult(
            x0=X0[ar.to(dev), root.to(dev)],
            rewards=tval[ar, root].float(),
            info={"n_candidates": N, "simulations_per_step": sims, "nodes_mean": round(float(cnt.double().mean()), 1)},
        )

    def _simulate(self, problem, t, T, node_steps, root, child, depth, visits, vsum, tval, X, X0, x0_at_x, cnt, Z) -> None:
        s, g = problem.sampler, problem.generator
        P, N = root.shape[0], child.shape[2]
        ar = torch.arange(P)
        dev = X.device
        # 1. selection (vectorised over the P trees)
        node = root.clone()
        active = torch.ones(P, dtype=torch.bool)
        term = torch.zeros(P, dtype=torch.bool)
        parent = torch.full((P,), -1, dtype=torch.long)
        kidx = torch.full((P,), -1, dtype=torch.long)
        path = [root.clone()]
        for _ in range(T - t + 1):
            d = depth[ar, node]
            hit = active & (d == T)
            term |= hit
            active &= ~hit
            ch = child[ar, node]
            nexp = (ch >= 0).sum(1)
            expand = active & (nexp < N)
            parent = torch.where(expand, node, parent)
            kidx = torch.where(expand, nexp, kidx)
            active &= ~expand
            if not bool(active.any()):
                break
            chc = ch.clamp_min(0)
            vc = visits.gather(1, chc).clamp_min(1)
            q = vsum.gather(1, chc) / vc
            u = q + self.c_uct * torch.sqrt(torch.log(visits[ar, node].clamp_min(1)).unsqueeze(1) / vc)
            nxt = ch[ar, u.argmax(1)]
            node = torch.where(active, nxt, node)
            path.append(torch.where(active, nxt, torch.full_like(nxt, -1)))
        values = torch.zeros(P, dtype=torch.float64)
        values[term] = tval[ar[term], node[term]]

        # 2. expansion: new node ids, grouped by the parent's depth
        e = (parent >= 0).nonzero().flatten()
        leaf = torch.full((P,), -1, dtype=torch.long)
        if e.numel():
            pe, ke = parent[e], kidx[e]
            new = cnt[e].clone()
            cnt[e] += 1
            child[e, pe, ke] = new
            pd = depth[e, pe]
            depth[e, new] = pd + 1
            leaf[e] = new
            chunks: dict[int, list[dict]] = {}
            for dd in sorted(set(pd.tolist())):
                sel = pd == dd
                es, ps, ks, ns = e[sel], pe[sel], ke[sel], new[sel]
                noise = Z[dd][es.to(dev), ks.to(dev)]
                store = torch.full((len(es),), node_steps[dd + 1], dtype=torch.long)
                if node_steps[dd] is None:  # the virtual root: children are initial noises
                    st = s.start(cond_index(problem.cond, es), noise, es)
                    chunk = dict(x=st.x, x0=st.x0, owner=es, node=ns, store=store, fixed=None, flag=st.x0_at_x)
                    chunks.setdefault(0, []).append(chunk)
                else:
                    j = node_steps[dd]
                    chunk = dict(x=X[es.to(dev), ps.to(dev)], x0=X0[es.to(dev), ps.to(dev)], owner=es, node=ns, store=store, fixed=noise, flag=x0_at_x[j])
                    chunks.setdefault(j, []).append(chunk)

            # 3. expansion steps and rollouts, advanced in lockstep from the shallowest row
            j = min(chunks)
            while True:
                group = chunks.pop(j, [])
                if not group:
                    j += 1
                    continue
                x = torch.cat([c["x"] for c in group])
                x0 = torch.cat([c["x0"] for c in group])
                owner = torch.cat([c["owner"] for c in group])
                nodes = torch.cat([c["node"] for c in group])
                stores = torch.cat([c["store"] for c in group])
                flag = all(c["flag"] for c in group)
                hit = stores == j
                if bool(hit.any()):  # rows that just reached their new node's step: keep the state
                    X[owner[hit].to(dev), nodes[hit].to(dev)] = x[hit.to(dev)]
                    X0[owner[hit].to(dev), nodes[hit].to(dev)] = x0[hit.to(dev)]
                    x0_at_x[j] = flag
                if j >= s.num_steps:
                    break
                noise = None
                if s.uses_noise(j):
                    parts = []
                    for c in group:
                        parts.append(c["fixed"] if c["fixed"] is not None else s.noise(len(c["owner"]), g))
                    noise = torch.cat(parts)
                state = State(x=x, x0=x0, step=j, cond=cond_index(problem.cond, owner), owner=owner, x0_at_x=flag)
                state = s.step(state, noise)
                chunks.setdefault(j + 1, []).insert(0, dict(x=state.x, x0=state.x0, owner=owner, node=nodes, store=stores, fixed=None, flag=state.x0_at_x))
                j += 1
            final = State(x=x, x0=x0, step=j, cond=cond_index(problem.cond, owner), owner=owner, x0_at_x=True)
            v = problem.score(final).double()
            values[owner] = v
            terminal_rows = stores == s.num_steps
            tval[owner[terminal_rows], nodes[terminal_rows]] = v[terminal_rows]

        # 4. backup
        nodes_on_path = torch.stack(path + [leaf])  # [L, P]
        ok = nodes_on_path >= 0
        rows = ar.expand_as(nodes_on_path)[ok]
        cols = nodes_on_path[ok]
        vals = values.expand_as(nodes_on_path)[ok]
        visits.index_put_((rows, cols), torch.ones_like(vals), accumulate=True)
        vsum.index_put_((rows, cols), vals, accumulate=True)


__all__ = ["MCTS"]
