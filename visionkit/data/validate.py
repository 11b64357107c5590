"""Decode-check every image file once per run, in a thread pool (Pillow releases the GIL while decoding)."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from PIL import Image, ImageFile

from .errors import DataError
from .layout import note

T = TypeVar("T")
R = TypeVar("R")

MAX_LISTED = 10


def check_image(path: str) -> tuple[tuple[int, int] | None, str | None]:
    """Fully decode ``path``; return ``((width, height), None)`` or ``(None, reason)``.

    JPEGs are decoded at reduced scale (``draft``): the whole entropy-coded stream is still read, so truncation
    and corruption are still caught, at a fraction of the cost.

    Example::

        size, reason = check_image("cat.jpg")
    """
    try:
        if os.path.getsize(path) == 0:
            return None, "zero-byte file"
    except OSError as e:
        return None, f"unreadable: {e.strerror or e}"
    try:
        with Image.open(path) as im:
            size = im.size
            if im.format == "JPEG":
                im.draft(im.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
        return size, None
    except Image.UnidentifiedImageError:
        return None, "not an image (cannot identify image file)"
    except Image.DecompressionBombError as e:
        return None, f"too large ({e})"
    except PermissionError:
        return None, "unreadable: permission denied"
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # Pillow raises these for corrupt/truncated data
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return None, f"corrupt or truncated ({msg})"


def check_oriented_image(path: str) -> tuple[tuple[int, int] | None, str | None]:
    """Decode-check an image; its (w, h) as shown, after the EXIF orientation (as ``load_rgb`` reads it)."""
    size, reason = check_image(path)
    if size is None:
        return None, reason
    with contextlib.suppress(Exception), Image.open(path) as im:  # EXIF is a nicety: the pixels decoded above
        if im.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees
            size = (size[1], size[0])
    return size, None


def check_all(check: Callable[[T], R], items: Sequence[T], workers: int | None = None) -> list[R]:
    """``check`` of every item, in order (a thread pool for 64 or more), with truncated images failing to decode."""
    if not items:
        return []
    workers = workers or min(16, 2 * (os.cpu_count() or 1))
    # Truncated files must fail; LOAD_TRUNCATED_IMAGES is a process-wide switch, so pin it during the check.
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        if len(items) < 64 or workers == 1:
            return [check(x) for x in items]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(check, items))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def validate_images(paths: Sequence[str],
                    workers: int | None = None) -> tuple[list[tuple[int, int] | None], list[dict]]:
    """Check all ``paths`` in parallel; return per-path sizes (None when bad) and ``[{path, reason}]`` of bad ones."""
    results = check_all(check_image, paths, workers)
    sizes = [s for s, _ in results]
    bad = [{"path": str(p), "reason": r} for p, (_, r) in zip(paths, results) if r is not None]
    return sizes, bad


def bad_files_error(bad: list[dict], where: str) -> DataError:
    """One DataError line listing the count and the first few bad files with their reasons."""
    shown = "; ".join(f"{b['path']} ({b['reason']})" for b in bad[:MAX_LISTED])
    more = f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    n = len(bad)
    return DataError(f"{n} bad image file{'s' if n != 1 else ''} in {where}: {shown}{more} -- fix or remove "
                     f"{'them' if n != 1 else 'it'}, or use --bad-images skip to train without them")


def fail_or_note_bad(bad: list[dict], where: str, bad_images: str) -> None:
    """Under ``bad_images="fail"`` raise ``bad_files_error`` for any bad file; else note how many were skipped."""
    if bad and bad_images == "fail":
        raise bad_files_error(bad, where)
    if bad:
        first = f"{bad[0]['path']} ({bad[0]['reason']})"
        note(f"skipped {len(bad)} bad file{'s' if len(bad) != 1 else ''} in {where} (first: {first}); "
             f"the bundle's bad_files lists {'them' if len(bad) != 1 else 'it'}")
