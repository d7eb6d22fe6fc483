"""Generate (once) and cache a realistic ChatOS store for the benchmarks: ~100k records, ~200 MB on disk.

Uses :func:`daemon.demo.storegen.generate_store` (``logs/`` + ``training_data/`` copies + feedback sidecar + the non-data
files ChatOS leaves around). The store is cached under ``--out`` (default ``/tmp/chatos-bench/store-<n>``); a
``.complete`` marker holding the parameters makes repeated runs skip generation, and a half-written store (no marker,
or other parameters) is generated again from scratch.

    .venv/bin/python bench/gen_store.py [--records 100000] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.demo.storegen import generate_store

RECORDS = 100_000
DAYS = 60
SEED = 20261001
# ~63 words per answer on average: with training_data/ copies of 8/11 records, 100k records come to ~200 MB.
ASSISTANT_WORDS = (30, 96)
MARKER = ".complete"


def default_dir(records: int) -> Path:
    return Path("/tmp/chatos-bench") / f"store-{records}"


def params(records: int) -> dict[str, object]:
    return {"records": records, "days": DAYS, "seed": SEED, "assistant_words": list(ASSISTANT_WORDS), "format": 1}


def store_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name != MARKER)


def ensure_store(root: Path, records: int = RECORDS, *, quiet: bool = False) -> Path:
    """The cached store at ``root``, generated first when missing or generated with other parameters."""
    marker = root / MARKER
    want = params(records)
    try:
        if json.loads(marker.read_text()) == want:
            return root
    except (OSError, ValueError):
        pass
    if root.exists():
        if not marker.exists() and any(p.name not in ("logs", "training_data", "feedback") for p in root.iterdir()):
            raise SystemExit(f"{root} exists and is not a generated store; pick another --out")
        shutil.rmtree(root)
    t0 = time.perf_counter()
    generate_store(root, records, days=DAYS, seed=SEED, assistant_words=ASSISTANT_WORDS)
    marker.write_text(json.dumps(want))
    if not quiet:
        print(f"generated {records} records in {time.perf_counter() - t0:.1f} s: {store_bytes(root) / 1e6:.0f} MB"
              f" at {root}", file=sys.stderr)
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=RECORDS)
    ap.add_argument("--out", type=Path, default=None, help="cache folder (default /tmp/chatos-bench/store-<records>)")
    args = ap.parse_args(argv)
    root = ensure_store(args.out or default_dir(args.records), args.records)
    files = [p for p in root.rglob("*") if p.is_file() and p.name != MARKER]
    by_folder: dict[str, int] = {}
    for p in files:
        folder = p.relative_to(root).parts[0]
        by_folder[folder] = by_folder.get(folder, 0) + p.stat().st_size
    print(f"{root}: {len(files)} files, {store_bytes(root) / 1e6:.1f} MB "
          + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(by_folder.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
