"""Command-line experiments on top of the library (`python -m capo_dist.experiments.<name>`)."""
