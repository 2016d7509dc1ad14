"""report: one page for the whole run, reports/index.html (relative links only, opens from a file)."""

from _interpreter import ensure_project_python

ensure_project_python()


from photoprep.core import errors
from photoprep.core.layout import PATHS
from photoprep.review import page


def main() -> str:
    out = page.write_report(PATHS, PATHS.report_page, PATHS.report_charts_dir)
    return f"{out} (open it in a browser; every link is relative)"


if __name__ == "__main__":
    errors.run_stage(main)
