"""noisesearch: test-time scaling for diffusion and flow image models.

Vocabulary used everywhere: ``denoiser`` D(x, sigma, cond) -> x0 (the Tweedie estimate),
``sigma`` (noise level, EDM / k-diffusion parameterization), ``noise`` (the injected noise, the
action a strategy chooses), ``reward`` score(images, prompts) -> tensor[B], ``budget`` (NFE /
reward-call / FLOP accounting), ``strategy`` (how candidates are proposed and selected) and
``pool`` (rewards [prompt, candidate, step] stored for offline simulation).

The entry point and the parts users compose are importable from here::

    import noisesearch
    run = noisesearch.generate(model=pipe, prompts=["a red bicycle"], reward=my_function,
                               strategy="eps-greedy", budget_nfe=200)

(``generate``, ``save_run``, ``load_model``, ``make_reward``, ``make_strategy``, ``build_problem``,
``Denoiser``, ``Reward``, ``FunctionReward``, ``Run``). They are loaded on first use, so that
``import noisesearch`` stays cheap.
"""

__version__ = "0.1.0"

import importlib

from noisesearch.errors import BudgetError, NoiseSearchError

# name -> the module that defines it (imported on first access: module __getattr__, PEP 562)
_LAZY = {
    "generate": "noisesearch.api.run",
    "save_run": "noisesearch.api.run",
    "Run": "noisesearch.api.run",
    "GenerateConfig": "noisesearch.api.run",
    "load_model": "noisesearch.models",
    "Denoiser": "noisesearch.models.base",
    "make_reward": "noisesearch.rewards.base",
    "Reward": "noisesearch.rewards.base",
    "FunctionReward": "noisesearch.rewards.base",
    "make_strategy": "noisesearch.search",
    "build_problem": "noisesearch.build",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'noisesearch' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["NoiseSearchError", "BudgetError", "__version__", *_LAZY]
