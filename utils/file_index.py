"""Folder scans and the file index that makes later starts cheap.

A scan lists an ImageFolder tree (`FOLDER/<class>/...`, recursively) or a plain folder of
images, opening no image: the listing is the data (an unreadable file is found by the worker
that loads it, utils.data.load_with_substitute). With a RESPATH the listing is kept as an index,
RESPATH/data_index/SPLIT.npz:

    paths     relative to the source folder (a PathTable's blob, starts, ends)
    labels    int64 (N,), or none for unlabeled data; classes in the header
    stamps    every scanned folder (or the path list file) with its modification time
    header    source, kind, fingerprint {count, total_bytes, newest_mtime_ns}, scan time

A later start reuses the index when it was built for the same source and every stamp is
unchanged: a folder's modification time changes whenever an entry is added, removed or
renamed in it, so checking the folders (a few stat calls, not one per file) finds any change
of the listing. Stamps within STAMP_MARGIN_NS of the scan are not trusted (coarse file system
clocks), so such an index is rebuilt once more. `--rescan` rebuilds it unconditionally.
"""
import io
import json
import os
import time
from dataclasses import dataclass

import numpy as np

from utils.data import IMG_EXTENSIONS, ImageList, PathTable, is_image_file
from utils.errors import UserError, warn
from utils.fileio import atomic_write_bytes

INDEX_VERSION = 1
STAMP_MARGIN_NS = 2_000_000_000


@dataclass
class Listing:
    """A scanned source: `images` (an ImageList whose PathTable root is the source folder),
    `stamps` [(path, mtime_ns, size)] that must be unchanged for the listing to hold, and the
    fingerprint {count, total_bytes, newest_mtime_ns} of the listed files."""
    images: ImageList
    stamps: list
    fingerprint: dict


class FolderWalk:
    """Image files below a folder in os.walk order (a folder's files, then its subfolders,
    each sorted by name; hidden entries skipped; symbolic links followed), with a stamp per
    folder and the size and modification time of each file (one stat each, no open)."""

    def __init__(self):
        self.paths, self.stamps = [], []
        self.total_bytes, self.newest_mtime_ns = 0, 0

    def walk(self, top, rel=""):
        self.stamps.append((top, os.stat(top).st_mtime_ns, 0))
        with os.scandir(top) as it:
            entries = sorted(it, key=lambda e: e.name)
        prefix = rel + os.sep if rel else ""
        subfolders, paths = [], self.paths
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                subfolders.append(name)
            elif name.lower().endswith(IMG_EXTENSIONS):
                paths.append(prefix + name)
                try:
                    st = entry.stat()
                except OSError:  # a broken link: the loader reports it
                    continue
                self.total_bytes += st.st_size
                if st.st_mtime_ns > self.newest_mtime_ns:
                    self.newest_mtime_ns = st.st_mtime_ns
        for name in subfolders:
            self.walk(os.path.join(top, name), prefix + name)
        return self

    def fingerprint(self):
        return {"count": len(self.paths), "total_bytes": self.total_bytes,
                "newest_mtime_ns": self.newest_mtime_ns}


def subfolders(folder):
    """The non-hidden subfolder names of `folder`, sorted."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def scan_folder(folder):
    """The Listing of `folder` as ImageFolder (class subfolders, labels by sorted class name)
    or, if it has none, as unlabeled images. UserError for a missing folder, an empty class
    folder or no images at all."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder} does not exist or is not a folder")
    folder = os.path.abspath(folder)
    classes = subfolders(folder)
    walk = FolderWalk()
    if not classes:
        walk.walk(folder)
        if not walk.paths:
            raise UserError(f"{folder} contains no images ({', '.join(IMG_EXTENSIONS[:4])}, ...)")
        images = ImageList(PathTable.from_strings(walk.paths, folder), None, [])
        return Listing(images, walk.stamps, walk.fingerprint())
    walk.stamps.append((folder, os.stat(folder).st_mtime_ns, 0))
    counts = []
    for name in classes:
        before = len(walk.paths)
        walk.walk(os.path.join(folder, name), name)
        counts.append(len(walk.paths) - before)
        if not counts[-1]:
            raise UserError(f"class folder {os.path.join(folder, name)} has no images; add "
                            f"images ({', '.join(IMG_EXTENSIONS[:4])}, ...) or remove it")
    loose = [f for f in os.listdir(folder) if is_image_file(f)]
    if loose:
        warn(f"{len(loose)} images directly in {folder} (outside class folders) are ignored")
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), counts)
    images = ImageList(PathTable.from_strings(walk.paths, folder), labels, classes)
    return Listing(images, walk.stamps, walk.fingerprint())


def require_labels_of(images, source, require_labels):
    """`images`, or UserError when labels are required and `source` (a folder) has none."""
    if require_labels and images.labels is None:
        raise UserError(f"{source} has no class subfolders; labelled evaluation needs "
                        f"{source}/<class name>/<images>")
    return images


def scan_image_folder(folder, require_labels):
    """`folder` as an ImageList (scan_folder), without an index."""
    return require_labels_of(scan_folder(folder).images, folder, require_labels)


