"""Plots and the HTML report of a run.

CONTRACT (filled in by issue 3):

    def render_report(run_dir) -> Path     # writes metrics.csv, curves.png, grid_<method>.png, report.html; returns report.html
    def plot_schedule(schedules: Sequence[str], steps: int, path=None) -> PIL.Image.Image
"""
