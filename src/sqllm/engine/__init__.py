"""Block-by-block calibration: capture block inputs, collect statistics, call solvers, propagate."""
