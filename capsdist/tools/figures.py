"""`python -m capsdist.figures --ckpt PATH --out DIR [--pdf]`: the paper's pictures from a checkpoint, labelled.

The pictures themselves are capsdist.training.figures (also drawn at the end of a fit for W&B).
"""

from __future__ import annotations

import json
from pathlib import Path

from capsdist.core.errors import user_errors
from capsdist.tools.evaluate import inference_parser, parse_for_inference
from capsdist.training.figures import write_figures


def main(argv: list[str] | None = None) -> None:
    """Draw the figures from the first validation batch and print the written paths as JSON."""
    parser = inference_parser("Draw the paper's figures from a capsdist checkpoint.")
    parser.add_argument("--out", type=str, default="figures", help="folder for the PNGs")
    parser.add_argument("--count", type=int, default=8, help="images per figure")
    parser.add_argument("--pdf", action="store_true", help="also write each figure as a PDF beside its PNG")
    with user_errors():
        args, trained, loader = parse_for_inference(parser, argv)
        paths = write_figures(trained.to(args.device).model, next(iter(loader)), Path(args.out), args.count, args.pdf)
    print(json.dumps({"checkpoint": args.ckpt or args.weights, "figures": [str(p) for p in paths]}))


if __name__ == "__main__":
    main()
