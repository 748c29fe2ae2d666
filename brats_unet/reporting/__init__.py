"""Reading runs back and drawing them: runs.py (scalars, metrics, sweeps), paper.py (Table 1, Figures 1-2),
plots.py (matplotlib figures), overlays.py (label overlays, also for TensorBoard), writer.py (brats-report's files)."""
