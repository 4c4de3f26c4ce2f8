"""Where the images come from: a folder, a list file, Parquet with an image-bytes column, WebDataset tar shards.

Every source splits into :class:`Shard` s the same way on every run (sorted files, fixed shard size), so that a
re-run knows which output shards are finished. ``items(shard)`` yields :class:`Item` s: either a file ``path`` to
read (folder, list; read by the decode workers, in parallel) or the image ``data`` already read (Parquet, tar),
plus the caption when there is one. An entry that cannot be used (a missing file in a list, a row without bytes)
comes as an Item with ``error`` set: the run reports it and goes on. Shards are small and picklable (Ray ships
them to its tasks).
"""
from __future__ import annotations

import glob
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Iterator

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Item:
    key: str
    path: str | None = None  # a file to read (folder, list)
    data: bytes | None = None  # the encoded image (Parquet, tar)
    caption: str | None = None
    error: str | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        with open(self.path, "rb") as f:
            return f.read()


@dataclass(frozen=True)
class Shard:
    index: int
    ref: tuple  # folder / list: the items; parquet: (file, first row, end row); tar: (file,)
    count: int | None  # items in it (None: unknown until read, tar)


class Source:
    kind = "?"
    key_name = "key"  # the output column naming each row: "path" (files) or "key" (Parquet, tar)

    def __init__(self, path: str):
        self.path = path
        self.notes: list[str] = []

    def shards(self, shard_size: int) -> list[Shard]:
        raise NotImplementedError

    def items(self, shard: Shard) -> Iterator[Item]:
        raise NotImplementedError

    def split(self, shard: Shard, size: int) -> list[tuple[Shard, int]]:
        """Parts of ``shard`` of about ``size`` items, each with the position of its first item in the shard
        (for Ray: many small read-and-decode tasks per shard). Default: the shard whole."""
        return [(shard, 0)]

    def describe(self) -> dict:
        return dict(kind=self.kind, path=os.path.abspath(self.path))

    def fingerprint(self, shard: Shard) -> str:
        """A short digest of what ``shard`` holds (its files or rows; the size and modification time of a Parquet
        or tar file): a finished output shard whose input shard has another one now is redone on a re-run."""
        import hashlib

        files = [shard.ref[0]] if self.kind in ("parquet", "webdataset") else []
        stats = [(os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files if os.path.isfile(f)]
        def absolute(r):  # "imgs" and "./imgs" name the same files
            if isinstance(r, str):
                return os.path.abspath(r)
            if isinstance(r, tuple) and r and isinstance(r[0], str):
                return (os.path.abspath(r[0]), *r[1:])
            return r

        ref = tuple(absolute(r) for r in shard.ref)
        return hashlib.sha1(repr((ref, stats)).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- files

def read_captions(path: str, roots: list[str]) -> dict[str, str]:
    """A captions file (``path<TAB>caption`` lines, captions.json / .jsonl as ``dualfuse eval`` reads them) ->
    {absolute image path: first caption}; a relative name is looked up under each of ``roots``."""
    from ..data import read_caption_entries

    problems: list[str] = []
    out: dict[str, str] = {}
    for name, caption, _where in read_caption_entries(path, problems):
        if not isinstance(caption, str) or not caption.strip():
            continue
        for root in roots:
            full = os.path.abspath(name if os.path.isabs(name) else os.path.join(root, name))
            out.setdefault(full, caption.strip())
    if not out:
        raise ValueError(f"--captions {path}: no usable captions (expected 'path<TAB>caption' lines)"
                         + (f"; {problems[0]}" if problems else ""))
    return out


class FileSource(Source):
    """Image files: a folder (recursive) or a list file. Items carry the path; the workers read the bytes."""

    key_name = "path"

    def __init__(self, path: str, files: list[tuple[str, str | None]], captions: dict[str, str] | None):
        super().__init__(path)
        self.files = files  # (path as output, error or None)
        self.captions = captions

    def shards(self, shard_size: int) -> list[Shard]:
        out = []
        for i in range(0, len(self.files), shard_size):
            chunk = tuple(self.files[i:i + shard_size])
            out.append(Shard(len(out), chunk, len(chunk)))
        return out

    def split(self, shard: Shard, size: int) -> list[tuple[Shard, int]]:
        return [(Shard(shard.index, shard.ref[o:o + size], len(shard.ref[o:o + size])), o)
                for o in range(0, len(shard.ref), size)] or [(shard, 0)]

    def items(self, shard: Shard) -> Iterator[Item]:
        for path, error in shard.ref:
            cap = self.captions.get(os.path.abspath(path)) if self.captions else None
            yield Item(key=path, path=path if error is None else None, caption=cap, error=error)


def check_captions(src: FileSource, captions: str | None, roots: list[str]) -> None:
    """A captions file that names none of the images is refused (a path mistake, not images without captions);
    images without a caption are counted in a note."""
    if not captions:
        return
    paths = [p for p, error in src.files if error is None]
    missing = sum(os.path.abspath(p) not in src.captions for p in paths)
    if paths and missing == len(paths):
        raise ValueError(f"--captions {captions}: names none of the {len(paths)} images (e.g. {paths[0]}); relative "
                         f"names are looked up under {' and '.join(dict.fromkeys(os.path.abspath(r) for r in roots))}")
    if missing:
        src.notes.append(f"{missing} of {len(paths)} images have no caption in {captions} (text_embedding null)")


def folder_source(root: str, captions: str | None = None) -> FileSource:
    files, other, seen, again = [], 0, set(), []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:  # a folder reached again through a link (a loop): read once
            dirnames[:] = []
            again.append(dirpath)
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                files.append((os.path.join(dirpath, name), None))
            else:
                other += 1
    if not files:
        raise ValueError(f"--images {root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the folder or below")
    src = FileSource(root, files, read_captions(captions, [root, os.path.dirname(captions)]) if captions else None)
    src.kind = "folder"
    check_captions(src, captions, [root, os.path.dirname(captions or "")])
    if other:
        src.notes.append(f"ignored {other} file(s) in {root} that are not {'/'.join(IMAGE_EXTENSIONS)}")
    if again:
        src.notes.append(f"{len(again)} folder(s) reached again through links were read once (e.g. {again[0]})")
    return src


def list_source(path: str, captions: str | None = None) -> FileSource:
    base = os.path.dirname(os.path.abspath(path))
    files, seen = [], set()
    with open(path, encoding="utf-8-sig", errors="replace") as f:  # -sig: a byte-order mark is not a path
        for n, line in enumerate(f, 1):
            name = line.strip()
            if not name or name.startswith("#"):
                continue
            full = name if os.path.isabs(name) else os.path.join(base, name)
            if full in seen:
                files.append((f"{full}#line{n}", f"{os.path.basename(path)}:{n}: listed again (first listed earlier)"))
                continue
            seen.add(full)
            files.append((full, None if os.path.isfile(full) else "no such file"))
    if not files:
        raise ValueError(f"--images {path}: the list file names no images (expected one path a line)")
    src = FileSource(path, files, read_captions(captions, [base, os.path.dirname(captions)]) if captions else None)
    src.kind = "list"
    check_captions(src, captions, [base, os.path.dirname(captions or "")])
    return src


# --------------------------------------------------------------------------------------------- Parquet

def _require_pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        raise ValueError("Parquet input and output need pyarrow: pip install 'dualfuse[embed]'") from e


class ParquetSource(Source):
    kind = "parquet"

    def __init__(self, path: str, files: list[str], image_column: str, text_column: str | None,
                 key_column: str | None):
        super().__init__(path)
        import pyarrow.parquet as pq

        self.files, self.image_column, self.text_column, self.key_column = files, image_column, text_column, key_column
        self.rows: list[list[int]] = []  # per file: rows per row group
        for f in files:
            try:
                pf = pq.ParquetFile(f)
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"--images {f}: not a readable Parquet file ({type(e).__name__}: {e})") from None
            names = pf.schema_arrow.names
            for col, what in ((image_column, "--image-column"), (text_column, "--text-column"),
                              (key_column, "--key-column")):
                if col is not None and col not in names:
                    raise ValueError(f"{what} {col!r}: no such column in {f} (columns: {', '.join(names)})")
            kind = pf.schema_arrow.field(image_column).type
            if not _holds_bytes(kind):
                raise ValueError(f"--image-column {image_column!r} in {f} is {kind}, not encoded image bytes (binary, "
                                 "or a {bytes, path} struct as Hugging Face datasets write images)")
            md = pf.metadata
            self.rows.append([md.row_group(i).num_rows for i in range(md.num_row_groups)])

    def shards(self, shard_size: int) -> list[Shard]:
        out = []
        for fi, (f, groups) in enumerate(zip(self.files, self.rows)):
            total = sum(groups)
            for start in range(0, total, shard_size):
                end = min(total, start + shard_size)
                out.append(Shard(len(out), (f, start, end), end - start))
        return out

    def split(self, shard: Shard, size: int) -> list[tuple[Shard, int]]:
        f, start, end = shard.ref
        size = max(size, 1024)  # a part reads whole row groups: not too many parts per row group
        return [(Shard(shard.index, (f, o, min(end, o + size)), min(end, o + size) - o), o - start)
                for o in range(start, end, size)] or [(shard, 0)]

    def items(self, shard: Shard) -> Iterator[Item]:
        import pyarrow.parquet as pq

        f, start, end = shard.ref
        groups = self.rows[self.files.index(f)]
        cols = [c for c in (self.image_column, self.text_column, self.key_column) if c is not None]
        pf = pq.ParquetFile(f)
        first = 0
        picked, offset = [], None
        for g, n in enumerate(groups):
            if first + n > start and first < end:
                picked.append(g)
                offset = first if offset is None else offset
            first += n
        table = pf.read_row_groups(picked, columns=cols).slice(start - offset, end - start)
        images = table.column(self.image_column).to_pylist()
        texts = table.column(self.text_column).to_pylist() if self.text_column else None
        keys = table.column(self.key_column).to_pylist() if self.key_column else None
        name = os.path.basename(f)
        for i, value in enumerate(images):
            key = str(keys[i]) if keys is not None else f"{name}#{start + i}"
            if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
                value = value.get("bytes")
            cap = texts[i] if texts is not None else None
            if not isinstance(value, (bytes, bytearray)) or not value:
                yield Item(key, error=f"column {self.image_column!r}: no image bytes in this row", caption=cap)
                continue
            yield Item(key, data=bytes(value), caption=cap if isinstance(cap, str) else None)


def _holds_bytes(kind) -> bool:
    import pyarrow as pa

    if pa.types.is_struct(kind):
        return kind.get_field_index("bytes") >= 0 and _holds_bytes(kind.field("bytes").type)
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind) \
        or getattr(pa.types, "is_binary_view", lambda t: False)(kind)


