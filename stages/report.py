"""report: one page for the whole run, reports/index.html (relative links only, opens from a file)."""

from photoprep import errors
from photoprep.layout import PATHS
from photoprep.review import page


def main() -> None:
    out = page.write_report(PATHS, PATHS.report_page, PATHS.report_charts_dir)
    print(f"report: {out}")


if __name__ == "__main__":
    errors.run_stage(main)
