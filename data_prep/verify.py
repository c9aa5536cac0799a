"""``python -m data_prep verify --shards DIR``: hash every shard in full and compare with its manifest.

Training checks each block's crc32 as it reads it and each shard's size when it starts; this checks every byte
of every shard against the manifest's sha256, e.g. after copying a corpus to another filesystem.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from ds_kd.cli.flags import HelpFormatter

    p = argparse.ArgumentParser(prog="python -m data_prep verify", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--shards", type=Path, required=True,
                   help="a corpus's shards directory (holding manifest.json), or the corpus directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ds_kd.errors import UsageError
    from ds_kd.manifest import MissingStageError
    from ds_kd.data.shards import ShardError, verify_shards

    shard_dir = args.shards / "shards" if (args.shards / "shards").is_dir() else args.shards
    start = time.perf_counter()
    try:
        num_bytes = verify_shards(shard_dir)
    except (ShardError, UsageError, MissingStageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{shard_dir}: every shard matches its sha256 ({num_bytes / 2**20:.1f} MiB in "
          f"{time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
