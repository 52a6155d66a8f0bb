"""The HTML report opens in headless Chromium and every figure renders as a non-empty image."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from afprobe.analysis.report import write_report
from tests.test_report import full_run  # noqa: F401  (fixture: a synthetic run directory)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Replaces the page body by one line per <img>: rendered size and whether it decoded.
PROBE_JS = """
<script>
window.addEventListener('load', () => {
  const rows = [...document.images].map(i => `${i.complete && i.naturalWidth > 0} ${i.naturalWidth}x${i.naturalHeight}`);
  document.title = 'IMAGES ' + rows.length + ' OK ' + rows.filter(r => r.startsWith('true')).length;
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = rows.join('\\n');
  document.body.prepend(pre);
});
</script>
"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(full_run, tmp_path):  # noqa: F811
    paths = write_report(full_run)
    html = Path(paths["html"]).read_text()
    n_images = html.count('<img src="data:image/png;base64,')
    assert n_images >= 4
    page = tmp_path / "probe.html"
    page.write_text(html.replace("</body>", PROBE_JS + "</body>"))
    proc = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
                           "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert f"IMAGES {n_images} OK {n_images}" in dom, dom[:2000]
    sizes = [line.split()[1] for line in dom.split('<pre id="probe">')[1].split("</pre>")[0].splitlines()]
    assert all(int(s.split("x")[0]) > 100 and int(s.split("x")[1]) > 100 for s in sizes), sizes
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={shot}",
                    "--window-size=1200,3000", Path(paths["html"]).as_uri()], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000
