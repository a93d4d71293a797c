"""The training framework: what every task's run shares (train state and steps, the compiled loop, checkpoints
and resume, metrics, the config's precision and optimizer)."""
