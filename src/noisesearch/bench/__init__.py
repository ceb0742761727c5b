"""Benchmarks that ship with the package (``noisesearch bench NAME``).

Each module has ``main(argv, prog, default_out) -> int`` with its own argparse options; the scripts
under ``benchmarks/`` call the same functions with ``docs/`` as the output folder.
"""
BENCHMARKS = {"search": "every noise-trajectory search strategy at equal NFEs on digits-uncond (about 9 min on one CPU thread)"}
