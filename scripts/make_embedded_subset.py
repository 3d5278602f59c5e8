"""Build src/vitlens/assets/cifar10_mini.tar: the CIFAR-10 subset shipped inside the package.

The first ``--train-per-class`` / ``--test-per-class`` files of each class, in sorted file-name
order, copied byte for byte (the original JPEGs, no re-encoding) into an *uncompressed* tar in
the ImageFolder layout ``train/<class>/<file>.jpg``, ``test/<class>/<file>.jpg``. Uncompressed,
so the loader can index it by byte offset; JPEGs barely compress anyway.

Deterministic: members sorted, mtime 0, owner root, mode 0644 - rerunning gives the same bytes
(the printed sha256 lets you check).

    python scripts/make_embedded_subset.py [--src ../shared/data/cifar10] \
        [--out src/vitlens/assets/cifar10_mini.tar]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import tarfile
from collections import defaultdict
from pathlib import Path, PurePosixPath

REPO = Path(__file__).resolve().parents[1]


def pick(tar_path: Path, split: str, per_class: int) -> dict[str, bytes]:
    """``{member name: bytes}`` of the first ``per_class`` images of each class, by sorted name."""
    by_class: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(tar_path, "r|*") as tf:
        for m in tf:
            parts = PurePosixPath(m.name.removeprefix("./")).parts
            if m.isfile() and len(parts) == 3 and parts[0] == split and parts[2].lower().endswith(".jpg"):
                by_class[parts[1]][m.name.removeprefix("./")] = tf.extractfile(m).read()
    if len(by_class) != 10:
        raise SystemExit(f"{tar_path}: expected 10 class folders under {split}/, found {sorted(by_class)}")
    out = {}
    for cls in sorted(by_class):
        names = sorted(by_class[cls])
        if len(names) < per_class:
            raise SystemExit(
                f"{tar_path}: class {cls} has only {len(names)} {split} images, need {per_class}"
            )
        out.update({n: by_class[cls][n] for n in names[:per_class]})
    return out


def write_tar(files: dict[str, bytes], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(files[name]), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tf.addfile(info, io.BytesIO(files[name]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--src",
        type=Path,
        default=REPO.parent / "shared" / "data" / "cifar10",
        help="folder with cifar10-train.tar.gz and cifar10-test.tar.gz",
    )
    ap.add_argument("--out", type=Path, default=REPO / "src" / "vitlens" / "assets" / "cifar10_mini.tar")
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--test-per-class", type=int, default=50)
    args = ap.parse_args()

    files = {}
    for split, n in (("train", args.train_per_class), ("test", args.test_per_class)):
        tar_path = args.src / f"cifar10-{split}.tar.gz"
        if not tar_path.is_file():
            raise SystemExit(
                f"{tar_path} not found; pass --src pointing at the folder holding the CIFAR-10 tarballs"
            )
        files.update(pick(tar_path, split, n))
    write_tar(files, args.out)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out}: {len(files)} images, {args.out.stat().st_size / 1e6:.2f} MB, sha256 {digest}")


if __name__ == "__main__":
    main()
