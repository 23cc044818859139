"""Chains of training stages run as the commands a user would type: the demo and the sweeps."""
