"""Where encoded image files come from: an ImageFolder split in a directory or inside a tar.

Both sources answer the same small questions: which classes, which files with which labels,
and "give me the raw bytes of file i". Decoding lives elsewhere (``decode.py``), so the
same code turns a directory, a ``.tar`` or a ``.tar.gz`` into pixels.

Layout (torchvision's ImageFolder): ``<root>/<split>/<class>/<image>``; files may sit in
deeper folders under a class. Class names are the sorted folder names, as torchvision does.
Archives are read with :mod:`tarfile` directly, never unpacked to disk: an uncompressed tar
is indexed by byte offset (random access, nothing held in memory); a compressed one can only
be read front to back, so the split's encoded bytes are kept in memory instead.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from abc import ABC, abstractmethod
from pathlib import Path

from ..errors import ConfigError, DataError, MissingFileError

#: What counts as an image file (torchvision's list, plus .gif).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

#: The folder names accepted for each split: many datasets ship ``val`` instead of ``test``.
SPLIT_DIRS = {"train": ("train",), "test": ("test", "val"), "val": ("val", "test")}

LAYOUT_HINT = "expected the ImageFolder layout <root>/train/<class>/<image> and <root>/test/<class>/<image>"

# First bytes of the compressed formats tarfile understands (gzip, bzip2, xz).
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def split_dirs(split: str) -> tuple[str, ...]:
    if split not in SPLIT_DIRS:
        raise ConfigError(f"unknown split {split!r}; use one of {sorted(SPLIT_DIRS)}")
    return SPLIT_DIRS[split]


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def is_archive(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"))


class ImageFolderSource(ABC):
    """One split of an ImageFolder dataset: ``classes``, per-file ``names`` and ``targets``, raw bytes.

    ``location`` is the path shown in messages; ``fingerprint()`` changes whenever the
    underlying files do and keys the decoded cache. Subclasses (a directory, a tar archive)
    say how bytes are read and fingerprinted.
    """

    location: str
    classes: list[str]
    names: list[str]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.names)

    @abstractmethod
    def read(self, i: int) -> bytes:
        """The encoded bytes of file ``i``."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A hash that changes whenever the split's files do."""

    def drop(self, indices: set[int]) -> None:
        """Forget the files at ``indices`` (the unreadable ones) so that labels stay aligned."""
        keep = [i for i in range(len(self)) if i not in indices]
        self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        self.names = [self.names[i] for i in keep]
        self.targets = [self.targets[i] for i in keep]


