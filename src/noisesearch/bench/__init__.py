"""The benchmarks, in one home (``noisesearch bench NAME [OPTIONS]``, or
``python -m noisesearch.bench.NAME``). Run them from the repository: those that update the
documentation write into ``docs/`` (``--docs``/``--out``) and read ``../shared`` by default.

Each module has ``main(argv=None, prog=None) -> int`` with its own argparse options. A module that
also has ``build_parser(prog, parser_class)`` and ``run(args, command, save_config=None)`` (``search``)
is parsed by ``noisesearch bench`` itself, which adds ``--config FILE`` and writes the resolved
options beside its results. The benchmarks use the public API (``noisesearch.api``,
``noisesearch.build``) and never import ``noisesearch.cli``.
"""
BENCHMARKS = {
    "search": "every noise-trajectory search strategy at equal NFEs on digits-uncond (about 15 min on one CPU thread)",
    "noise_aware": "noise-aware rewards vs the base reward: Spearman / top-k recall per step on held-out candidates (docs/noise_aware.md)",
    "live_prune": "live ttsnap / ttsp vs best-of-N at equal FLOPs on digits-uncond (docs/noise_aware.md)",
    "simulate": "the TTSnap simulator on the published FLUX reward pools (needs ../shared; docs/simulator.md)",
    "call_timing": "drift of one denoiser call's time on this machine (why the search benchmark pairs its timing)",
    "flow_costs": "FLOPs and parameters of FLUX.1-dev, SD3.5 and SDXL counted on the meta device (docs/flux.md)",
    "step_conditioning": "noise-aware rewards: per-step snapshots vs one step-conditioned model (adaLN-Zero / FiLM) on digits-uncond (docs/rewards.md)",
    "galaxies": "noise search on the pretrained galaxygrad:hsc32 galaxies at equal NFEs, galaxy rewards (docs/galaxies.md; about 4 min)",
}
