"""validate: the dataset's verdict on every image dedup left: the decode's reason (from dedup's
probe) or too_small. The dedup table is read, checked and written a slice at a time
(`photoprep.core.tables`, `compute.memory_mb`)."""

from _interpreter import ensure_project_python

ensure_project_python()

from photoprep.core import memory

memory.arrow_from_malloc()  # before pyarrow loads: photoprep.core.memory says why


from photoprep.core import console, errors, io, params, tables
from photoprep.core.layout import PATHS
from photoprep.images import validate


def main() -> str:
    p = params.load()
    counts = None
    with tables.TableWriter(PATHS.valid_table) as out, tables.CsvWriter(PATHS.broken_csv) as report:
        for deduped in tables.slices(PATHS.dedup_table, p.compute.memory_mb):
            checked = validate.validate_images(deduped, p.validate)
            del deduped  # before `write`, which may write a row group
            out.write(checked)
            report.write(validate.broken_report(checked))
            counts = validate.add_counts(counts, validate.validate_counts(checked))
            del checked
            memory.release()  # the slice's pages back to the OS: the next slice takes their place
        assert counts is not None  # slices yields one frame at least
        images = counts["broken"] + counts["valid"]
        console.require_input(images, "validate", "dedup left no fetched image", PATHS.stage_counts("dedup"))
    io.write_json(counts, PATHS.stage_counts("validate"))
    broken = console.reasons(counts["broken_by_reason"])
    return (
        f"{console.count(images)} images: {console.count(counts['valid'])} valid, "
        f"{console.count(counts['broken'])} broken" + (f" ({broken})" if broken else "")
    )


if __name__ == "__main__":
    errors.run_stage(main)
