"""`vloop report url|open DAY [--loop]`: the daily report's location (a file on a local lake, a
presigned URL on S3 that really downloads it) or opened in a browser."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from vloop import cli

PAGE = b"<html><body>report of 2026-11-20</body></html>"


def _vloop(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out.strip(), out.err


def test_report_url_on_a_local_lake_is_the_file(local_lake, capsys):
    local_lake.put_bytes("reports/dt=2026-11-20/index.html", PAGE, "text/html")
    local_lake.put_bytes("reports/dt=2026-11-21/index.html", PAGE + b"!", "text/html")
    local_lake.put_bytes("reports/loop/2026-11-01/index.html", b"<html>loop</html>", "text/html")
    code, out, _ = _vloop(capsys, "report", "url", "2026-11-20", "--url", local_lake.url)
    assert code == 0 and Path(out).read_bytes() == PAGE
    code, out, _ = _vloop(capsys, "report", "url", "--url", local_lake.url)  # the newest
    assert code == 0 and out.endswith("reports/dt=2026-11-21/index.html")
    code, out, _ = _vloop(capsys, "report", "url", "2026-11-01", "--loop", "--url", local_lake.url)
    assert code == 0 and Path(out).read_bytes() == b"<html>loop</html>"
    code, _, err = _vloop(capsys, "report", "url", "2026-11-19", "--url", local_lake.url)
    assert code == 2 and "no report at reports/dt=2026-11-19/index.html" in err
    code, _, err = _vloop(capsys, "report", "url", "yesterday", "--url", local_lake.url)
    assert code == 2 and "yesterday" in err


def test_report_url_on_s3_is_presigned_and_downloads(s3_lake, s3_endpoint, monkeypatch, capsys):
    from tests.conftest import S3_KEYS

    s3_lake.put_bytes("reports/dt=2026-11-20/index.html", PAGE, "text/html")
    monkeypatch.setenv("VLOOP_S3_ENDPOINT", s3_endpoint)
    monkeypatch.setenv("VLOOP_S3_ACCESS_KEY", S3_KEYS["access_key"])
    monkeypatch.setenv("VLOOP_S3_SECRET_KEY", S3_KEYS["secret_key"])
    code, out, err = _vloop(capsys, "report", "url", "2026-11-20", "--url", s3_lake.url, "--expires", "1")
    assert code == 0, err
    assert out.startswith("http") and "X-Amz-Signature" in out and "X-Amz-Expires=3600" in out
    with urllib.request.urlopen(out, timeout=10) as resp:  # no credentials but the URL's
        assert resp.read() == PAGE


def test_report_open_opens_the_browser(local_lake, monkeypatch, capsys):
    import webbrowser

    local_lake.put_bytes("reports/dt=2026-11-20/index.html", PAGE, "text/html")
    monkeypatch.delenv("VLOOP_LAKE_PUBLIC_URL", raising=False)
    opened = []
    monkeypatch.setattr(webbrowser, "open", lambda url: opened.append(url) or True)
    code, out, _ = _vloop(capsys, "report", "open", "2026-11-20", "--url", local_lake.url)
    assert code == 0 and opened == [out] and out.startswith("file://")
    with urllib.request.urlopen(out) as resp:
        assert resp.read() == PAGE