def parquet_source(path: str, image_column: str, text_column: str | None, key_column: str | None) -> ParquetSource:
    _require_pyarrow()
    files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True)) if os.path.isdir(path) else [path]
    if not files:
        raise ValueError(f"--images {path}: no .parquet files in the folder")
    return ParquetSource(path, files, image_column, text_column, key_column)


# --------------------------------------------------------------------------------------------- tar shards

def expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard pattern: ``a-{000..009}.tar`` -> a-000.tar ... a-009.tar (zero padding kept)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") else 0
    out = []
    for n in range(int(lo), int(hi) + 1):
        out.extend(expand_braces(pattern[:m.start()] + str(n).zfill(width) + pattern[m.end():]))
    return out


class TarSource(Source):
    """WebDataset shards: members grouped by key (the path up to the first dot of the file name); the image is
    the first member with a jpg/jpeg/png/webp extension, the caption the one with ``text_ext``. One output shard
    per tar file."""

    kind = "webdataset"

    def __init__(self, path: str, files: list[str], text_ext: str | None):
        super().__init__(path)
        self.files, self.text_ext = files, (text_ext.lstrip(".").lower() if text_ext else None)
        if self.text_ext:
            seen = _first_extensions(files[0])
            if seen and self.text_ext not in seen:
                raise ValueError(f"--text-column {text_ext}: the first samples of {files[0]} have no .{self.text_ext} "
                                 f"member (their members: {', '.join(sorted(seen))})")

    def shards(self, shard_size: int) -> list[Shard]:
        return [Shard(i, (f,), None) for i, f in enumerate(self.files)]

    def items(self, shard: Shard) -> Iterator[Item]:
        (f,) = shard.ref
        try:
            tar = tarfile.open(f, "r")
        except (OSError, tarfile.TarError) as e:
            yield Item(os.path.basename(f), error=f"not a readable tar file ({type(e).__name__}: {e})")
            return
        group: dict[str, bytes] = {}
        key = None
        reading = False  # True while a member's data is read (a cut there leaves its key incomplete)
        with tar:
            try:
                for m in tar:
                    if not m.isfile():
                        continue
                    d, base = os.path.split(m.name)
                    if "." not in base:
                        continue
                    stem, ext = base.split(".", 1)
                    k = os.path.join(d, stem) if d else stem
                    if k != key and key is not None:
                        yield self._item(key, group)
                        group = {}
                    key = k
                    reading = True
                    data = tar.extractfile(m)
                    group[ext.lower()] = data.read() if data is not None else b""
                    reading = False
                if not _ends_cleanly(tar):  # tarfile stops without a word at a cut or broken header
                    raise tarfile.ReadError(f"no end-of-archive marker at byte {tar.offset}")
            except (OSError, tarfile.TarError, EOFError) as e:
                why = f"{type(e).__name__}: {e}"
                if key is not None and not reading:  # cut between members: the last key's members are whole
                    yield self._item(key, group)
                    yield Item(f"{os.path.basename(f)}:after {key}",
                               error=f"tar file cut short or corrupt after member {key} ({why})")
                else:
                    yield Item(f"{os.path.basename(f)}:{key or 'start'}",
                               error=f"tar file cut short or corrupt inside this member ({why})")
                key = None
        if key is not None:
            yield self._item(key, group)

    def _item(self, key: str, group: dict[str, bytes]) -> Item:
        cap = None
        if self.text_ext and self.text_ext in group:
            cap = group[self.text_ext].decode("utf-8", errors="replace").strip()
        for ext in TAR_IMAGE_EXTENSIONS:
            if ext in group:
                return Item(key, data=group[ext], caption=cap or None)
        return Item(key, error=f"no image member (.{'/.'.join(TAR_IMAGE_EXTENSIONS)}) under this key "
                               f"(members: {', '.join(sorted(group)) or 'none'})")


