"""The training loops: blockwise-diffusion SFT and online DiPO."""
