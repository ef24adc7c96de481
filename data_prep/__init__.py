"""Data preparation for capsdist: MNIST intake and MultiMNIST WebDataset shards."""
