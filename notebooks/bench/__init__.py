"""The benchmark behind notebooks/04_benchmark.ipynb and the README's Results, by job:

  protocol   what one run is: tasks, methods, settings, learning rates, train_one, the result files
  grid       the runners: a one-process grid and the resumable CPU grid of 1-thread worker processes
  diagnosis  the held-out study of why AFLoRA trailed LoRA under protocol v1
  measure    cost, not accuracy: the plan, padding, ELoRA's paths, threads, step times
  report     summaries, the paper's claims met or missed, the README's generated blocks

The command line is notebooks/benchmark.py (`python notebooks/benchmark.py --help`).
"""
