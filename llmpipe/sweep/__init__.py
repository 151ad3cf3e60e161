"""Seed sweeps: queue one DVC experiment per seed and wait (queue), then summarise each headline metric
over the seeds (summary). `llmpipe sweep` runs them."""
