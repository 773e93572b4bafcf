"""Training: the LightningModule (the recipe), weights hand-off, parameter groups, the weight average, the trainer's
atomic checkpoint IO."""
