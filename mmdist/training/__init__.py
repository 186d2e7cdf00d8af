"""Training engine: distributed environment, DeepSpeed engine, the one trainer loop, checkpoints, metrics."""
