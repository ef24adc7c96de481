"""The one seam per dependency's private API (Lightning, W&B, DCP, jsonargparse): nothing else touches them."""
