"""dedup: probe every fetched payload once, then group exact and near duplicates."""

from _interpreter import ensure_project_python

ensure_project_python()

from photoprep.core import memory

memory.arrow_from_malloc()  # before pyarrow loads: photoprep.core.memory says why


from photoprep.core import console, errors, io, parallel, params
from photoprep.core.layout import PATHS
from photoprep.images import dedup, probe, provenance, sheets, stored
from photoprep.images.decode import DecodeLimits
from photoprep.images.probe import ProbeSpec
from photoprep.images.provenance import ProvenanceSpec
from photoprep.ingest import reports


def main() -> str:
    p = params.load()
    table = dedup.read_raw_tables(PATHS.raw_dir, p.sources).rename(columns={"reason": "fetch_reason"})
    fetched = table[table["status"] == "ok"]
    see = f"{PATHS.download_reports_dir.as_posix()}/<source>/failed.csv"
    console.require_input(len(fetched), "dedup", reports.fetched_cause(table), see)
    memory.release()  # each step's peak stands on its own, not on the garbage of the steps before
    with parallel.session(p.compute):  # one Dask cluster for the probe and the thumbnails
        probed = probe.probe_images(fetched, PATHS.raw_dir, ProbeSpec.from_params(p), p.compute)
        table = table.join(probed)
        del probed
        memory.release()
        evidence = provenance.provenance_reader(PATHS.raw_dir, ProvenanceSpec.from_params(p), p.compute)
        result = dedup.find_duplicates(table, p.dedup, p.sources, evidence)
        io.write_table(result.table.drop(columns=list(dedup.GROUPING_ONLY)), PATHS.dedup_table)
        io.write_table(dedup.duplicate_groups(result.table), PATHS.duplicates_csv)
        io.write_json(result.counts, PATHS.stage_counts("dedup"))
        memory.release()
        groups = dedup.near_groups_for_sheet(result.table, p.dedup.contact_groups, sheets.MAX_PER_ROW)
        thumbs = stored.thumbnails(
            groups, PATHS.raw_dir, sheets.THUMB, DecodeLimits.after_probe(p), p.compute
        )
    sheets.draw_near_groups(groups, thumbs, PATHS.duplicates_png)
    c = result.counts
    return (
        f"{console.count(len(fetched))} fetched images: {console.count(c['exact_duplicates'])} exact and "
        f"{console.count(c['near_duplicates'])} near duplicates, {console.count(c['after_dedup'])} left"
    )


if __name__ == "__main__":
    errors.run_stage(main)
