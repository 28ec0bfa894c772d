"""What the data means: Numba kernels, hard-signal rules and the alert/health state machine."""
