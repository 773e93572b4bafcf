"""Training: the LightningModule, ensemble rollouts, weights hand-off, checkpoint IO, the command line."""
