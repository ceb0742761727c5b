"""noisesearch: test-time scaling for diffusion and flow image models.

Vocabulary used everywhere: ``denoiser`` D(x, sigma, cond) -> x0 (the Tweedie estimate),
``sigma`` (noise level, EDM / k-diffusion parameterization), ``noise`` (the injected noise, the
action a strategy chooses), ``reward`` score(images, prompts) -> tensor[B], ``budget`` (NFE /
reward-call / FLOP accounting), ``strategy`` (how candidates are proposed and selected) and
``pool`` (rewards [prompt, candidate, step] stored for offline simulation).
"""

__version__ = "0.1.0"

from noisesearch.errors import BudgetError, NoiseSearchError

__all__ = ["NoiseSearchError", "BudgetError", "__version__"]
