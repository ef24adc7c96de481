"""Data preparation tools (`capsdist-mnist`, `capsdist-shards`): MNIST intake and MultiMNIST WebDataset shards.

Command-line code only: the training side (capsdist.data, capsdist.train) never imports it. A checkout also keeps
them as `python -m data_prep.mnist` / `data_prep.multimnist` (thin modules re-exporting these)."""