def _first_extensions(path: str, members: int = 64) -> set[str]:
    """The member extensions among the first ``members`` files of a tar file (empty if it cannot be read)."""
    out: set[str] = set()
    try:
        with tarfile.open(path, "r") as tar:
            for n, m in enumerate(tar):
                if n >= members:
                    break
                base = os.path.basename(m.name)
                if m.isfile() and "." in base:
                    out.add(base.split(".", 1)[1].lower())
    except (OSError, tarfile.TarError, EOFError):
        pass
    return out


def _ends_cleanly(tar: tarfile.TarFile) -> bool:
    """Whether the archive ends where tarfile stopped reading with the end-of-archive marker (a zero block)."""
    tar.fileobj.seek(tar.offset)
    return tar.fileobj.read(tarfile.BLOCKSIZE) == bytes(tarfile.BLOCKSIZE)


def tar_source(path: str, text_ext: str | None) -> TarSource:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.tar")))
    else:
        files = expand_braces(path)
    missing = [f for f in files if not os.path.isfile(f)]
    if not files or missing:
        raise ValueError(f"--images {path}: " + (f"no such tar file {missing[0]}" if missing else "no .tar files"))
    return TarSource(path, files, text_ext)


# --------------------------------------------------------------------------------------------- which one

def open_source(images: str, *, captions: str | None = None, text_column: str | None = None,
                image_column: str = "image", key_column: str | None = None) -> Source:
    """The source ``--images`` names: a folder of images, a folder of .parquet or .tar files, a .parquet /
    .tar file (or tar brace pattern), or a text file listing image paths."""
    is_tar = images.endswith(".tar") or re.search(r"\{\d+\.\.\d+\}", images) is not None
    if not is_tar and not os.path.exists(images):
        raise ValueError(f"--images {images}: no such file or folder")
    if os.path.isdir(images):
        has = lambda ext: bool(glob.glob(os.path.join(images, f"*{ext}")))  # noqa: E731
        if has(".parquet"):
            kind = "parquet"
        elif has(".tar"):
            kind = "tar"
        else:
            kind = "folder"
    elif is_tar:
        kind = "tar"
    elif images.endswith(".parquet"):
        kind = "parquet"
    else:
        kind = "list"
    if kind in ("parquet", "tar") and captions is not None:
        raise ValueError(f"--captions is for folders and list files; a {kind} input takes --text-column "
                         + ("COLUMN" if kind == "parquet" else "EXT (the caption member, e.g. txt)"))
    if kind in ("folder", "list") and text_column is not None:
        raise ValueError("--text-column is for Parquet (a column) and tar shards (an extension); folders and list "
                         "files take --captions FILE")
    if kind == "folder":
        return folder_source(images, captions)
    if kind == "list":
        with open(images, "rb") as f:
            head = f.read(512)
        if b"\0" in head or head[:3] == b"\xff\xd8\xff" or head[:8] == b"\x89PNG\r\n\x1a\n":
            raise ValueError(f"--images {images}: a single image; pass its folder, or a text file listing paths")
        return list_source(images, captions)
    if kind == "parquet":
        return parquet_source(images, image_column, text_column, key_column)
    return tar_source(images, text_column)
