"""Studies built on runs and the cost model: estimate, check-tp, the paper reproduction and its
calibration, sweeps, cluster-file validation."""
