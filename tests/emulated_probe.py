"""Run by tests/test_emulated_cpus.py, natively and under qemu-user: dedup's probe of a few
pictures (JPEG and PNG, the default hash with margin, crops and transforms, and a 256-bit phash),
printed as one JSON object of the records' hash."""

from __future__ import annotations

import hashlib
import io
import json

from PIL import Image
from skimage import data

from photoprep.images.probe import ProbeSpec, probe

SPECS = (
    ProbeSpec(margin=0.1, crops=(0.03, 0.06), transforms=("hflip", "rot90")),
    ProbeSpec(hash_size=16),
)


def main() -> None:
    records = []
    for name in ("astronaut", "camera", "coffee", "chelsea", "rocket", "brick"):
        picture = Image.fromarray(getattr(data, name)())
        for fmt in ("JPEG", "PNG"):
            encoded = io.BytesIO()
            picture.save(encoded, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
            records += [probe(encoded.getvalue(), spec) for spec in SPECS]
    text = json.dumps(records, sort_keys=True)
    valid = sum(bool(r["valid"] and r["hash"]) for r in records)
    print(json.dumps({"valid": valid, "probe": hashlib.sha256(text.encode()).hexdigest()}))


if __name__ == "__main__":
    main()
