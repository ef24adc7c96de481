"""User tools over trained models: evaluate, figures, report, pretrained export/check."""
