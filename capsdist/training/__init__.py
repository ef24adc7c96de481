"""Training with Lightning: the LightningModule, the CLI, run outputs, the resume rule, stop, guards, diagnostics."""