class DirectorySource(ImageFolderSource):
    """``root/<split>/<class>/**/<image>`` on disk."""

    def __init__(self, root: str | os.PathLike, split: str):
        root = Path(root).expanduser()
        if not root.exists():
            raise MissingFileError(
                f"image folder {root} does not exist; {LAYOUT_HINT}. Pass the folder that holds train/ "
                "and test/ (--data-dir)"
            )
        if not root.is_dir():
            raise DataError(f"{root} is not a directory or a .tar/.tar.gz archive; {LAYOUT_HINT}")
        candidates = split_dirs(split)
        found = [root / d for d in candidates if (root / d).is_dir()]
        if not found:
            present = sorted(p.name for p in root.iterdir() if p.is_dir()) or ["nothing"]
            raise MissingFileError(
                f"no {' or '.join(repr(d + '/') for d in candidates)} folder in {root} (it holds "
                f"folders: {', '.join(present)}); {LAYOUT_HINT}"
            )
        self.split_dir = found[0]
        self.location = str(self.split_dir)
        self.classes = sorted(e.name for e in os.scandir(self.split_dir) if e.is_dir())
        paths: list[str] = []
        targets: list[int] = []
        for label, cls in enumerate(self.classes):
            for dirpath, dirnames, filenames in os.walk(self.split_dir / cls, followlinks=True):
                dirnames.sort()  # os.walk order is the file system's; sort for a stable order
                for f in sorted(filenames):
                    if is_image_file(f):
                        paths.append(os.path.join(dirpath, f))
                        targets.append(label)
        if not paths:
            loose = [f for f in os.listdir(self.split_dir) if is_image_file(f)]
            why = (
                f"its {len(loose)} images are not inside class folders"
                if loose
                else f"it has no image files ({', '.join(IMG_EXTENSIONS)}) in class folders"
            )
            raise DataError(f"{self.split_dir} is empty for training: {why}; {LAYOUT_HINT}")
        self.names, self.targets = paths, targets

    def read(self, i: int) -> bytes:
        with open(self.names[i], "rb") as f:
            return f.read()

    def fingerprint(self) -> str:
        # Every file's name, size and mtime: adding, removing or editing any image changes it.
        h = hashlib.sha1(f"dir|{self.split_dir.resolve()}".encode())
        for p in self.names:
            st = os.stat(p)
            h.update(f"|{p}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()


class TarSource(ImageFolderSource):
    """An ImageFolder split inside a ``.tar`` / ``.tar.gz`` / ``.tgz`` archive, read in place.

    Member paths may carry a prefix (``cifar10/train/cat/0.jpg``): the first path component
    that names the split, followed by ``<class>/.../<image>``, anchors the layout.
    """

    def __init__(self, path: str | os.PathLike, split: str):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise MissingFileError(
                f"archive {self.path} does not exist; {LAYOUT_HINT} inside a .tar/.tar.gz"
            )
        self.location = str(self.path)
        self.split = split
        candidates = split_dirs(split)
        with open(self.path, "rb") as f:
            self.compressed = f.read(6).startswith(_COMPRESSED_MAGIC)
        # per split-folder name: list of (class, member name, offset, size, bytes or None)
        entries: dict[str, list[tuple[str, str, int, int, bytes | None]]] = {d: [] for d in candidates}
        top_level: set[str] = set()
        try:
            # Compressed: stream front to back ("r|*"), keep the bytes. Plain: random access ("r:").
            with tarfile.open(self.path, "r|*" if self.compressed else "r:") as tf:
                for m in tf:
                    if not m.isfile() or not is_image_file(m.name):
                        continue
                    parts = [p for p in m.name.split("/") if p not in ("", ".")]  # cheaper than PurePosixPath
                    top_level.add(parts[0])
                    split_at = next(
                        (k for k, p in enumerate(parts[:-2]) if p in entries),
                        None,
                    )
                    if split_at is None:
                        continue
                    data = tf.extractfile(m).read() if self.compressed else None
                    entries[parts[split_at]].append(
                        (parts[split_at + 1], m.name, m.offset_data, m.size, data)
                    )
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            raise DataError(
                f"could not read the archive {self.path} ({type(e).__name__}: {e}); it looks damaged or is "
                "not a tar file. Re-download or re-create it, or pass an unpacked folder instead"
            ) from None
        chosen = next((d for d in candidates if entries[d]), None)
        if chosen is None:
            raise MissingFileError(
                f"no {' or '.join(repr(d + '/<class>/<image>') for d in candidates)} entries in {self.path} "
                f"(top-level names: {', '.join(sorted(top_level)) or 'no image files at all'}); {LAYOUT_HINT}"
            )
        rows = sorted(entries[chosen], key=lambda r: r[1])  # archive order is arbitrary; sort by name
        self.split_dir = chosen
        self.classes = sorted({r[0] for r in rows})
        index = {c: i for i, c in enumerate(self.classes)}
        self.names = [r[1] for r in rows]
        self.targets = [index[r[0]] for r in rows]
        self._offsets = [(r[2], r[3]) for r in rows]
        self._data = [r[4] for r in rows] if self.compressed else None

    def read(self, i: int) -> bytes:
        if self._data is not None:
            return self._data[i]
        offset, size = self._offsets[i]
        # Open per read: safe across DataLoader worker processes, and cheap next to decoding.
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def _keep(self, keep: list[int]) -> None:
        super()._keep(keep)
        self._offsets = [self._offsets[i] for i in keep]
        if self._data is not None:
            self._data = [self._data[i] for i in keep]

    def fingerprint(self) -> str:
        return archive_fingerprint(self.path, self.split)


def archive_fingerprint(path: Path, split: str) -> str:
    """Key of an archive's split: path + size + mtime, known without opening the archive."""
    st = path.stat()
    return hashlib.sha1(f"tar|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{split}".encode()).hexdigest()


def open_source(path: str | os.PathLike, split: str) -> ImageFolderSource:
    """A directory or an archive holding an ImageFolder tree -> the source for ``split``."""
    path = Path(path).expanduser()
    return TarSource(path, split) if is_archive(path) else DirectorySource(path, split)
