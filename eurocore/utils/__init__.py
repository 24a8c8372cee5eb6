"""Helpers every layer may import (they import nothing of eurocore): scalar argument checks
and files written atomically."""

from eurocore.utils.checks import check_bool, check_int, check_number
from eurocore.utils.files import (
    check_writable_dir,
    check_writable_file,
    fsync_path,
    write_bytes_atomically,
    write_json_atomically,
    write_text_atomically,
)

__all__ = [
    "check_bool",
    "check_int",
    "check_number",
    "check_writable_dir",
    "check_writable_file",
    "fsync_path",
    "write_bytes_atomically",
    "write_json_atomically",
    "write_text_atomically",
]
