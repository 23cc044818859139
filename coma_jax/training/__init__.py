"""Training: the stage-1 mask, losses, optimiser, train state and the jitted steps."""
