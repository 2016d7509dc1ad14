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
    # The probe reads a few columns of the download tables; the wide tables are read after it.
    narrow = dedup.read_raw_tables(PATHS.raw_dir, p.sources, ["status", "reason", *stored.LOCATES])
    fetched = narrow.loc[narrow["status"] == "ok", stored.LOCATES]
    see = f"{PATHS.download_reports_dir.as_posix()}/<source>/failed.csv"
    console.require_input(len(fetched), "dedup", reports.fetched_cause(narrow), see)
    del narrow
    memory.release()  # each step's peak stands on its own, not on the garbage of the steps before
    with parallel.session(p.compute):  # one Dask cluster for the probe and the thumbnails
        spec = ProbeSpec.from_params(p)
        probed = probe.probe_images(fetched, PATHS.raw_dir, spec, p.compute)
        n_fetched = len(fetched)
        del fetched
        table = dedup.read_raw_tables(PATHS.raw_dir, p.sources).rename(columns={"reason": "fetch_reason"})
        # The table steps read the probed table from a file, a compute.memory_mb slice at a time.
        io.write_table(table.join(probed), PATHS.dedup_input)
        del probed, table
        memory.release()
        evidence = provenance.provenance_reader(PATHS.raw_dir, ProvenanceSpec.from_params(p), p.compute)
        try:
            c = dedup.find_duplicates_in_file(
                PATHS.dedup_input,
                PATHS.dedup_table,
                p.dedup,
                p.compute.memory_mb,
                p.sources,
                evidence,
                leave_out=dedup.GROUPING_ONLY,
                fine=probe.fine_reader(PATHS.raw_dir, spec, p.compute),
            )
        finally:
            PATHS.dedup_input.unlink(missing_ok=True)
        members = dedup.members_of_groups_with_duplicates(PATHS.dedup_table, p.compute.memory_mb)
        io.write_table(dedup.duplicate_groups(members), PATHS.duplicates_csv)
        io.write_json(c, PATHS.stage_counts("dedup"))
        memory.release()
        groups = dedup.near_groups_for_sheet(members, p.dedup.contact_groups, sheets.MAX_PER_ROW)
        thumbs = stored.thumbnails(
            groups, PATHS.raw_dir, sheets.THUMB, DecodeLimits.after_probe(p), p.compute
        )
    sheets.draw_near_groups(groups, thumbs, PATHS.duplicates_png)
    return (
        f"{console.count(n_fetched)} fetched images: {console.count(c['exact_duplicates'])} exact and "
        f"{console.count(c['near_duplicates'])} near duplicates, {console.count(c['after_dedup'])} left"
    )


if __name__ == "__main__":
    errors.run_stage(main)
