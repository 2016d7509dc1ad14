"""dedup: probe every fetched payload once, then group exact and near duplicates."""

from pathlib import Path

from photoprep import dedup, images, params, report, sheets


def main() -> None:
    p = params.load()
    raw = Path("data/raw")
    table = dedup.read_raw_tables(raw, p.sources).rename(columns={"reason": "fetch_reason"})
    fetched = table[table["status"] == "ok"]
    probed = images.probe_images(
        fetched, raw, p.dedup.hash, p.dedup.hash_size, p.validate.max_pixels, p.compute
    )
    table = table.join(probed)
    result = dedup.find_duplicates(table, p.dedup)
    report.write_table(result.table, "data/interim/dedup.parquet")
    report.write_table(dedup.duplicate_groups(result.table), "reports/duplicates.csv")
    report.write_json(result.counts, "reports/counts/dedup.json")
    groups = dedup.near_groups_for_sheet(result.table, p.dedup.contact_groups)
    sheets.draw_near_groups(groups, raw, p, "reports/duplicates.png")


if __name__ == "__main__":
    params.run_stage(main)
