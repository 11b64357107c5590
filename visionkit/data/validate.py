"""Decode-check every image file once per run, in a thread pool (Pillow releases the GIL while decoding)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, ImageFile

from .errors import DataError

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


def validate_images(paths: Sequence[str],
                    workers: int | None = None) -> tuple[list[tuple[int, int] | None], list[dict]]:
    """Check all ``paths`` in parallel; return per-path sizes (None when bad) and ``[{path, reason}]`` of bad ones."""
    if not paths:
        return [], []
    workers = workers or min(16, 2 * (os.cpu_count() or 1))
    # Truncated files must fail; LOAD_TRUNCATED_IMAGES is a process-wide switch, so pin it during the check.
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        if len(paths) < 64 or workers == 1:
            results = [check_image(p) for p in paths]
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(check_image, paths))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old
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
