"""The training loop (`Trainer.train()`), what a worker sets up before its first step, the time budget."""
