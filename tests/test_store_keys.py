"""Host names are validated as a whole: a trailing newline, or anything else, never gets into a key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sketch.errors import UsageError
from store.keys import check_host


@pytest.mark.parametrize("host", ["node-7", "a", "n" * 255, "dc1/rack2/node.3", "user@host", "a+b=c_d"])
def test_valid_host_names_are_accepted(host):
    assert check_host(host) == host


@pytest.mark.parametrize("host", ["nl2\n", "nl2\r\n", "\nnl2", "a\nb", "", "n" * 256, "a b", "a:b", "{a}", "/a",
                                  "a\x00", "nl2\u2028", None, 5])
def test_a_host_name_must_match_in_full(host):
    with pytest.raises(UsageError, match="invalid host name"):
        check_host(host)


def test_a_huge_invalid_host_name_is_shown_shortened():
    with pytest.raises(UsageError) as raised:
        check_host("x" * 100_000 + "\n")
    assert len(str(raised.value)) < 200


@pytest.mark.parametrize("command", [["index", "--host", "nl2\n", "{images}"], ["images", "--host", "nl2\n"]])
def test_the_cli_refuses_a_host_name_with_a_trailing_newline(redis_url, tmp_path, command):
    args = [arg.format(images=tmp_path) for arg in command]
    result = subprocess.run([sys.executable, "-m", "cli", *args, "--redis", redis_url], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("blocksketch: error: invalid host name 'nl2\\n'")
    assert result.stderr.count("\n") == 1