def split_folder(datapath, split, require_labels):
    """The folder that holds `split` ('train' or 'test') of DATAPATH: DATAPATH/split, or for
    split 'train' without labels DATAPATH itself when it holds images directly."""
    if not os.path.isdir(datapath):
        raise UserError(f"DATAPATH {datapath} does not exist or is not a folder")
    folder = os.path.join(datapath, split)
    if os.path.isdir(folder):
        return folder
    if split == "train" and not require_labels:
        if any(is_image_file(f) for f in os.listdir(datapath)):
            return datapath
    hint = ("put images in DATAPATH/train/<class>/" if require_labels else
            "put images in DATAPATH/train/ (class subfolders optional) or directly in DATAPATH")
    raise UserError(f"DATAPATH {datapath} has no {split}/ folder; {hint}")


def find_split(datapath, split, require_labels, index_dir=None, rescan=False):
    """The `split` folder of DATAPATH (split_folder) as an ImageList, through the index in
    `index_dir` when given (indexed)."""
    folder = split_folder(datapath, split, require_labels)
    images = indexed(index_dir, split, ("folder", os.path.abspath(folder)),
                     lambda: scan_folder(folder), rescan)
    return require_labels_of(images, folder, require_labels)


# --- the index --------------------------------------------------------------------------------

def index_path(index_dir, split):
    return os.path.join(index_dir, f"{split}.npz")


def stamps_hold(stamps, scanned_ns):
    """Whether every (path, mtime_ns, size) stamp is unchanged and older than the scan by
    STAMP_MARGIN_NS (size 0: a folder, whose size is not compared)."""
    for path, mtime_ns, size in stamps:
        if mtime_ns > scanned_ns - STAMP_MARGIN_NS:
            return False
        try:
            st = os.stat(path)
        except OSError:
            return False
        if st.st_mtime_ns != mtime_ns or (size and st.st_size != size):
            return False
    return True


def encode_index(source, listing, scanned_ns):
    """The index file's bytes (an .npz, see the module docstring)."""
    images, stamps = listing.images, listing.stamps
    header = {"version": INDEX_VERSION, "kind": source[0], "source": source[1],
              "root": images.paths.root, "classes": images.classes,
              "labelled": images.labels is not None, "fingerprint": listing.fingerprint,
              "scanned_ns": scanned_ns}
    stamp_table = PathTable.from_strings([path for path, _, _ in stamps])
    buffer = io.BytesIO()
    np.savez(buffer, header=np.array(json.dumps(header)), blob=images.paths.blob,
             starts=images.paths.starts, ends=images.paths.ends,
             labels=images.labels if images.labels is not None else np.zeros(0, np.int64),
             stamp_blob=stamp_table.blob, stamp_starts=stamp_table.starts,
             stamp_ends=stamp_table.ends,
             stamp_values=np.array([[m, s] for _, m, s in stamps], dtype=np.int64).reshape(-1, 2))
    return buffer.getvalue()


def read_index(path, source):
    """(ImageList, stamps, header) of the index file `path` if it was built for `source` by
    this version, else None (also for a missing or unreadable file)."""
    try:
        with np.load(path) as data:
            header = json.loads(str(data["header"]))
            if (header.get("version"), header.get("kind"), header.get("source")) != (
                    INDEX_VERSION, *source):
                return None
            paths = PathTable(data["blob"], data["starts"], data["ends"], header["root"])
            labels = data["labels"] if header["labelled"] else None
            stamp_table = PathTable(data["stamp_blob"], data["stamp_starts"], data["stamp_ends"])
            values = data["stamp_values"].tolist()
    except (OSError, ValueError, KeyError, EOFError):
        return None
    stamps = [(stamp_table[i], m, s) for i, (m, s) in enumerate(values)]
    return ImageList(paths, labels, header["classes"]), stamps, header


def indexed(index_dir, split, source, scan, rescan=False):
    """The ImageList of `source` (kind, absolute path): from index_dir/SPLIT.npz when it holds
    this source's listing and its stamps hold (stamps_hold), else `scan()` (a Listing), which
    is then written there. Without `index_dir` just scan(). Prints one line saying which."""
    if index_dir is None:
        return scan().images
    path = index_path(index_dir, split)
    tic = time.perf_counter()
    found = None if rescan else read_index(path, source)
    if found is not None and stamps_hold(found[1], found[2]["scanned_ns"]):
        images, _, header = found
        print(f"data index: {len(images)} files of {source[1]} from {path} "
              f"({len(found[1])} stamps unchanged, {time.perf_counter() - tic:.2f} s)",
              flush=True)
        return images
    scanned_ns = time.time_ns()
    listing = scan()
    seconds = time.perf_counter() - tic
    try:
        atomic_write_bytes(path, encode_index(source, listing, scanned_ns))
    except OSError as err:  # a read-only RESPATH: the run works, the next start scans again
        warn(f"could not write the data index {path} ({err.strerror}); the next start scans "
             f"again")
    count = listing.fingerprint["count"]
    print(f"data index: scanned {source[1]}: {count} files, "
          f"{listing.fingerprint['total_bytes'] / 2 ** 20:.1f} MB in {seconds:.2f} s "
          f"({count / max(seconds, 1e-9):.0f} files/s); kept in {path}", flush=True)
    return listing.images
