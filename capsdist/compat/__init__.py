"""The one seam per dependency's private API (Lightning, W&B, DCP, jsonargparse, torch's DataLoader, multiprocessing's
fork server): nothing else touches them."""
